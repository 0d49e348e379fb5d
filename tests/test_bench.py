"""The benchmark's own pieces: the agreement check every row passes before it is timed, and the timer."""
import time

import pytest
import torch

from ltdd_fast.bench.operators import check_agreement as _check
from ltdd_fast.bench.timing import time_median


def test_check_catches_small_vectors_scaled_wrong():
    """v of param_distance has entries near 1e-6: an element-wise atol would pass any v of that size, the
    whole-tensor relative error does not (the first H100 run's autotuning bug scaled v several times)."""
    ref = 1e-6 * torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    _check("param_distance", 1, ref * (1 + 1e-7), ref)
    with pytest.raises(AssertionError, match=r"param_distance at size 1: output 0 .* relative error 9\.90e-01"):
        _check("param_distance", 1, ref * 0.01, ref)


def test_check_names_non_finite_and_shape_mismatch():
    ref = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1))
    bad = ref.clone()
    bad[7] = float("nan")
    for name in ("soft_ce_stats", "norm_relu_pool"):  # no outlier allowance hides a NaN
        with pytest.raises(AssertionError, match="non-finite"):
            _check(name, 1, (ref, bad), (ref, ref))
    with pytest.raises(AssertionError, match=r"shape \(10,\), the reference's \(11,\)"):
        _check("student_sgd_step", 1, ref[:10], ref[:11])


def test_check_allows_norm_relu_pool_a_few_kink_flips_only():
    """One element per million may take the ReLU's other branch in norm_relu_pool's gradient; more may not,
    and no other operator gets that allowance."""
    ref = torch.randn(3_000_000, generator=torch.Generator().manual_seed(2))
    flipped = ref.clone()
    flipped[[10, 20, 30]] += 50.0
    _check("norm_relu_pool", 1, flipped, ref)
    with pytest.raises(AssertionError):
        _check("class_grad_stats", 1, flipped, ref)
    flipped[40] += 50.0
    with pytest.raises(AssertionError, match="norm_relu_pool"):
        _check("norm_relu_pool", 1, flipped, ref)


def test_time_median_of_a_slow_call_times_each_call_once():
    calls = []
    t = time_median(lambda: (calls.append(1), time.sleep(0.002)), torch.device("cpu"), repeats=5, warmup=2)
    assert len(calls) == 7 and 0.002 <= t < 0.5


def test_time_median_of_a_fast_call_times_batches_of_calls():
    """A call far under a millisecond is timed in batches that span one, and the result is per call."""
    calls = []
    t = time_median(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=1)
    batch = (len(calls) - 2) // 3
    assert len(calls) == 2 + 3 * batch and batch >= 16  # warm-up, calibration call, 3 batches
    assert 0 < t < 1e-4
