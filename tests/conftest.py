import pytest

from ltdd_fast.data import load_dataset


@pytest.fixture(scope="session")
def digits():
    """Digits-LT at imbalance factor 50 (class 0 has 124 training images, class 9 has 2)."""
    return load_dataset("digits", imbalance_factor=50, seed=0)
