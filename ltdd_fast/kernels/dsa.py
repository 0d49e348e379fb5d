"""ltdd_triton::dsa: the whole DSA chain of one call (or its transpose) on a batch of images, in one launch.

The Triton twin of the native ltdd_fast::dsa (schema in csrc/ops.cpp, arithmetic in csrc/dsa_chain.h, which this
file follows step by step): the ops of ltdd_fast/dsa_chain.py that flags [8] int32 switch on (brightness,
saturation, contrast, crop, cutout, flip, scale, rotate: dsa_chain.OPS's order), each image with its row of draws
in values [B, 11] (dsa_chain.PACKED_COLUMNS). The chain is affine in the image, y = A x (+ brightness's constant);
transpose=True computes x_bar = A^T y_bar, its vector-Jacobian product. ltdd_fast/ops/fused_dsa.py defines the
operator and its autograd formula (the gradient of the chain is its transpose and vice versa).

One program per image (grid (B,)); flags and draws are read in the kernel, so a call never synchronises with the
host. An op that is off is the identity exactly, not up to rounding: its spatial stage is one tap of weight 1 at
the same pixel, its colour step is left out by tl.where.
- Every output pixel of the chain reads at most 16 pixels of the colour-adjusted image: rotate samples its input
  bilinearly at 4 corners, each of which scale samples at 4 more (grid_sample, align_corners=True, zero
  padding); flip, cutout and crop then move or drop each tap. Rotate and scale run 4 taps each only when on
  (runtime loop bounds).
- Forward: if contrast is on, a first pass over the image sums the brightened and saturated image (contrast's
  centre); then each block of output pixels sums weight * colour(x[:, q]) over its taps, all channels at once (a
  [CB, BLOCK] tile: saturation needs each tap's channel mean), in the accumulation type.
- Transpose: the program zeroes its image's buffer (the output itself, or an fp32 workspace for fp16/bf16 x),
  scatters the output gradient into it through the same taps with atomic adds, then applies the colour
  transpose in place (it needs the buffer's total and each pixel's channel sum). The atomics make the fp32 sums'
  order, and so their last bits, vary from run to run on a GPU (the CPU kernel's are serial and fixed).
Computed in fp32 (fp64 for fp64 x); the output is a new contiguous tensor of x's shape and dtype.
"""
import math

import torch
from torch import Tensor

import triton
import triton.language as tl

from . import INTERPRET, acc_dtype, next_pow2, supports

NUM_COLUMNS = 11  # dsa_chain.PACKED_WIDTH
NUM_OPS = 8  # len(dsa_chain.OPS)
# Elements of a program's [CB, BLOCK] tile (CB = channels rounded up to a power of two, BLOCK pixels). Under the
# interpreter every operation costs the same whatever its size (numpy does the elements), so there a tile holds a
# whole CIFAR-sized image; on a GPU one program per image walks it in tiles that keep 4 warps busy.
TILE = 1 << 16 if INTERPRET else 1024
DEG2RAD = tl.constexpr(math.pi / 180.0)  # a global a kernel may read


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    # fp32 `/` is Triton's approximate division on a GPU; the coordinates and means deserve the rounded one
    if ACC == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _grid_coord(k, n, ACC: tl.constexpr):
    """torch.linspace(-1, 1, n)[k] as linspace computes it (affine_grid's base grid); 0 when n == 1."""
    step = _div(tl.full([], 2.0, ACC), tl.maximum(n - 1, 1).to(ACC), ACC)
    c = tl.where(k < n // 2, -1.0 + step * k.to(ACC), 1.0 - step * (n - 1 - k).to(ACC))
    return tl.where(n > 1, c, 0.0)


@triton.jit
def _bilinear(gx, gy, H, W):
    """grid_sample's sampling point for the normalised (gx, gy): (x0, y0, east, south), the top-left corner and the
    weights of the column x0 + 1 and the row y0 + 1."""
    ix = ((gx + 1.0) * 0.5) * (W - 1).to(gx.dtype)
    iy = ((gy + 1.0) * 0.5) * (H - 1).to(gy.dtype)
    # a point this far out has no corner inside: clamping keeps the integer conversion defined
    ix = tl.minimum(tl.maximum(ix, -2.0), (W + 1).to(gx.dtype))
    iy = tl.minimum(tl.maximum(iy, -2.0), (H + 1).to(gy.dtype))
    fx = tl.floor(ix)
    fy = tl.floor(iy)
    return fx.to(tl.int32), fy.to(tl.int32), ix - fx, iy - fy


@triton.jit
def _corner(k, on, y, x, w, x0, y0, east, south, H, W):
    """Tap k (0..3, = 2 dy + dx) of a bilinear stage that is `on`, sampling at (x0, y0, east, south) for a pixel
    at (y, x) carrying weight w: (row, column, weight), the weight 0 outside the image (zero padding). A stage
    that is off passes (y, x, w) through unchanged (its only tap, k == 0)."""
    dy = k // 2
    dx = k - 2 * dy
    ys = y0 + dy
    xs = x0 + dx
    share = tl.where(dx == 1, east, 1.0 - east) * tl.where(dy == 1, south, 1.0 - south)
    inside = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
    return tl.where(on, ys, y), tl.where(on, xs, x), tl.where(on, tl.where(inside, w * share, 0.0), w)


@triton.jit
def _place(y, x, w, flip, cut, hy0, hy1, hx0, hx1, crop_y, crop_x, H, W):
    """flip, cutout and crop (in that order) on a tap at (y, x) of weight w: its flat index in the colour-adjusted
    image and whether it is read at all (a tap cut out, shifted outside or of weight 0 reads nothing)."""
    x = tl.where(flip, W - 1 - x, x)
    holed = cut & (y >= hy0) & (y < hy1) & (x >= hx0) & (x < hx1)
    y -= crop_y
    x -= crop_x
    keep = (~holed) & (y >= 0) & (y < H) & (x >= 0) & (x < W) & (w != 0.0)
    return y * W + x, keep


@triton.jit
def _chain(v_ptr, f_ptr, b, cutout_h, cutout_w, ACC: tl.constexpr):
    """The chain of image b (csrc/dsa_chain.h's Chain): which ops run and their values, in ACC; an op that is off
    gets the values that make it the identity."""
    bright = tl.load(f_ptr + 0) != 0
    sat = tl.load(f_ptr + 1) != 0
    con = tl.load(f_ptr + 2) != 0
    crop = tl.load(f_ptr + 3) != 0
    cut = tl.load(f_ptr + 4) != 0
    flip_on = tl.load(f_ptr + 5) != 0
    scale = tl.load(f_ptr + 6) != 0
    rot = tl.load(f_ptr + 7) != 0
    v = v_ptr + b.to(tl.int64) * 11
    add = tl.where(bright, tl.load(v + 0).to(ACC), 0.0)
    sat_f = tl.where(sat, tl.load(v + 1).to(ACC), 1.0)
    con_f = tl.where(con, tl.load(v + 2).to(ACC), 1.0)
    # the integral draws are whole numbers stored as floats: truncation is exact
    crop_y = tl.where(crop, tl.load(v + 3).to(ACC).to(tl.int32), 0)
    crop_x = tl.where(crop, tl.load(v + 4).to(ACC).to(tl.int32), 0)
    # dsa_chain.cutout: rows [cy - h // 2, cy - h // 2 + h), likewise the columns
    hy0 = tl.load(v + 5).to(ACC).to(tl.int32) - cutout_h // 2
    hx0 = tl.load(v + 6).to(ACC).to(tl.int32) - cutout_w // 2
    flip = flip_on & (tl.load(v + 7).to(ACC) != 0.0)
    sx = tl.where(scale, tl.load(v + 8).to(ACC), 1.0)
    sy = tl.where(scale, tl.load(v + 9).to(ACC), 1.0)
    # in ACC: a float literal would be an fp32 constant, too coarse for fp64
    radians = tl.where(rot, tl.load(v + 10).to(ACC), 0.0) * tl.full([], DEG2RAD, ACC)
    return (sat, con, add, sat_f, con_f, crop_y, crop_x, cut, hy0, hy0 + cutout_h, hx0, hx0 + cutout_w, flip,
            scale, sx, sy, rot, tl.cos(radians), tl.sin(radians))


@triton.jit
def _rotate_point(p, cos_a, sin_a, H, W, ACC: tl.constexpr):
    """Output pixels p's row and column, and rotate's sampling point for them: theta = [[cos, sin], [-sin, cos]]
    on affine_grid's base coordinates."""
    i = p // W
    j = p - i * W
    xn = _grid_coord(j, W, ACC)
    yn = _grid_coord(i, H, ACC)
    x0, y0, east, south = _bilinear(cos_a * xn + sin_a * yn, -sin_a * xn + cos_a * yn, H, W)
    return i, j, x0, y0, east, south


@triton.jit
def _scale_point(y, x, sx, sy, H, W, ACC: tl.constexpr):
    """scale's sampling point for its output pixel (y, x): theta = [[sx, 0], [0, sy]]. A tap of rotate outside the
    image has weight 0 already; it is clamped only to look up coordinates."""
    xn = _grid_coord(tl.minimum(tl.maximum(x, 0), W - 1), W, ACC)
    yn = _grid_coord(tl.minimum(tl.maximum(y, 0), H - 1), H, ACC)
    return _bilinear(sx * xn, sy * yn, H, W)


@triton.jit
def _rotate_tap(r, rot, i, j, w0, rx0, ry0, re, rs, sx, sy, H, W, ACC: tl.constexpr):
    """Tap r of rotate for output pixels (i, j) of weight w0, and scale's sampling point for it: (row, column,
    weight, then scale's x0, y0, east, south)."""
    y1, x1, w1 = _corner(r, rot, i, j, w0, rx0, ry0, re, rs, H, W)
    sx0, sy0, se, ss = _scale_point(y1, x1, sx, sy, H, W, ACC)
    return y1, x1, w1, sx0, sy0, se, ss


@triton.jit
def _scale_tap(t, scale, y1, x1, w1, sx0, sy0, se, ss, flip, cut, hy0, hy1, hx0, hx1, crop_y, crop_x, H, W):
    """Tap t of scale on a tap of rotate, through flip, cutout and crop: (flat index, whether it is read,
    weight)."""
    y2, x2, w = _corner(t, scale, y1, x1, w1, sx0, sy0, se, ss, H, W)
    q, keep = _place(y2, x2, w, flip, cut, hy0, hy1, hx0, hx1, crop_y, crop_x, H, W)
    return q, keep, w


@triton.jit
def _bright_sat(x, m, add, sat, sat_f, C, ACC: tl.constexpr):
    """Brightness then saturation of a [CB, BLOCK] tile of x (0 where m is not), each pixel centred on its
    brightened channel mean."""
    v = tl.where(m, x.to(ACC) + add, 0.0)
    pix_mean = _div(tl.sum(v, axis=0), C.to(ACC), ACC)[None, :]
    return tl.where(sat, (v - pix_mean) * sat_f + pix_mean, v)


# the sizes are never specialised: a 1 would become a constexpr, which has no .to()
@triton.jit(do_not_specialize=["C", "H", "W", "cutout_h", "cutout_w"])
def _dsa_forward_kernel(x_ptr, v_ptr, f_ptr, out_ptr, C, H, W, cutout_h, cutout_w, ACC: tl.constexpr,
                        CB: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    (sat, con, add, sat_f, con_f, crop_y, crop_x, cut, hy0, hy1, hx0, hx1, flip, scale, sx, sy, rot, cos_a,
     sin_a) = _chain(v_ptr, f_ptr, b, cutout_h, cutout_w, ACC)
    hw = H * W
    x_img = x_ptr + b.to(tl.int64) * C * hw
    out_img = out_ptr + b.to(tl.int64) * C * hw
    chan = tl.arange(0, CB)
    chan_ok = chan < C
    rows = chan[:, None] * hw
    offs = tl.arange(0, BLOCK)
    n_rot = tl.where(rot, 4, 1)
    n_scale = tl.where(scale, 4, 1)

    # contrast's centre: the mean of the brightened and saturated image, summed as the CPU kernel does
    mean = tl.full([], 0.0, ACC)
    if con:
        acc = tl.zeros([CB, BLOCK], ACC)
        for p0 in range(0, hw, BLOCK):
            p = p0 + offs
            m = chan_ok[:, None] & (p < hw)[None, :]
            v = _bright_sat(tl.load(x_img + rows + p[None, :], mask=m, other=0.0), m, add, sat, sat_f, C, ACC)
            acc += tl.where(m, v, 0.0)
        mean = _div(tl.sum(tl.sum(acc, axis=1), axis=0), (C * hw).to(ACC), ACC)

    for p0 in range(0, hw, BLOCK):
        p = p0 + offs
        pix_ok = p < hw
        i, j, rx0, ry0, re, rs = _rotate_point(p, cos_a, sin_a, H, W, ACC)
        w0 = tl.where(pix_ok, 1.0, 0.0).to(ACC)  # a pixel past the image has taps of weight 0: they read nothing
        acc = tl.zeros([CB, BLOCK], ACC)
        for r in range(0, n_rot):
            y1, x1, w1, sx0, sy0, se, ss = _rotate_tap(r, rot, i, j, w0, rx0, ry0, re, rs, sx, sy, H, W, ACC)
            for t in range(0, n_scale):
                q, keep, w = _scale_tap(t, scale, y1, x1, w1, sx0, sy0, se, ss, flip, cut, hy0, hy1, hx0, hx1,
                                        crop_y, crop_x, H, W)
                m = chan_ok[:, None] & keep[None, :]
                # colour_forward of every channel of the tap, with the tap's brightened channel mean
                v = _bright_sat(tl.load(x_img + rows + q[None, :], mask=m, other=0.0), m, add, sat, sat_f, C, ACC)
                v = tl.where(con, (v - mean) * con_f + mean, v)
                acc += tl.where(m, w[None, :] * v, 0.0)
        tl.store(out_img + rows + p[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=chan_ok[:, None] & pix_ok[None, :])


@triton.jit(do_not_specialize=["C", "H", "W", "cutout_h", "cutout_w"])
def _dsa_transpose_kernel(g_ptr, v_ptr, f_ptr, out_ptr, buf_ptr, C, H, W, cutout_h, cutout_w, ACC: tl.constexpr,
                          CB: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    (sat, con, add, sat_f, con_f, crop_y, crop_x, cut, hy0, hy1, hx0, hx1, flip, scale, sx, sy, rot, cos_a,
     sin_a) = _chain(v_ptr, f_ptr, b, cutout_h, cutout_w, ACC)
    hw = H * W
    g_img = g_ptr + b.to(tl.int64) * C * hw
    out_img = out_ptr + b.to(tl.int64) * C * hw
    buf_img = buf_ptr + b.to(tl.int64) * C * hw  # the output itself, or an ACC workspace for fp16/bf16
    chan = tl.arange(0, CB)
    chan_ok = chan < C
    rows = chan[:, None] * hw
    offs = tl.arange(0, BLOCK)
    n_rot = tl.where(rot, 4, 1)
    n_scale = tl.where(scale, 4, 1)

    # only this program touches this image's buffer, so a block-wide barrier orders the passes
    for p0 in range(0, hw, BLOCK):
        p = p0 + offs
        tl.store(buf_img + rows + p[None, :], tl.zeros([CB, BLOCK], buf_ptr.dtype.element_ty),
                 mask=chan_ok[:, None] & (p < hw)[None, :])
    tl.debug_barrier()

    # the spatial ops, transposed: each output pixel's gradient goes back along its taps
    for p0 in range(0, hw, BLOCK):
        p = p0 + offs
        pix_ok = p < hw
        g = tl.load(g_img + rows + p[None, :], mask=chan_ok[:, None] & pix_ok[None, :], other=0.0).to(ACC)
        i, j, rx0, ry0, re, rs = _rotate_point(p, cos_a, sin_a, H, W, ACC)
        w0 = tl.where(pix_ok, 1.0, 0.0).to(ACC)  # a pixel past the image has taps of weight 0: they add nothing
        for r in range(0, n_rot):
            y1, x1, w1, sx0, sy0, se, ss = _rotate_tap(r, rot, i, j, w0, rx0, ry0, re, rs, sx, sy, H, W, ACC)
            for t in range(0, n_scale):
                q, keep, w = _scale_tap(t, scale, y1, x1, w1, sx0, sy0, se, ss, flip, cut, hy0, hy1, hx0, hx1,
                                        crop_y, crop_x, H, W)
                # relaxed: the barrier below orders the adds before the colour pass
                tl.atomic_add(buf_img + rows + q[None, :], w[None, :] * g, mask=chan_ok[:, None] & keep[None, :],
                              sem="relaxed")
    tl.debug_barrier()

    # the colour ops, transposed (colour_transpose): contrast^T needs the buffer's total, saturation^T each
    # pixel's channel sum; the loads bypass L1 (.cg), which may hold the zeros stored before the atomics
    k = tl.full([], 0.0, ACC)
    if con:
        acc = tl.zeros([CB, BLOCK], ACC)
        for p0 in range(0, hw, BLOCK):
            p = p0 + offs
            m = chan_ok[:, None] & (p < hw)[None, :]
            acc += tl.load(buf_img + rows + p[None, :], mask=m, other=0.0, cache_modifier=".cg").to(ACC)
        k = _div((1.0 - con_f) * tl.sum(tl.sum(acc, axis=1), axis=0), (C * hw).to(ACC), ACC)
    for p0 in range(0, hw, BLOCK):
        p = p0 + offs
        m = chan_ok[:, None] & (p < hw)[None, :]
        v = tl.load(buf_img + rows + p[None, :], mask=m, other=0.0, cache_modifier=".cg").to(ACC)
        v_sum = tl.sum(v, axis=0)[None, :]
        res = con_f * v + k
        res = tl.where(sat, sat_f * res + _div((1.0 - sat_f) * (con_f * v_sum + C.to(ACC) * k), C.to(ACC), ACC), res)
        tl.store(out_img + rows + p[None, :], res.to(out_ptr.dtype.element_ty), mask=m)


def _check_inputs(x, values, flags, cutout_h, cutout_w) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"dsa: x must be a floating point [B, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
    if not supports(x.device):
        raise ValueError(f"dsa: the Triton kernels cannot run on {x.device} tensors in this process")
    b = x.shape[0]
    if values.shape != (b, NUM_COLUMNS) or values.dtype != x.dtype or values.device != x.device:
        raise ValueError(f"dsa: values must be a {x.dtype} tensor of shape ({b}, {NUM_COLUMNS}) on {x.device} (a row "
                         f"of draws per image), got {values.dtype} {tuple(values.shape)} on {values.device}")
    if flags.shape != (NUM_OPS,) or flags.dtype != torch.int32 or flags.device != x.device:
        raise ValueError(f"dsa: flags must be an int32 tensor of shape ({NUM_OPS},) on {x.device} (one per op), got "
                         f"{flags.dtype} {tuple(flags.shape)} on {flags.device}")
    if cutout_h < 0 or cutout_w < 0:
        raise ValueError(f"dsa: cutout_h and cutout_w must not be negative, got {cutout_h}x{cutout_w}")
    # int32 offsets inside an image
    if b and x[0].numel() >= 2**31:
        raise ValueError(f"dsa: x's images must have fewer than 2**31 values each, got {x[0].numel()}")


def dsa(x: Tensor, values: Tensor, flags: Tensor, cutout_h: int, cutout_w: int, transpose: bool) -> Tensor:
    """The DSA chain that flags and values describe on x [B, C, H, W] (or with transpose its transpose): a new
    contiguous tensor of x's shape and dtype."""
    _check_inputs(x, values, flags, cutout_h, cutout_w)
    x, values, flags = x.detach().contiguous(), values.detach().contiguous(), flags.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return out
    b, c, h, w = x.shape
    cb = next_pow2(c)
    block = min(next_pow2(h * w), max(1, TILE // cb))
    launch = dict(ACC=acc_dtype(x.dtype), CB=cb, BLOCK=block, num_warps=4)
    if transpose:
        # the scatter accumulates in ACC: in place in an fp32/fp64 output, else in a workspace of its own
        buf = out if x.dtype in (torch.float32, torch.float64) else torch.empty_like(out, dtype=torch.float32)
        _dsa_transpose_kernel[(b,)](x, values, flags, out, buf, c, h, w, cutout_h, cutout_w, **launch)
    else:
        _dsa_forward_kernel[(b,)](x, values, flags, out, c, h, w, cutout_h, cutout_w, **launch)
    return out

