"""ltdd_triton::class_feature_stats: per-class count, sum and sum of squares of features [N, C, *spatial] per
channel.

The Triton twin of the native ltdd_fast::class_feature_stats (schema in csrc/ops.cpp). features is read as
[N, C, P] (P the product of the spatial sizes). One program owns one channel and a block of classes: it sweeps the
images in chunks of BLOCK_N, sums each image's plane lane-wise over chunks of BLOCK_P positions (reduced once per
image chunk, a fixed order), and adds the chunk's plane sums into its classes with an equality mask (as
_class_reduce does): no atomics, so the results are bit-identical from run to run. The program of channel 0 also
writes the counts. Outputs are in the accumulation type (fp64 for fp64, fp32 otherwise); an empty class gives 0.
"""
import math

import torch
from torch import Tensor

import triton
import triton.language as tl

from . import INTERPRET, acc_dtype, next_pow2, supports

# the [BLOCK_N, BLOCK_P] tile of features a program loads at a time; under the interpreter each tile is one numpy
# step and the programs run one after another, so wider tiles (65536: a [256, 128, 16, 16] batch in 1.6 s, against
# 4 s with 16384)
TILE = 65536 if INTERPRET else 4096
MAX_BLOCK_P = 1024
MAX_BLOCK_K = 64 if INTERPRET else 16


@triton.jit
def _class_feature_stats_kernel(x_ptr, classes_ptr, N, C, P, K, count_ptr, sum_ptr, sumsq_ptr,
                                ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_P: tl.constexpr):
    ch = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    ch_ok = ch < C  # C = 0 runs one program per class block, for the counts
    acc_sum = tl.zeros([BLOCK_K], ACC)
    acc_sumsq = tl.zeros([BLOCK_K], ACC)
    acc_count = tl.zeros([BLOCK_K], tl.int32)
    ps0 = tl.arange(0, BLOCK_P)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        base = (ns.to(tl.int64) * C + ch) * P
        lane_sum = tl.zeros([BLOCK_N, BLOCK_P], ACC)
        lane_sumsq = tl.zeros([BLOCK_N, BLOCK_P], ACC)
        for p0 in range(0, P, BLOCK_P):
            ps = p0 + ps0
            x = tl.load(x_ptr + base[:, None] + ps[None, :], mask=(n_ok & ch_ok)[:, None] & (ps < P)[None, :],
                        other=0.0).to(ACC)
            lane_sum += x
            lane_sumsq += x * x
        plane_sum = tl.sum(lane_sum, axis=1)
        plane_sumsq = tl.sum(lane_sumsq, axis=1)
        c = tl.load(classes_ptr + ns, mask=n_ok, other=-1)
        hit = (c[None, :] == ks[:, None]) & n_ok[None, :]
        acc_sum += tl.sum(tl.where(hit, plane_sum[None, :], 0.0), axis=1)
        acc_sumsq += tl.sum(tl.where(hit, plane_sumsq[None, :], 0.0), axis=1)
        acc_count += tl.sum(hit.to(tl.int32), axis=1)
    out = ks.to(tl.int64) * C + ch
    tl.store(sum_ptr + out, acc_sum, mask=k_ok & ch_ok)
    tl.store(sumsq_ptr + out, acc_sumsq, mask=k_ok & ch_ok)
    if ch == 0:
        tl.store(count_ptr + ks, (acc_count.to(tl.int64) * P).to(ACC), mask=k_ok)


def tiles(n: int, p: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_N, BLOCK_P): the classes a program owns, and the images and positions of a tile."""
    block_k = min(next_pow2(k), MAX_BLOCK_K)
    block_p = max(16, min(next_pow2(p), MAX_BLOCK_P))
    block_n = max(16, min(next_pow2(n), TILE // block_p))
    return block_k, block_n, block_p


def class_feature_stats(features: Tensor, classes: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count [K], sum [K, C], sumsq [K, C]) of features [N, C, ...] over each class's images, per channel, in the
    accumulation type; an empty class gives 0."""
    if features.dim() < 2 or not features.is_floating_point():
        raise ValueError(f"class_feature_stats: features must be a floating point [N, C, ...] tensor, got "
                         f"{features.dtype} {tuple(features.shape)}")
    if not supports(features.device):
        raise ValueError(f"class_feature_stats: the Triton kernels cannot run on {features.device} tensors in this "
                         f"process")
    n, c = features.shape[:2]
    if classes.dtype != torch.int64 or classes.shape != (n,) or classes.device != features.device:
        raise ValueError(f"class_feature_stats: classes must be an int64 tensor of shape ({n},) on "
                         f"{features.device}, got {classes.dtype} {tuple(classes.shape)} on {classes.device}")
    if num_classes <= 0:
        raise ValueError(f"class_feature_stats: num_classes must be positive, got {num_classes}")
    # a class outside [0, K) would only be left out (never written out of bounds); the check would synchronise an
    # accelerator, so it runs on CPU tensors only
    if classes.device.type == "cpu" and n:
        lo, hi = (int(x) for x in torch.aminmax(classes))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"class_feature_stats: classes must lie in [0, {num_classes}), got values in "
                             f"[{lo}, {hi}]")

    p = math.prod(features.shape[2:])
    x = features.detach().reshape(n, c, p).contiguous()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    k = int(num_classes)
    count = torch.empty(k, dtype=acc, device=x.device)
    total = torch.empty((k, c), dtype=acc, device=x.device)
    total_sq = torch.empty((k, c), dtype=acc, device=x.device)
    block_k, block_n, block_p = tiles(n, p, k)
    grid = (max(c, 1), triton.cdiv(k, block_k))
    _class_feature_stats_kernel[grid](
        x, classes.contiguous(), n, c, p, k, count, total, total_sq,
        ACC=acc_dtype(x.dtype), BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_P=block_p,
        num_warps=4 if block_n * block_p <= 2048 else 8)
    return count, total, total_sq
