"""ltdd_triton::soft_ce_stats: the DAM soft-label cross-entropy with both gradients and per-class statistics.

The Triton twin of the native ltdd_fast::soft_ce_stats (schema and formulas in csrc/ops.cpp). With
p = softmax(target_logits), q = softmax(logits), w = class_weights (None = 1) and a = -log q:
    row loss l_i = sum_c w_c p_ic a_ic,  loss = (1/B) sum_i l_i,
    grad_logits = (1/B) (q S - w p) with S = sum_c w_c p_c,  grad_target = (1/B) p (w a - l).
One program takes a tile of ROWS rows by BLOCK_C columns. When a row fits in one tile it is read once; otherwise
three passes over its chunks: online max and sum of exp of both softmaxes, then S and l, then the gradients with
the row's squared gradient norm. Per-row loss and squared norm go to a workspace that _class_reduce sums per class
(and over the batch, for the loss) in a fixed order, so every output is bit-identical from run to run.
"""
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from . import INTERPRET, acc_dtype, next_pow2, supports
from ._class_reduce import class_reduce

# widest chunk of a row (columns) and the tile of one program (rows x columns)
MAX_BLOCK_C = 4096
TILE = 8192 if INTERPRET else 4096


@triton.jit
def _chunk(z_ptr, t_ptr, w_ptr, base, cols, C, HAS_W: tl.constexpr, ACC: tl.constexpr):
    """Columns `cols` of a tile's rows for passes 2 and 3: (column mask, offsets, z, t, w [1, BLOCK_C]); padding
    columns read z = 0, t = -inf (so p = 0) and w = 0."""
    c_ok = cols < C
    offs = base + cols[None, :]
    z = tl.load(z_ptr + offs, mask=c_ok[None, :], other=0.0).to(ACC)
    t = tl.load(t_ptr + offs, mask=c_ok[None, :], other=float("-inf")).to(ACC)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(ACC)[None, :]
    else:
        w = tl.where(c_ok, tl.full([], 1.0, ACC), 0.0)[None, :]
    return c_ok, offs, z, t, w


@triton.jit
def _soft_ce_rows_kernel(z_ptr, t_ptr, w_ptr, gz_ptr, gt_ptr, row_loss_ptr, row_sq_ptr, B, C,
                         HAS_W: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                         ONE_CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    # rows past the batch read the last row (finite numbers, no masked -inf rows) and write nothing
    base = tl.minimum(rows, B - 1).to(tl.int64)[:, None] * C
    cols0 = tl.arange(0, BLOCK_C)
    one = tl.full([], 1.0, ACC)
    inv_b = one / B
    out_ty = gz_ptr.dtype.element_ty

    if ONE_CHUNK:
        # the whole row is in registers: read once
        c_ok = cols0 < C
        offs = base + cols0[None, :]
        z = tl.load(z_ptr + offs, mask=c_ok[None, :], other=float("-inf")).to(ACC)
        t = tl.load(t_ptr + offs, mask=c_ok[None, :], other=float("-inf")).to(ACC)
        if HAS_W:
            w = tl.load(w_ptr + cols0, mask=c_ok, other=0.0).to(ACC)[None, :]
        else:
            w = tl.where(c_ok, one, 0.0)[None, :]
        zs = z - tl.max(z, axis=1)[:, None]
        ez = tl.exp(zs)
        sum_z = tl.sum(ez, axis=1)
        et = tl.exp(t - tl.max(t, axis=1)[:, None])
        p = et * (one / tl.sum(et, axis=1))[:, None]
        # a = -log q = log sum exp(z - max) - (z - max): exact to its own scale even for large logits
        # (0 on padding columns, where it would be +inf and meet p = 0)
        a = tl.where(c_ok[None, :], tl.log(sum_z)[:, None] - zs, 0.0)
        wp = w * p
        s_wp = tl.sum(wp, axis=1)
        loss = tl.sum(wp * a, axis=1)
        q = ez * (one / sum_z)[:, None]
        gz = (q * s_wp[:, None] - wp) * inv_b
        gt = p * (w * a - loss[:, None]) * inv_b
        st_ok = row_ok[:, None] & c_ok[None, :]
        tl.store(gz_ptr + offs, gz.to(out_ty), mask=st_ok)
        tl.store(gt_ptr + offs, gt.to(out_ty), mask=st_ok)
        sq = tl.sum(gz * gz, axis=1)
    else:
        # pass 1: online max and sum of exp of z and t
        m_z = tl.full([ROWS], float("-inf"), ACC)
        m_t = tl.full([ROWS], float("-inf"), ACC)
        s_z = tl.zeros([ROWS], ACC)
        s_t = tl.zeros([ROWS], ACC)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            c_ok = cols < C
            offs = base + cols[None, :]
            z = tl.load(z_ptr + offs, mask=c_ok[None, :], other=float("-inf")).to(ACC)
            t = tl.load(t_ptr + offs, mask=c_ok[None, :], other=float("-inf")).to(ACC)
            # every chunk holds a real column, so the new maxima are finite
            new_z = tl.maximum(m_z, tl.max(z, axis=1))
            new_t = tl.maximum(m_t, tl.max(t, axis=1))
            s_z = s_z * tl.exp(m_z - new_z) + tl.sum(tl.exp(z - new_z[:, None]), axis=1)
            s_t = s_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(t - new_t[:, None]), axis=1)
            m_z = new_z
            m_t = new_t
        log_sum_z = tl.log(s_z)
        inv_sum_z = one / s_z
        inv_sum_t = one / s_t

        # pass 2: S = sum_c w_c p_c and the row loss, lane-wise, reduced after the loop
        s_acc = tl.zeros([ROWS, BLOCK_C], ACC)
        l_acc = tl.zeros([ROWS, BLOCK_C], ACC)
        for c0 in range(0, C, BLOCK_C):
            c_ok, offs, z, t, w = _chunk(z_ptr, t_ptr, w_ptr, base, c0 + cols0, C, HAS_W, ACC)
            wp = w * (tl.exp(t - m_t[:, None]) * inv_sum_t[:, None])
            a = log_sum_z[:, None] - (z - m_z[:, None])
            s_acc += wp
            l_acc += wp * a  # masked columns: wp = 0 and a finite
        s_wp = tl.sum(s_acc, axis=1)
        loss = tl.sum(l_acc, axis=1)

        # pass 3: the gradients and the row's squared logit-gradient norm
        sq_acc = tl.zeros([ROWS, BLOCK_C], ACC)
        for c0 in range(0, C, BLOCK_C):
            c_ok, offs, z, t, w = _chunk(z_ptr, t_ptr, w_ptr, base, c0 + cols0, C, HAS_W, ACC)
            p = tl.exp(t - m_t[:, None]) * inv_sum_t[:, None]
            zs = z - m_z[:, None]
            q = tl.where(c_ok[None, :], tl.exp(zs) * inv_sum_z[:, None], 0.0)
            a = log_sum_z[:, None] - zs
            wp = w * p
            gz = (q * s_wp[:, None] - wp) * inv_b
            gt = p * (w * a - loss[:, None]) * inv_b
            st_ok = row_ok[:, None] & c_ok[None, :]
            tl.store(gz_ptr + offs, gz.to(out_ty), mask=st_ok)
            tl.store(gt_ptr + offs, gt.to(out_ty), mask=st_ok)
            sq_acc += gz * gz
        sq = tl.sum(sq_acc, axis=1)

    tl.store(row_loss_ptr + rows, loss, mask=row_ok)
    tl.store(row_sq_ptr + rows, sq, mask=row_ok)


def _check(logits, target_logits, class_weights, classes, num_classes):
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"soft_ce_stats: logits must be [B, C] with B, C > 0, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"soft_ce_stats: logits must be floating point, got {logits.dtype}")
    if not supports(logits.device):
        raise ValueError(f"soft_ce_stats: the Triton kernels cannot run on {logits.device} tensors in this process")
    if (target_logits.shape != logits.shape or target_logits.dtype != logits.dtype
            or target_logits.device != logits.device):
        raise ValueError(f"soft_ce_stats: target_logits must match logits ({tuple(logits.shape)}, {logits.dtype}, "
                         f"{logits.device}), got ({tuple(target_logits.shape)}, {target_logits.dtype}, "
                         f"{target_logits.device})")
    b, c = logits.shape
    if class_weights is not None and (class_weights.shape != (c,) or not class_weights.is_floating_point()
                                      or class_weights.device != logits.device):
        raise ValueError(f"soft_ce_stats: class_weights must be a floating point tensor of shape ({c},) on "
                         f"{logits.device}, got {class_weights.dtype} {tuple(class_weights.shape)} on "
                         f"{class_weights.device}")
    if classes.dtype != torch.int64 or classes.shape != (b,) or classes.device != logits.device:
        raise ValueError(f"soft_ce_stats: classes must be an int64 tensor of shape ({b},) on {logits.device}, got "
                         f"{classes.dtype} {tuple(classes.shape)} on {classes.device}")
    if num_classes <= 0:
        raise ValueError(f"soft_ce_stats: num_classes must be positive, got {num_classes}")
    # a class outside [0, K) would only be left out of the statistics (never written out of bounds); on an
    # accelerator the check would synchronise every call, so it runs on CPU tensors only
    if classes.device.type == "cpu":
        lo, hi = (int(x) for x in torch.aminmax(classes))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"soft_ce_stats: classes must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


def soft_ce_stats(logits: Tensor, target_logits: Tensor, class_weights: Optional[Tensor], classes: Tensor,
                  num_classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [], grad_logits [B,C], grad_target [B,C], class_loss_sum [K], class_count [K] int64,
    class_grad_norm [K]) as ltdd_fast::soft_ce_stats; statistics in the logits' dtype, an empty class gives 0."""
    _check(logits, target_logits, class_weights, classes, num_classes)
    z = logits.detach().contiguous()
    t = target_logits.detach().contiguous()
    # weights take the logits' dtype first, as the reference's class_weights.to(per_class) does
    w = class_weights.detach().to(z.dtype).contiguous() if class_weights is not None else None
    b, c = z.shape
    grad_logits = torch.empty_like(z)
    grad_target = torch.empty_like(t)
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    row_loss = torch.empty(b, dtype=work, device=z.device)
    row_sq = torch.empty(b, dtype=work, device=z.device)

    block_c = min(next_pow2(c), MAX_BLOCK_C)
    rows = min(next_pow2(b), max(1, TILE // block_c))
    grid = (triton.cdiv(b, rows),)
    _soft_ce_rows_kernel[grid](
        z, t, w if w is not None else z, grad_logits, grad_target, row_loss, row_sq, b, c,
        HAS_W=w is not None, ACC=acc_dtype(z.dtype), ROWS=rows, BLOCK_C=block_c, ONE_CHUNK=c <= block_c,
        num_warps=4 if rows * block_c <= 1024 else 8)

    red = class_reduce(row_loss, classes, num_classes, z.dtype, values2=row_sq, sqrt2=True, counts=True,
                       mean=True)
    return red.mean, grad_logits, grad_target, red.sums, red.counts, red.sums2

