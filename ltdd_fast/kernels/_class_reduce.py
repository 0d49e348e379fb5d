"""Deterministic per-class segmented reduction, shared by soft_ce_stats and class_grad_stats.

Given per-row values [N] (in the accumulation type) and each row's class [N] (int64), produce for K classes the
sum of the values (and optionally: a second value vector's sum, the row count, the max, and the mean over all
rows). One program owns a block of classes (tiles(): small blocks, so many programs, on a GPU) and sweeps all
rows in chunks, matching rows to its classes with an equality mask: no atomics, so each class is summed in the
same order on every run and the results are bit-identical from run to run. Every program reads all N rows,
which is cheap at the sizes these statistics see (N is a batch, K a class count). A row whose class lies
outside [0, K) matches no program: it is left out of the per-class results (never written out of bounds) but
still counts in the mean.
"""
from typing import NamedTuple, Optional

import torch

import triton
import triton.language as tl

from . import INTERPRET, acc_dtype, next_pow2


@triton.jit
def _class_reduce_kernel(values_ptr, values2_ptr, classes_ptr, N, K,
                         sum_ptr, sum2_ptr, count_ptr, max_ptr, mean_ptr,
                         HAS_SUM2: tl.constexpr, SQRT_SUM2: tl.constexpr, HAS_COUNT: tl.constexpr,
                         HAS_MAX: tl.constexpr, HAS_MEAN: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    ks = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    acc_sum = tl.zeros([BLOCK_K], ACC)
    acc_sum2 = tl.zeros([BLOCK_K], ACC)
    acc_count = tl.zeros([BLOCK_K], tl.int32)
    acc_max = tl.full([BLOCK_K], float("-inf"), ACC)
    acc_total = tl.zeros([BLOCK_N], ACC)
    for start in range(0, N, BLOCK_N):
        ns = start + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        v = tl.load(values_ptr + ns, mask=n_ok, other=0.0).to(ACC)
        c = tl.load(classes_ptr + ns, mask=n_ok, other=-1)
        hit = (c[None, :] == ks[:, None]) & n_ok[None, :]
        acc_sum += tl.sum(tl.where(hit, v[None, :], 0.0), axis=1)
        # the count is needed for the max of an empty class even when not returned
        acc_count += tl.sum(hit.to(tl.int32), axis=1)
        if HAS_SUM2:
            v2 = tl.load(values2_ptr + ns, mask=n_ok, other=0.0).to(ACC)
            acc_sum2 += tl.sum(tl.where(hit, v2[None, :], 0.0), axis=1)
        if HAS_MAX:
            acc_max = tl.maximum(acc_max, tl.max(tl.where(hit, v[None, :], float("-inf")), axis=1))
        if HAS_MEAN:
            acc_total += v  # lane-wise, reduced once after the loop (a fixed order)
    out_ty = sum_ptr.dtype.element_ty
    tl.store(sum_ptr + ks, acc_sum.to(out_ty), mask=k_ok)
    if HAS_SUM2:
        if SQRT_SUM2:
            acc_sum2 = tl.sqrt(acc_sum2)
        tl.store(sum2_ptr + ks, acc_sum2.to(sum2_ptr.dtype.element_ty), mask=k_ok)
    if HAS_COUNT:
        tl.store(count_ptr + ks, acc_count.to(count_ptr.dtype.element_ty), mask=k_ok)
    if HAS_MAX:
        # an empty class gives 0; a NaN among a class's values (which max may drop) shows through its sum
        acc_max = tl.where(acc_count > 0, acc_max, 0.0)
        acc_max = tl.where(acc_sum != acc_sum, acc_sum, acc_max)
        tl.store(max_ptr + ks, acc_max.to(max_ptr.dtype.element_ty), mask=k_ok)
    if HAS_MEAN:
        if pid == 0:
            one = tl.full([], 1.0, ACC)
            tl.store(mean_ptr, (tl.sum(acc_total, axis=0) * (one / N)).to(mean_ptr.dtype.element_ty))


# a GPU's programs: enough that the class blocks spread over an H100's 132 multiprocessors
PROGRAMS = 128


def tiles(n: int, k: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_N): each program owns BLOCK_K classes and matches them against BLOCK_N rows a chunk.

    Every program sweeps all n rows, so on a GPU the classes are split finely enough for about PROGRAMS programs
    (at most 64 and at least 4 classes each): 1000 classes take 125 programs of 8 (64 classes each left 16
    programs, each sweeping all rows in 64-row chunks). The tile stays at 4096 elements. Under the interpreter
    each chunk is one numpy step and the programs run one after another, so wide tiles and few programs."""
    if interpret:
        block_k, tile = min(next_pow2(k), 64), 16384
    else:
        block_k, tile = min(next_pow2(k), max(4, min(64, next_pow2(triton.cdiv(k, PROGRAMS))))), 4096
    return block_k, max(16, min(next_pow2(n), tile // block_k))


class ClassReduction(NamedTuple):
    sums: torch.Tensor  # [K]
    sums2: Optional[torch.Tensor]  # [K] (their square roots if asked)
    counts: Optional[torch.Tensor]  # [K] int64
    maxes: Optional[torch.Tensor]  # [K]
    mean: Optional[torch.Tensor]  # []


def class_reduce(values: torch.Tensor, classes: torch.Tensor, num_classes: int, out_dtype: torch.dtype, *,
                 values2: Optional[torch.Tensor] = None, sqrt2: bool = False, counts: bool = False,
                 maxes: bool = False, mean: bool = False) -> ClassReduction:
    """Per-class sum of `values` [N] over the rows of each class (classes [N] int64, K = num_classes), in one
    deterministic launch; optionally the per-class sum of `values2` [N] (its square root if sqrt2), the row count
    (int64), the max (0 for an empty class) and the mean of `values` over all N rows (a 0-d tensor).

    values and values2 hold fp32 or fp64 (the accumulation type, fp64 when values is fp64); the results have
    out_dtype."""
    n = values.shape[0]
    k = int(num_classes)
    dev = values.device
    values = values.contiguous()
    classes = classes.contiguous()
    acc = acc_dtype(values.dtype)
    out_sum = torch.empty(k, dtype=out_dtype, device=dev)
    out_sum2 = torch.empty(k, dtype=out_dtype, device=dev) if values2 is not None else None
    out_count = torch.empty(k, dtype=torch.int64, device=dev) if counts else None
    out_max = torch.empty(k, dtype=out_dtype, device=dev) if maxes else None
    out_mean = torch.empty((), dtype=out_dtype, device=dev) if mean else None
    if values2 is not None:
        values2 = values2.contiguous()
    block_k, block_n = tiles(n, k, INTERPRET)
    grid = (triton.cdiv(k, block_k),)
    dummy = out_sum  # stands in for the pointers a configuration does not use (never read or written)
    _class_reduce_kernel[grid](
        values, values2 if values2 is not None else values, classes, n, k,
        out_sum, out_sum2 if out_sum2 is not None else dummy, out_count if counts else dummy,
        out_max if maxes else dummy, out_mean if mean else dummy,
        HAS_SUM2=values2 is not None, SQRT_SUM2=bool(sqrt2), HAS_COUNT=bool(counts), HAS_MAX=bool(maxes),
        HAS_MEAN=bool(mean), ACC=acc, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return ClassReduction(out_sum, out_sum2, out_count, out_max, out_mean)

