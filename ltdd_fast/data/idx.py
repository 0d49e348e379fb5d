"""MNIST and Fashion-MNIST from their IDX files (train-images-idx3-ubyte and the three others, gzipped or not).

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in row-major order. Images are type 0x08 (uint8) with
3 dimensions [n, rows, cols]; labels are uint8 with 1 dimension [n].
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from ..errors import ConfigError, DataError

IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_UBYTE = 0x08

# The class names the data sets publish, in label order.
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
MNIST_CLASSES = [str(c) for c in range(10)]

# Where a system package puts the files when no folder is given (Debian: dataset-fashion-mnist).
SYSTEM_DIRS = {"fashion-mnist": ["/usr/share/datasets/fashion-mnist"], "mnist": ["/usr/share/datasets/mnist"]}
_APT = {"fashion-mnist": "apt-get install dataset-fashion-mnist", "mnist": None}
# Sub-folders tried under a given folder: the folder itself and the layouts other tools download into.
_SUBDIRS = {"fashion-mnist": ["", "fashion-mnist", os.path.join("FashionMNIST", "raw")],
            "mnist": ["", "mnist", os.path.join("MNIST", "raw")]}


def _candidates(name: str, data_dir: str | None) -> list[str]:
    roots = [str(data_dir)] if data_dir is not None else SYSTEM_DIRS[name]
    return [os.path.normpath(os.path.join(r, s)) for r in roots for s in _SUBDIRS[name]]


def _find(folders: list[str], base: str) -> str | None:
    for folder in folders:
        for fname in (base, base + ".gz"):
            path = os.path.join(folder, fname)
            if os.path.isfile(path):
                return path
    return None


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path} is not a complete gzip file ({exc}): download it again") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc})") from None


def read_idx(path: str, ndim: int) -> np.ndarray:
    """The uint8 array of one IDX file with `ndim` dimensions, after checking its magic and size."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, expected at least the 4-byte IDX magic number")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _UBYTE or dims != ndim:
        kind = "images" if ndim == 3 else "labels"
        raise DataError(f"{path} has magic number 0x{raw[:4].hex()}, expected 0x{0x0800 + ndim:08x} (IDX uint8 "
                        f"{kind} with {ndim} dimension{'s' if ndim > 1 else ''})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != size:
        what = "truncated" if len(raw) - header < size else "longer than its header says"
        raise DataError(f"{path} is {what}: {len(raw) - header} bytes of data, expected "
                        f"{' x '.join(map(str, shape))} = {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_dataset(name: str, data_dir: str | None = None):
    """(x_train uint8 [N,H,W,1], y_train int64, x_test, y_test, class_names) of `name` (mnist, fashion-mnist).

    The four files are looked for in data_dir (or, without one, where the system package puts them), in its
    sub-folders named after the data set, and in torchvision's <Name>/raw layout."""
    if name not in SYSTEM_DIRS:
        raise ConfigError(f"unknown IDX data set {name!r}: expected one of {', '.join(SYSTEM_DIRS)}")
    folders = _candidates(name, data_dir)
    paths = {}
    for key, base in IDX_FILES.items():
        path = _find(folders, base)
        if path is None:
            hint = f"; install it with `{_APT[name]}` or give --data-dir" if _APT[name] else "; give --data-dir"
            raise DataError(f"{name}: {base}[.gz] not found in {', '.join(folders)}{hint}")
        paths[key] = path
    out = {}
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], 3)
        labels = read_idx(paths[f"{split}_labels"], 1)
        if len(images) != len(labels):
            raise DataError(f"{paths[f'{split}_images']} holds {len(images)} images but {paths[f'{split}_labels']} "
                            f"holds {len(labels)} labels: expected one label per image")
        if len(images) == 0:
            raise DataError(f"{paths[f'{split}_images']} holds no images")
        if labels.max() >= 10:
            raise DataError(f"{paths[f'{split}_labels']} has label {int(labels.max())}: expected labels 0..9")
        out[split] = images[..., None].copy(), labels.astype(np.int64)
    if out["train"][0].shape[1:] != out["test"][0].shape[1:]:
        raise DataError(f"{paths['train_images']} holds {out['train'][0].shape[1]}x{out['train'][0].shape[2]} images "
                        f"but {paths['test_images']} holds {out['test'][0].shape[1]}x{out['test'][0].shape[2]}: "
                        f"expected one size")
    names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    return (*out["train"], *out["test"], list(names))
