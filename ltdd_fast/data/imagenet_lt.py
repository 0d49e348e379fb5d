"""ImageNet-LT: the standard ImageNet_LT_train.txt / _test.txt lists, or an ImageFolder tree."""
from __future__ import annotations

import os

import numpy as np

from ..errors import ConfigError, DataError
from .tiny import IMAGE_EXTENSIONS, load_rgb_images

TRAIN_LIST, TEST_LIST = "ImageNet_LT_train.txt", "ImageNet_LT_test.txt"


def is_lt_list_form(root: str) -> bool:
    """True when root holds the published list files, whose train split is already long-tailed."""
    return os.path.isfile(os.path.join(root, TRAIN_LIST)) and os.path.isfile(os.path.join(root, TEST_LIST))


def _read_list(root: str, name: str) -> tuple[list[str], np.ndarray]:
    path = os.path.join(root, name)
    paths, labels = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rel, _, label = line.strip().rpartition(" ")
            if not rel or not label.lstrip("-").isdigit() or int(label) < 0:
                raise DataError(f"{path} line {n}: expected 'relative/path.JPEG <label>', got {line.strip()!r}")
            paths.append(os.path.join(root, rel.strip()))
            labels.append(int(label))
    if not paths:
        raise DataError(f"{path} lists no images: expected lines 'relative/path.JPEG <label>'")
    return paths, np.asarray(labels, np.int64)


def _list_form(root: str, resolution: int):
    train_paths, y_train = _read_list(root, TRAIN_LIST)
    test_paths, y_test = _read_list(root, TEST_LIST)
    C = int(max(y_train.max(), y_test.max())) + 1
    counts = np.bincount(y_train, minlength=C)
    if (counts == 0).any():
        raise DataError(f"{TRAIN_LIST} has no images for label(s) {np.flatnonzero(counts == 0)[:10].tolist()}: "
                        f"expected every label 0..{C - 1} in the train list")
    # Head first: class 0 is the largest, ties keep label order.
    order = np.argsort(-counts, kind="stable")
    new_label = np.empty(C, np.int64)
    new_label[order] = np.arange(C)
    # Class names: the parent folder (wnid) of a train image of that class.
    folder = {}
    for p, y in zip(train_paths, y_train):
        folder.setdefault(int(y), os.path.basename(os.path.dirname(p)) or str(y))
    class_names = [folder[int(c)] for c in order]
    return (load_rgb_images(train_paths, resolution), new_label[y_train],
            load_rgb_images(test_paths, resolution), new_label[y_test], class_names)


def _folder_split(d: str) -> dict[str, list[str]]:
    return {c: sorted(os.path.join(d, c, f) for f in os.listdir(os.path.join(d, c))
                      if f.lower().endswith(IMAGE_EXTENSIONS))
            for c in sorted(os.listdir(d)) if os.path.isdir(os.path.join(d, c))}


def _folder_form(root: str, resolution: int):
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
        raise DataError(f"ImageNet-LT data not found in {root}: expected {TRAIN_LIST} and {TEST_LIST}, "
                        f"or an ImageFolder tree train/<class>/*.JPEG and val/<class>/*.JPEG")
    train, val = _folder_split(train_dir), _folder_split(val_dir)
    class_names = list(train)
    if not class_names:
        raise DataError(f"{train_dir} has no class folders: expected train/<class>/*.JPEG")
    empty = [c for c in class_names if not train[c]]
    if empty:
        raise DataError(f"class folder {os.path.join(train_dir, empty[0])} has no images (.JPEG/.jpg/.png)")
    unknown = sorted(set(val) - set(train))
    if unknown:
        raise DataError(f"{val_dir} has class folder {unknown[0]!r} that train/ lacks: expected the same classes")
    index = {c: i for i, c in enumerate(class_names)}
    train_paths = [p for c in class_names for p in train[c]]
    y_train = np.asarray([index[c] for c in class_names for _ in train[c]], np.int64)
    test_paths = [p for c in class_names for p in val.get(c, [])]
    y_test = np.asarray([index[c] for c in class_names for _ in val.get(c, [])], np.int64)
    return (load_rgb_images(train_paths, resolution), y_train,
            load_rgb_images(test_paths, resolution), y_test, class_names)


def read_imagenet_lt(root: str, resolution: int = 64):
    """(x_train uint8 [N,r,r,3], y_train int64, x_test, y_test, class_names), class 0 = head.

    List form (see is_lt_list_form) is already long-tailed and must not be subsampled again;
    the folder form is balanced and gets the exponential profile from the caller."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"resolution must be a positive integer, got {resolution!r}")
    root = str(root)
    if os.path.isfile(os.path.join(root, TRAIN_LIST)) != os.path.isfile(os.path.join(root, TEST_LIST)):
        raise DataError(f"ImageNet-LT list form in {root} is incomplete: expected both {TRAIN_LIST} and {TEST_LIST}")
    return _list_form(root, resolution) if is_lt_list_form(root) else _folder_form(root, resolution)
