"""ltdd_triton::class_grad_stats: per-class sum and max of per-image gradient L2 norms.

The Triton twin of the native ltdd_fast::class_grad_stats (schema in csrc/ops.cpp). grads [N, ...] is read as
[N, D]; one program takes ROWS images and sweeps their D entries in chunks, summing squares lane-wise and reducing
once at the end (a fixed order), then _class_reduce sums and maxes the norms per class without atomics, so the
results are bit-identical from run to run. An empty class gives 0 for both.
"""
import torch
from torch import Tensor

import triton
import triton.language as tl

from . import INTERPRET, acc_dtype, next_pow2, supports
from ._class_reduce import class_reduce

MAX_BLOCK_D = 4096
TILE = 16384 if INTERPRET else 4096


@triton.jit
def _row_norms_kernel(g_ptr, norms_ptr, N, D, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    base = rows.to(tl.int64)[:, None] * D
    cols0 = tl.arange(0, BLOCK_D)
    acc = tl.zeros([ROWS, BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        x = tl.load(g_ptr + base + cols[None, :], mask=row_ok[:, None] & (cols < D)[None, :], other=0.0).to(ACC)
        acc += x * x
    tl.store(norms_ptr + rows, tl.sqrt(tl.sum(acc, axis=1)), mask=row_ok)


def class_grad_stats(grads: Tensor, classes: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(norm_sum [K], norm_max [K]) of the per-image L2 norms of grads [N, ...] over each class, in grads' dtype;
    an empty class gives 0."""
    if grads.dim() < 1 or not grads.is_floating_point():
        raise ValueError(f"class_grad_stats: grads must be a floating point [N, ...] tensor, got {grads.dtype} "
                         f"{tuple(grads.shape)}")
    if not supports(grads.device):
        raise ValueError(f"class_grad_stats: the Triton kernels cannot run on {grads.device} tensors in this process")
    n = grads.shape[0]
    if classes.dtype != torch.int64 or classes.shape != (n,) or classes.device != grads.device:
        raise ValueError(f"class_grad_stats: classes must be an int64 tensor of shape ({n},) on {grads.device}, got "
                         f"{classes.dtype} {tuple(classes.shape)} on {classes.device}")
    if num_classes <= 0:
        raise ValueError(f"class_grad_stats: num_classes must be positive, got {num_classes}")
    # a class outside [0, K) would only be left out (never written out of bounds); the check would synchronise an
    # accelerator, so it runs on CPU tensors only
    if classes.device.type == "cpu" and n:
        lo, hi = (int(x) for x in torch.aminmax(classes))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"class_grad_stats: classes must lie in [0, {num_classes}), got values in [{lo}, {hi}]")

    d = grads[0].numel() if n else 0
    g = grads.detach().reshape(n, d).contiguous()
    norms = torch.zeros(n, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32, device=g.device)
    if n and d:
        block_d = max(16, min(next_pow2(d), MAX_BLOCK_D))
        rows = min(next_pow2(n), max(1, TILE // block_d))
        _row_norms_kernel[(triton.cdiv(n, rows),)](
            g, norms, n, d, ACC=acc_dtype(g.dtype), ROWS=rows, BLOCK_D=block_d,
            num_warps=4 if rows * block_d <= 1024 else 8)
    red = class_reduce(norms, classes, num_classes, g.dtype, maxes=True)
    return red.sums, red.maxes

