"""The figures' data: the image grid's mosaic (one image drawn once), and the PNG written from it."""
import numpy as np
import torch

from ltdd_fast.plots import grid_mosaic, save_grid


def test_grid_mosaic_puts_each_class_on_its_row_with_white_blanks():
    pixels = np.stack([np.full((2, 3, 1), v, dtype=np.float32) for v in (0.1, 0.2, 0.3, 0.4, 0.5)])
    classes = [0, 0, 0, 2, 1]  # class 0 has one image more than ipc: the third is left out
    m = grid_mosaic(pixels, classes, rows=3, ipc=2, pad=1)
    assert m.shape == (3 * 3 - 1, 2 * 4 - 1, 1)
    cell = lambda r, k: m[r * 3:r * 3 + 2, k * 4:k * 4 + 3, 0]  # noqa: E731
    assert (cell(0, 0) == 0.1).all() and (cell(0, 1) == 0.2).all()
    assert (cell(1, 0) == 0.5).all() and (cell(1, 1) == 1.0).all()  # class 1: one image, then a blank
    assert (cell(2, 0) == 0.4).all() and (cell(2, 1) == 1.0).all()
    assert (m[2, :, 0] == 1.0).all() and (m[:, 3, 0] == 1.0).all()  # the pad lines
    assert not (m == 0.3).any()
    rgb = grid_mosaic(np.zeros((1, 2, 2, 3), np.float32), [1], rows=2, ipc=1)
    assert rgb.shape == (5, 2, 3) and (rgb[3:] == 0).all() and (rgb[:2] == 1).all()


def test_save_grid_writes_a_png(digits, tmp_path):
    images = torch.randn(2 * digits.num_classes, digits.channel, *digits.im_size)
    path = tmp_path / "grid" / "set.png"
    save_grid(images, digits, 2, path, "a set")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_grid(images[:3], digits, 2, tmp_path / "few.png", "three images", classes=torch.tensor([0, 0, 5]))
    assert (tmp_path / "few.png").stat().st_size > 0
