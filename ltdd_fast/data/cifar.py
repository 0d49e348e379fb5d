"""CIFAR-10 / CIFAR-100 from the python pickle batches (cifar-10-batches-py, cifar-100-python)."""
from __future__ import annotations

import os
import pickle

import numpy as np

from ..errors import ConfigError, DataError

# The batches hold only dicts, lists, bytes and numpy arrays; refusing every other
# global keeps a foreign pickle from running code while still reading py2 and py3 dumps.
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes in protocol 0-2 pickles written by python 3
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 renamed core; avoid its shim warning
        return super().find_class(module, name)


def _load_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise DataError(f"{path} is not a readable CIFAR pickle: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR pickle: expected a dict, got {type(obj).__name__}")
    # Files re-pickled under python 3 may carry str keys; the originals use bytes.
    return {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}


def _batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path)
    if b"data" not in d or label_key not in d:
        raise DataError(f"{path} lacks the keys 'data' and '{label_key.decode()}' of a CIFAR batch")
    data = np.asarray(d[b"data"])
    try:
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: '{label_key.decode()}' must be a list of integer class indices, got "
                        f"{str(d[label_key])[:40]!r}") from None
    if labels.ndim != 1 or len(labels) == 0:
        raise DataError(f"{path} holds no images: expected a CIFAR batch of [n, 3072] uint8 rows and n labels")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected uint8 data of shape [n, 3072] and n labels, "
                        f"got data {data.dtype} {data.shape} and {len(labels)} labels")
    # Rows are channel-planar (1024 R, 1024 G, 1024 B); images are returned HWC.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _names(path: str, key: bytes, num_classes: int) -> list[str]:
    if not os.path.isfile(path):
        return [str(c) for c in range(num_classes)]
    names = _load_pickle(path).get(key)
    if names is None or len(names) != num_classes:
        raise DataError(f"{path}: expected '{key.decode()}' with {num_classes} class names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_cifar(root: str, num_classes: int):
    """(x_train uint8 [N,32,32,3], y_train int64 [N], x_test, y_test, class_names)."""
    if num_classes == 10:
        sub, train_files, test_file, meta, label_key, name_key = (
            "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
            "batches.meta", b"labels", b"label_names")
        expected = "data_batch_1..5 and test_batch (the python pickle version, cifar-10-batches-py)"
    elif num_classes == 100:
        sub, train_files, test_file, meta, label_key, name_key = (
            "cifar-100-python", ["train"], "test", "meta", b"fine_labels", b"fine_label_names")
        expected = "train and test (the python pickle version, cifar-100-python)"
    else:
        raise ConfigError(f"CIFAR num_classes must be 10 or 100, got {num_classes!r}")
    name = f"CIFAR-{num_classes}"
    root = str(root)
    candidates = [os.path.join(root, sub), root]
    folder = next((d for d in candidates if all(os.path.isfile(os.path.join(d, f)) for f in train_files + [test_file])), None)
    if folder is None:
        raise DataError(f"{name} data not found in {root}: expected {expected}")
    parts = [_batch(os.path.join(folder, f), label_key) for f in train_files]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _batch(os.path.join(folder, test_file), label_key)
    for split, y in (("train", y_train), ("test", y_test)):
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"{name} {split} labels in {folder} must lie in 0..{num_classes - 1}, "
                            f"found {y.min()}..{y.max()}")
    return x_train, y_train, x_test, y_test, _names(os.path.join(folder, meta), name_key, num_classes)
