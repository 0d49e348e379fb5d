"""The scikit-learn handwritten digits: the one real image set present on every machine."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def read_digits(test_per_class: int = 50, seed: int = 0):
    """(x_train uint8 [N,8,8,1], y_train int64, x_test, y_test, class_names).

    test_per_class images of every class, chosen with `seed`, form a balanced test set;
    the remaining images are the train pool."""
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are integers 0..16.
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    smallest = int(np.bincount(y).min())
    if not 0 < test_per_class < smallest:
        raise ConfigError(f"test_per_class must be between 1 and {smallest - 1} "
                          f"(the smallest digit class has {smallest} images), got {test_per_class!r}")
    rng = np.random.default_rng(seed)
    test = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), test_per_class, replace=False)
                                   for c in range(10)]))
    train = np.setdiff1d(np.arange(len(y)), test)
    return x[train], y[train], x[test], y[test], [str(c) for c in range(10)]
