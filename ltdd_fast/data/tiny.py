"""Tiny-ImageNet (tiny-imagenet-200/) and the shared JPEG reading used by the ImageNet-LT reader."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def _load_one(path: str, resolution: int | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if resolution is not None:
                # JPEG draft decoding scales by 1/2..1/8 in the DCT, far cheaper than a full decode.
                im.draft("RGB", (resolution, resolution))
                im = im.convert("RGB")
                w, h = im.size
                s = resolution / min(w, h)
                nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
                im = im.resize((nw, nh), Image.Resampling.BILINEAR)
                left, top = (nw - resolution) // 2, (nh - resolution) // 2
                im = im.crop((left, top, left + resolution, top + resolution))
            else:
                im = im.convert("RGB")  # grayscale / CMYK files exist in both Tiny and ImageNet
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def load_rgb_images(paths: list[str], resolution: int | None = None, size: int | None = None) -> np.ndarray:
    """uint8 [N,H,W,3]. With `resolution`: shorter side resized to it, then centre-cropped square.
    Without: images are taken as they are and must all be `size` x `size` when size is given."""
    if not paths:
        return np.zeros((0, resolution or size or 0, resolution or size or 0, 3), np.uint8)
    # PIL releases the GIL while decoding and resizing, so threads scale.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda p: _load_one(p, resolution), paths))
    want = (resolution, resolution, 3) if resolution is not None else (size, size, 3) if size else images[0].shape
    for p, im in zip(paths, images):
        if im.shape != want:
            raise DataError(f"image {p} is {im.shape[1]}x{im.shape[0]}, expected {want[1]}x{want[0]}")
    return np.stack(images)


def _find_root(root: str) -> str:
    for d in (os.path.join(root, "tiny-imagenet-200"), root):
        if os.path.isfile(os.path.join(d, "wnids.txt")) and os.path.isdir(os.path.join(d, "train")):
            return d
    raise DataError(f"Tiny-ImageNet data not found in {root}: expected wnids.txt, train/<wnid>/images/ and "
                    f"val/images/ with val/val_annotations.txt (tiny-imagenet-200)")


def read_tiny_imagenet(root: str):
    """(x_train uint8 [N,64,64,3], y_train int64, x_test, y_test, class_names); class index = wnids.txt order."""
    d = _find_root(str(root))
    with open(os.path.join(d, "wnids.txt")) as f:
        wnids = [line.strip() for line in f if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{d}/wnids.txt must list distinct class ids, one per line")
    index = {w: i for i, w in enumerate(wnids)}

    names = dict()
    words = os.path.join(d, "words.txt")
    if os.path.isfile(words):
        with open(words, encoding="utf-8", errors="replace") as f:
            for line in f:
                wnid, _, text = line.rstrip("\n").partition("\t")
                if wnid in index:
                    names[wnid] = text.split(",")[0].strip() or wnid
    class_names = [names.get(w, w) for w in wnids]

    train_paths, y_train = [], []
    for w in wnids:
        folder = os.path.join(d, "train", w, "images")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)) if os.path.isdir(folder) else []
        if not files:
            raise DataError(f"no training images for class {w} (index {index[w]}): expected {folder}/{w}_<k>.JPEG")
        train_paths += [os.path.join(folder, f) for f in files]
        y_train += [index[w]] * len(files)

    ann = os.path.join(d, "val", "val_annotations.txt")
    if not os.path.isfile(ann):
        raise DataError(f"Tiny-ImageNet validation labels not found: expected {ann}")
    test_paths, y_test = [], []
    with open(ann) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise DataError(f"{ann} line {n}: expected 'filename<TAB>wnid<TAB>x<TAB>y<TAB>w<TAB>h' "
                                f"with a wnid from wnids.txt, got {line.strip()!r}")
            test_paths.append(os.path.join(d, "val", "images", fields[0]))
            y_test.append(index[fields[1]])

    return (load_rgb_images(train_paths, size=64), np.asarray(y_train, np.int64),
            load_rgb_images(test_paths, size=64), np.asarray(y_test, np.int64), class_names)
