"""dsa: the DSA chain of one call (any of its ops, per-image draws) or its transpose, in one kernel.
Twins: csrc/cpu/dsa.cpp and csrc/cuda/dsa.cu (arithmetic in csrc/dsa_chain.h), kernels/dsa.py.
"""
import torch
from torch import Tensor

from ..dsa_chain import OPS as AUG_OPS, PACKED_WIDTH, AugParams, apply_chain, cutout_size
from .dispatch import Operator, call_fast, pick, register


def reference(x, values, flags, transpose=False) -> Tensor:
    """The DSA chain whose draws the op takes packed (dsa_chain.AugParams.packed) on x, op by op; with transpose
    its transpose, the chain's vector-Jacobian product with cotangent x (the chain is affine in the image)."""
    params = AugParams.unpacked(values, flags)
    if not transpose:
        return apply_chain(x, params)
    with torch.enable_grad():
        point = torch.zeros_like(x, requires_grad=True)
        (out,) = torch.autograd.grad(apply_chain(point, params), point, x, create_graph=x.requires_grad)
    return out


def _fake(x, values, flags, cutout_h, cutout_w, transpose):
    return x.new_empty(x.shape)


def _autograd(op):
    """The chain is affine in the image, x -> L x + c (c: brightness's constant), so its gradient is the transpose
    L^T and the transpose's gradient L: the chain with brightness switched off. To any order."""
    def setup(ctx, inputs, output):
        _, values, flags, cutout_h, cutout_w, transpose = inputs
        if transpose:  # (on the device: no host sync)
            flags = flags.clone()
            flags[AUG_OPS.index("brightness")] = 0
        ctx.save_for_backward(values, flags)
        ctx.args = (cutout_h, cutout_w, not transpose)

    def backward(ctx, d_out):
        values, flags = ctx.saved_tensors
        return op(d_out.contiguous(), values, flags, *ctx.args), None, None, None, None, None
    return backward, setup


def _triton(x, values, flags, cutout_h, cutout_w, transpose):
    from ..kernels import dsa as kernel  # Triton: imported when first used
    return kernel.dsa(x, values, flags, cutout_h, cutout_w, transpose)


OPERATOR = register(Operator(
    "dsa", "dsa(Tensor x, Tensor values, Tensor flags, int cutout_h, int cutout_w, bool transpose) -> Tensor",
    reference, _fake, _autograd, _triton))


def dsa(x, values, flags, transpose=False, backend="auto"):
    """The DSA chain of one call on images x [B, C, H, W] in one kernel (or with transpose=True its transpose,
    in one kernel): the ops that flags [len(dsa_chain.OPS)] int32 switch on, in dsa_chain.OPS's order, each image
    with its row of draws in values [B, dsa_chain.PACKED_WIDTH] (x's dtype; AugParams.packed makes both).
    Equals reference(), the ops applied one by one. Differentiable w.r.t. x to any order (the gradient of the
    chain is its transpose and vice versa); values and flags are not differentiated. A new contiguous tensor."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be floating point images [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
    b, _, h, w = x.shape
    if values.shape != (b, PACKED_WIDTH) or values.dtype != x.dtype or values.device != x.device:
        raise ValueError(f"values must be {x.dtype} [{b}, {PACKED_WIDTH}] on {x.device} (a row of draws per image), "
                         f"got {values.dtype} {tuple(values.shape)} on {values.device}")
    if flags.shape != (len(AUG_OPS),) or flags.dtype != torch.int32 or flags.device != x.device:
        raise ValueError(f"flags must be int32 [{len(AUG_OPS)}] on {x.device} (one per op of {AUG_OPS}), "
                         f"got {flags.dtype} {tuple(flags.shape)} on {flags.device}")
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.isfinite(values).all():
        raise ValueError("values must be finite draws, got a NaN or an infinity")
    which = pick(backend, "dsa", x.device)
    if which == "reference":
        return reference(x, values, flags, transpose)
    return call_fast(which, "dsa", x, values, flags, *cutout_size(h, w), bool(transpose))
