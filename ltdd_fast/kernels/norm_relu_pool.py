"""Fused instance norm (affine) -> ReLU -> 2x2 average pool, the tail of every ConvNet block, in Triton.

The kernels and launchers (forward, backward) of the operators ltdd_fast/ops/norm_pool.py defines, with their
reference, fake and autograd formula: ltdd_triton::norm_relu_pool(x, weight, bias) -> (y, mean, rstd) and
ltdd_triton::norm_relu_pool_backward(dy, x, mean, rstd, weight, bias) -> (dx, dweight, dbias). y is
[B, C, H//2, W//2] in x's dtype; mean and rstd = 1/sqrt(biased var + eps) are per (b, c) plane, [B*C], in the
accumulation type (fp64 for fp64 x, fp32 otherwise). Odd sizes follow F.avg_pool2d(2), which floors: the last
row/column of an odd plane counts in the statistics but not in the pool.

dweight and dbias are reduced deterministically: the backward kernel writes one partial sum per plane into a
[B, C] buffer, which torch sums over B (no atomics).

Both kernels run one program per PLANES consecutive planes, a [PLANES, BLOCK] tile with per-row reductions (rows
past B*C masked): small planes (ConvNet's 4x4 to 32x32) are packed until a tile has about _TILE elements, so
that there are few programs; a plane of _MAX_BLOCK elements or more gets a program of its own, which walks it in
chunks of BLOCK.
"""
import torch

from . import AVAILABLE, INTERPRET, acc_dtype, next_pow2, supports

if AVAILABLE:
    import triton
    import triton.language as tl

# Largest block (columns of a tile) of one program; a bigger plane is walked in chunks. 64x64 (ConvNet at 64 px)
# fits in one block.
_MAX_BLOCK = 4096
# Elements of one program's [PLANES, BLOCK] tile: small planes are packed, PLANES of them (a power of two) per
# program, so that a tile holds about this many. On a GPU 4096 keeps 8 warps busy; under the interpreter each
# program costs some 15-20 ms whatever its tile's size (numpy does the elements), so there the tiles are big.
_TILE = 1 << 18 if INTERPRET else 4096


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_config(plane_numel: int, n_planes: int = 1) -> tuple[int, int, int]:
    """(BLOCK, PLANES, num_warps) for n_planes planes of plane_numel elements: BLOCK columns per plane (the
    whole plane up to _MAX_BLOCK, else chunks of it), PLANES planes per program (a power of two, no more than
    needed, so that PLANES * BLOCK is about _TILE; 1 for planes of _MAX_BLOCK elements and more)."""
    block = min(next_pow2(plane_numel), _MAX_BLOCK)
    planes = 1 if block >= _MAX_BLOCK else max(1, min(_TILE // block, next_pow2(n_planes)))
    num_warps = max(1, min(8, (planes * block) // 256))
    return block, planes, num_warps


if AVAILABLE:

    @triton.jit
    def _rsqrt(v, ACC: tl.constexpr):
        # tl.sqrt is the fast approximate square root for fp32; the statistics deserve the rounded one
        if ACC == tl.float64:
            return 1.0 / tl.sqrt(v)
        else:
            return tl.div_rn(1.0, tl.sqrt_rn(v))

    # Both kernels: one program per PLANES consecutive (b, c) planes (rows of a [PLANES, BLOCK] tile; rows past
    # the last plane are masked), each plane walked in chunks of BLOCK columns; reductions are per row.

    @triton.jit
    def _norm_relu_pool_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_planes, C, H, W, Ho, Wo,
                                   EPS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                                   PLANES: tl.constexpr):
        plane = tl.program_id(0) * PLANES + tl.arange(0, PLANES)
        live = plane < n_planes
        c = plane % C
        n = H * W
        x_plane = x_ptr + plane.to(tl.int64)[:, None] * n
        offs = tl.arange(0, BLOCK)[None, :]
        row_ok = live[:, None]

        # two passes over the plane (mean, then centred squares): exact enough whatever the mean's size
        acc = tl.zeros([PLANES, BLOCK], dtype=ACC)
        for start in range(0, n, BLOCK):
            idx = start + offs
            acc += tl.load(x_plane + idx, mask=row_ok & (idx < n), other=0.0).to(ACC)
        mean = tl.sum(acc, axis=1) / n
        mean_col = mean[:, None]
        acc = tl.zeros([PLANES, BLOCK], dtype=ACC)
        for start in range(0, n, BLOCK):
            idx = start + offs
            m = row_ok & (idx < n)
            d = tl.where(m, tl.load(x_plane + idx, mask=m, other=0.0).to(ACC) - mean_col, 0.0)
            acc += d * d
        rstd = _rsqrt(tl.sum(acc, axis=1) / n + EPS, ACC)

        scale = (tl.load(w_ptr + c, mask=live, other=0.0).to(ACC) * rstd)[:, None]
        shift = tl.load(b_ptr + c, mask=live, other=0.0).to(ACC)[:, None]
        p = Ho * Wo
        y_plane = y_ptr + plane.to(tl.int64)[:, None] * p
        for start in range(0, p, BLOCK):
            k = start + offs
            m = row_ok & (k < p)
            i = k // Wo
            j = k - i * Wo
            top = x_plane + (2 * i) * W + 2 * j
            # z = (x - mean) * scale + shift: the backward recomputes z with this same expression
            z00 = (tl.load(top, mask=m, other=0.0).to(ACC) - mean_col) * scale + shift
            z01 = (tl.load(top + 1, mask=m, other=0.0).to(ACC) - mean_col) * scale + shift
            z10 = (tl.load(top + W, mask=m, other=0.0).to(ACC) - mean_col) * scale + shift
            z11 = (tl.load(top + W + 1, mask=m, other=0.0).to(ACC) - mean_col) * scale + shift
            r = tl.maximum(z00, 0.0) + tl.maximum(z01, 0.0) + tl.maximum(z10, 0.0) + tl.maximum(z11, 0.0)
            tl.store(y_plane + k, (0.25 * r).to(y_ptr.dtype.element_ty), mask=m)
        tl.store(mean_ptr + plane, mean, mask=live)
        tl.store(rstd_ptr + plane, rstd, mask=live)

    @triton.jit
    def _centred_and_dz(x_plane, dy_plane, idx, m, mean, scale, shift, W, Ho, Wo, ACC: tl.constexpr):
        """One chunk of the backward's planes: x - mean, and dz = d(loss)/d(affine output) = relu'(z) * dy/4 on
        the pooled window (0 on a dropped odd row/column), z computed with the forward's expression."""
        row = idx // W
        col = idx - row * W
        pooled = m & (row < 2 * Ho) & (col < 2 * Wo)
        centred = tl.load(x_plane + idx, mask=m, other=0.0).to(ACC) - mean
        g = tl.load(dy_plane + (row // 2) * Wo + col // 2, mask=pooled, other=0.0).to(ACC)
        return centred, tl.where(centred * scale + shift > 0.0, 0.25 * g, 0.0)

    @triton.jit
    def _norm_relu_pool_bwd_kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, dx_ptr, dw_part_ptr,
                                   db_part_ptr, n_planes, C, H, W, Ho, Wo, ACC: tl.constexpr,
                                   BLOCK: tl.constexpr, PLANES: tl.constexpr):
        plane = tl.program_id(0) * PLANES + tl.arange(0, PLANES)
        live = plane < n_planes
        c = plane % C
        n = H * W
        x_plane = x_ptr + plane.to(tl.int64)[:, None] * n
        dx_plane = dx_ptr + plane.to(tl.int64)[:, None] * n
        dy_plane = dy_ptr + plane.to(tl.int64)[:, None] * (Ho * Wo)
        offs = tl.arange(0, BLOCK)[None, :]
        row_ok = live[:, None]
        mean = tl.load(mean_ptr + plane, mask=live, other=0.0)[:, None]
        rstd = tl.load(rstd_ptr + plane, mask=live, other=0.0)[:, None]
        w = tl.load(w_ptr + c, mask=live, other=0.0).to(ACC)[:, None]
        shift = tl.load(b_ptr + c, mask=live, other=0.0).to(ACC)[:, None]
        scale = w * rstd

        # pass 1: the plane's sums of dz and dz * xhat are dbias's and dweight's partials
        sum_dz = tl.zeros([PLANES, BLOCK], dtype=ACC)
        sum_dz_xhat = tl.zeros([PLANES, BLOCK], dtype=ACC)
        for start in range(0, n, BLOCK):
            idx = start + offs
            m = row_ok & (idx < n)
            centred, dz = _centred_and_dz(x_plane, dy_plane, idx, m, mean, scale, shift, W, Ho, Wo, ACC)
            sum_dz += dz
            sum_dz_xhat += dz * (centred * rstd)
        db = tl.sum(sum_dz, axis=1)
        dw = tl.sum(sum_dz_xhat, axis=1)
        tl.store(db_part_ptr + plane, db, mask=live)
        tl.store(dw_part_ptr + plane, dw, mask=live)

        # pass 2: dx = w * rstd * (dz - mean(dz) - xhat * mean(dz * xhat)), the instance-norm backward
        mean_dz = (db / n)[:, None]
        mean_dz_xhat = (dw / n)[:, None]
        for start in range(0, n, BLOCK):
            idx = start + offs
            m = row_ok & (idx < n)
            centred, dz = _centred_and_dz(x_plane, dy_plane, idx, m, mean, scale, shift, W, Ho, Wo, ACC)
            dx = scale * (dz - mean_dz - (centred * rstd) * mean_dz_xhat)
            tl.store(dx_plane + idx, dx.to(dx_ptr.dtype.element_ty), mask=m)


def check_inputs(x, weight, bias) -> None:
    """One-line errors for inputs the fused block cannot take."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"x: expected H >= 2 and W >= 2 for a 2x2 pool, got shape {tuple(x.shape)}")
    if not supports(x.device):
        raise ValueError(f"x: expected a tensor on a device the Triton kernels can run on here "
                         f"({'cpu, under the Triton interpreter' if AVAILABLE and supports(torch.device('cpu')) else 'cuda'}), "
                         f"got device {x.device}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name}: expected shape ({channels},) (one value per channel of x), got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: expected dtype {x.dtype} (x's dtype), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's device), got {t.device}")


def forward(x, weight, bias, eps):
    """(y [B, C, H//2, W//2] in x's dtype, mean [B*C], rstd [B*C] in the accumulation type): the fused forward of
    ltdd_triton::norm_relu_pool (ltdd_fast/ops/norm_pool.py), eps the instance norm's."""
    check_inputs(x, weight, bias)
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    b, c, h, w = x.shape
    y = x.new_empty((b, c, h // 2, w // 2))
    mean = x.new_empty((b * c,), dtype=_stats_dtype(x.dtype))
    rstd = torch.empty_like(mean)
    if b * c == 0:
        return y, mean, rstd
    block, planes, num_warps = _launch_config(h * w, b * c)
    _norm_relu_pool_fwd_kernel[(triton.cdiv(b * c, planes),)](
        x, weight, bias, y, mean, rstd, b * c, c, h, w, h // 2, w // 2,
        EPS=eps, ACC=acc_dtype(x.dtype), BLOCK=block, PLANES=planes, num_warps=num_warps)
    return y, mean, rstd


def backward(dy, x, mean, rstd, weight, bias):
    """(dx, dweight, dbias): the fused first-order backward of ltdd_triton::norm_relu_pool_backward."""
    b, c, h, w = x.shape
    if tuple(dy.shape) != (b, c, h // 2, w // 2) or dy.dtype != x.dtype:
        raise ValueError(f"dy: expected shape {(b, c, h // 2, w // 2)} and dtype {x.dtype}, "
                         f"got {tuple(dy.shape)} and {dy.dtype}")
    stats = _stats_dtype(x.dtype)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if tuple(t.shape) != (b * c,) or t.dtype != stats:
            raise ValueError(f"{name}: expected shape ({b * c},) and dtype {stats}, got {tuple(t.shape)} and {t.dtype}")
    dy, x, weight, bias = dy.contiguous(), x.contiguous(), weight.contiguous(), bias.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    dx = torch.empty_like(x)
    dw_part = x.new_empty((b, c), dtype=stats)
    db_part = torch.empty_like(dw_part)
    if b * c > 0:
        block, planes, num_warps = _launch_config(h * w, b * c)
        _norm_relu_pool_bwd_kernel[(triton.cdiv(b * c, planes),)](
            dy, x, mean, rstd, weight, bias, dx, dw_part, db_part, b * c, c, h, w, h // 2, w // 2,
            ACC=acc_dtype(x.dtype), BLOCK=block, PLANES=planes, num_warps=num_warps)
    # over the batch, in a fixed order
    return dx, dw_part.sum(dim=0).to(weight.dtype), db_part.sum(dim=0).to(weight.dtype)
