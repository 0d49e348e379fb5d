"""The exponential long-tail profile and the seeded choice of which images each class keeps."""
from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError, DataError


def _check_imbalance_factor(imbalance_factor: float) -> float:
    beta = float(imbalance_factor)
    if not math.isfinite(beta) or beta < 1:
        raise ConfigError(f"imbalance_factor must be a finite number >= 1 (n_head / n_tail), got {imbalance_factor!r}")
    return beta


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """n_c = floor(n_max * beta ** (-c / (C - 1))) for c = 0 (head) .. C - 1 (tail)."""
    beta = _check_imbalance_factor(imbalance_factor)
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes!r}")
    if int(n_max) < 0:
        raise ConfigError(f"n_max must be >= 0, got {n_max!r}")
    n_max, num_classes = int(n_max), int(num_classes)
    if num_classes == 1:
        return [n_max]
    # The epsilon keeps products that are mathematically whole (e.g. 5000 / 100 = 50)
    # from flooring one below through float error.
    return [int(math.floor(n_max * beta ** (-c / (num_classes - 1)) + 1e-9)) for c in range(num_classes)]


def long_tail_indices(labels, imbalance_factor: float, seed: int, n_max: int | None = None,
                      num_classes: int | None = None) -> np.ndarray:
    """Sorted indices into `labels` of a long-tailed subset (class 0 = head).

    n_max defaults to the smallest class's size, so every class can supply its count.
    num_classes defaults to max(label) + 1; pass it to catch a class with no images at all.
    """
    beta = _check_imbalance_factor(imbalance_factor)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a non-empty 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.min() < 0:
        raise DataError(f"labels must be class indices >= 0, found {labels.min()}")
    C = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    if labels.max() >= C:
        raise DataError(f"labels must be < num_classes={C}, found {labels.max()}")
    available = np.bincount(labels, minlength=C)
    if (available == 0).any():
        c = int(np.flatnonzero(available == 0)[0])
        raise DataError(f"class {c} has no images: every class 0..{C - 1} needs at least one")
    if n_max is None:
        n_max = int(available.min())
    counts = long_tail_counts(n_max, C, beta)
    rng = np.random.default_rng(seed)
    chosen = []
    for c, n_c in enumerate(counts):
        pool = np.flatnonzero(labels == c)
        if pool.size < n_c:
            raise DataError(f"class {c} has {pool.size} images but the long-tail profile "
                            f"(n_max={n_max}, imbalance_factor={beta:g}) needs {n_c}")
        if n_c == 0:
            raise ConfigError(f"imbalance_factor={beta:g} with n_max={n_max} leaves class {c} with no images: "
                              f"expected imbalance_factor <= n_max")
        chosen.append(rng.choice(pool, size=n_c, replace=False))
    return np.sort(np.concatenate(chosen))
