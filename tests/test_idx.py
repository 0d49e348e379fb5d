"""MNIST / Fashion-MNIST IDX reader: small files written here in the exact format (gzipped and raw), every
bad-file error, the long-tailed load, and one smoke test on the real files where Debian's package put them."""
import gzip
import os
import struct

import numpy as np
import pytest

from ltdd_fast.data import load_dataset, long_tail_counts
from ltdd_fast.data.idx import FASHION_MNIST_CLASSES, IDX_FILES, SYSTEM_DIRS, read_idx, read_idx_dataset
from ltdd_fast.errors import ConfigError, DataError


def idx_bytes(array, magic_type=0x08):
    array = np.asarray(array, dtype=np.uint8)
    return struct.pack(">HBB", 0, magic_type, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.tobytes()


def write_idx_set(folder, n_per_class=(30, 4), size=(28, 28), gz=True, seed=0):
    """The four IDX files of a 10-class set: train n_per_class[0] per class, test n_per_class[1]; returns arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_per_class[0]), ("test", n_per_class[1])):
        labels = rng.permutation(np.repeat(np.arange(10), n)).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), *size), dtype=np.uint8)
        images[:, 0, 0] = labels * 20  # a pixel that says which image is which class
        for kind, arr in (("images", images), ("labels", labels)):
            path = folder / (IDX_FILES[f"{split}_{kind}"] + (".gz" if gz else ""))
            data = idx_bytes(arr)
            path.write_bytes(gzip.compress(data) if gz else data)
        out[split] = images, labels
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_reads_the_four_files_gzipped_or_raw(tmp_path, gz):
    written = write_idx_set(tmp_path, gz=gz)
    x, y, xt, yt, names = read_idx_dataset("fashion-mnist", str(tmp_path))
    assert x.shape == (300, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x[..., 0], written["train"][0]) and np.array_equal(y, written["train"][1])
    assert np.array_equal(xt[..., 0], written["test"][0]) and np.array_equal(yt, written["test"][1])
    assert names == FASHION_MNIST_CLASSES and names[0] == "T-shirt/top" and names[9] == "Ankle boot"
    assert read_idx_dataset("mnist", str(tmp_path))[4] == [str(c) for c in range(10)]


def test_torchvision_layout_and_mixed_compression(tmp_path):
    folder = tmp_path / "FashionMNIST" / "raw"
    written = write_idx_set(folder, gz=True)
    raw = folder / (IDX_FILES["test_labels"] + ".gz")
    (folder / IDX_FILES["test_labels"]).write_bytes(gzip.decompress(raw.read_bytes()))
    raw.unlink()
    _, _, _, yt, _ = read_idx_dataset("fashion-mnist", str(tmp_path))
    assert np.array_equal(yt, written["test"][1])


def test_long_tailed_load_counts_and_channel(tmp_path):
    write_idx_set(tmp_path, n_per_class=(40, 3))
    ds = load_dataset("fashion-mnist", data_dir=str(tmp_path), imbalance_factor=10, seed=0)
    # n_max 6000 is more than the files hold: reduced to the smallest class, and said so
    assert ds.class_counts == long_tail_counts(40, 10, 10) and ds.class_counts[0] == 40
    assert any("n_max reduced from 6000 to 40" in n for n in ds.notes)
    assert ds.channel == 1 and ds.im_size == (28, 28) and ds.zca is None
    assert ds.class_names[0] == "T-shirt/top" and len(ds.labels_test) == 30
    assert abs(float(ds.images_train.mean())) < 1e-4 and abs(float(ds.images_train.std()) - 1) < 1e-3
    # the kept images are the right class's: the marker pixel decodes to the label
    pixel = (ds.denormalize(ds.images_train)[:, 0, 0, 0] * 255).round().long()
    assert (pixel == ds.labels_train * 20).all()
    assert load_dataset("fashion-mnist", data_dir=str(tmp_path), resolution=32).im_size == (32, 32)


def _corrupt(tmp_path, base, data):
    write_idx_set(tmp_path, gz=False)
    (tmp_path / base).write_bytes(data)
    with pytest.raises(DataError) as err:
        read_idx_dataset("fashion-mnist", str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and base in message
    return message


def test_wrong_magic(tmp_path):
    labels = np.zeros(300, np.uint8)
    msg = _corrupt(tmp_path, IDX_FILES["train_labels"], idx_bytes(np.zeros((300, 1), np.uint8)))
    assert "magic number 0x00000802" in msg and "expected 0x00000801" in msg
    msg = _corrupt(tmp_path, IDX_FILES["train_labels"], idx_bytes(labels, magic_type=0x0D))
    assert "0x00000d01" in msg and "expected 0x00000801" in msg
    msg = _corrupt(tmp_path, IDX_FILES["train_images"], b"\x00\x00\x08")
    assert "truncated" in msg and "magic" in msg


def test_truncated_and_overlong(tmp_path):
    full = idx_bytes(np.zeros((300, 28, 28), np.uint8))
    msg = _corrupt(tmp_path, IDX_FILES["train_images"], full[:-5])
    assert "truncated" in msg and "300 x 28 x 28 = 235200" in msg
    msg = _corrupt(tmp_path, IDX_FILES["train_images"], full[:10])
    assert "truncated" in msg and "header" in msg
    msg = _corrupt(tmp_path, IDX_FILES["train_images"], full + b"\x00")
    assert "longer than its header says" in msg


def test_truncated_gzip(tmp_path):
    write_idx_set(tmp_path, gz=True)
    path = tmp_path / (IDX_FILES["test_images"] + ".gz")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz is not a complete gzip file"):
        read_idx_dataset("fashion-mnist", str(tmp_path))
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a complete gzip file"):
        read_idx_dataset("fashion-mnist", str(tmp_path))


def test_counts_label_range_and_sizes(tmp_path):
    msg = _corrupt(tmp_path, IDX_FILES["train_labels"], idx_bytes(np.zeros(299, np.uint8)))
    assert "300 images" in msg and "299 labels" in msg
    msg = _corrupt(tmp_path, IDX_FILES["train_labels"], idx_bytes(np.full(300, 10, np.uint8)))
    assert "label 10" in msg and "0..9" in msg
    msg = _corrupt(tmp_path, IDX_FILES["test_images"], idx_bytes(np.zeros((40, 20, 20), np.uint8)))
    assert "28x28" in msg and "20x20" in msg
    _corrupt(tmp_path, IDX_FILES["test_images"], idx_bytes(np.zeros((0, 28, 28), np.uint8)))


def test_missing_file_names_file_places_and_package(tmp_path):
    write_idx_set(tmp_path, gz=True)
    (tmp_path / (IDX_FILES["train_labels"] + ".gz")).unlink()
    with pytest.raises(DataError) as err:
        read_idx_dataset("fashion-mnist", str(tmp_path))
    msg = str(err.value)
    assert "train-labels-idx1-ubyte[.gz] not found" in msg and str(tmp_path) in msg
    assert os.path.join(str(tmp_path), "FashionMNIST", "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "\n" not in msg
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="unknown IDX data set"):
        read_idx_dataset("kmnist", str(tmp_path))


def test_read_idx_itself(tmp_path):
    path = tmp_path / "a.idx"
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path.write_bytes(idx_bytes(arr))
    assert np.array_equal(read_idx(str(path), 3), arr)
    with pytest.raises(DataError, match="expected 0x00000801"):
        read_idx(str(path), 1)


SYSTEM = SYSTEM_DIRS["fashion-mnist"][0]


@pytest.mark.skipif(not os.path.isfile(os.path.join(SYSTEM, IDX_FILES["train_images"] + ".gz")),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_the_system_package():
    x, y, xt, yt, names = read_idx_dataset("fashion-mnist")
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert np.bincount(y).tolist() == [6000] * 10 and np.bincount(yt).tolist() == [1000] * 10
    ds = load_dataset("fashion-mnist", imbalance_factor=100)
    assert ds.class_counts == long_tail_counts(6000, 10, 100) and ds.class_counts[-1] == 60 and not ds.notes
