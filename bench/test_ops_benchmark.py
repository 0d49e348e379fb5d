"""pytest-benchmark view of `ltdd bench ops`: every operator and size of ltdd_fast.bench.operators.CASES, its reference
and each fast backend this machine can run, grouped so that pytest-benchmark prints them side by side.

    pip install pytest-benchmark
    BENCH_DEVICE=cuda pytest bench --benchmark-group-by=param:case     # (default device: cpu)

Each fast op is checked against its reference before it is timed. Triton on a CPU runs in its interpreter
and is skipped here: its times mean nothing.
"""
import os

import pytest
import torch

from ltdd_fast import ops
from ltdd_fast.bench import operators as bench

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
QUICK = os.environ.get("BENCH_QUICK", "0") not in ("", "0")


def _cases():
    for op, (_, sizes, quick_sizes) in bench.CASES.items():
        for size in quick_sizes if QUICK else sizes:
            yield op, size


def _runnable(backend, op):
    if backend == "reference":
        return True
    if backend == "triton" and DEVICE.type == "cpu":
        return False
    return op in ops.dispatch.has(backend) and ops.backend_problem(backend, DEVICE) is None


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1] if isinstance(c[1], tuple) else (c[1],)))}")
def test_op(benchmark, case, backend):
    op, size = case
    if not _runnable(backend, op):
        pytest.skip(f"{backend} cannot run {op} on {DEVICE.type} here")
    fast, ref, nbytes = bench.CASES[op][0](size, DEVICE)
    fn = ref if backend == "reference" else (lambda: fast(backend))
    if backend != "reference":
        bench.check_agreement(op, size, fn(), ref())

    def timed():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return out
    benchmark.extra_info.update(op=op, size=list(size) if isinstance(size, tuple) else [size], bytes=nbytes)
    benchmark(timed)
