"""The public fast operators: one function per op, dispatching to native (C++/CUDA) or reference code.

Each native op is a torch.library operator (schema in csrc/ops.cpp) with a fake kernel and an autograd
formula registered here, so it composes with autograd and torch.compile.
"""
import warnings

import torch

from . import reference

try:
    from . import _C  # noqa: F401 - loading the library registers torch.ops.ltdd_fast.*
    NATIVE_AVAILABLE = True
except ImportError as exc:  # a broken build must not break the package: the reference path still works
    NATIVE_AVAILABLE = False
    warnings.warn(f"ltdd_fast: native operators unavailable ({exc}); using the PyTorch reference")

BACKENDS = ("auto", "native", "reference")


def _native_supports(op_name, device):
    if not NATIVE_AVAILABLE:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"ltdd_fast::{op_name}", device.type.upper())


def _pick(backend, op_name, device):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    native = _native_supports(op_name, device)
    if backend == "native" and not native:
        raise RuntimeError(f"ltdd_fast::{op_name} has no native kernel for {device.type} tensors in this build")
    return "native" if native and backend != "reference" else "reference"


# ---- student SGD step -------------------------------------------------------------------------------

if NATIVE_AVAILABLE:
    @torch.library.register_fake("ltdd_fast::student_sgd_step")
    def _student_sgd_step_fake(theta, grad, grad_sum, alpha, frozen_start, frozen_end):
        return torch.empty_like(theta), torch.empty_like(grad_sum)

    def _student_sgd_step_setup(ctx, inputs, output):
        _, grad, _, alpha, frozen_start, frozen_end = inputs
        ctx.save_for_backward(grad, alpha)
        ctx.frozen = (frozen_start, frozen_end)

    def _student_sgd_step_backward(ctx, d_theta_next, d_sum_next):
        grad, alpha = ctx.saved_tensors
        start, end = ctx.frozen
        d_theta_next = torch.zeros_like(grad) if d_theta_next is None else d_theta_next
        d_sum_next = torch.zeros_like(grad) if d_sum_next is None else d_sum_next
        d_grad = d_sum_next - alpha * d_theta_next
        d_grad[start:end] = 0
        g = grad.clone()
        g[start:end] = 0
        d_alpha = -(d_theta_next * g).sum().reshape(alpha.shape).to(alpha.dtype)
        return d_theta_next, d_grad, d_sum_next, d_alpha, None, None

    torch.library.register_autograd("ltdd_fast::student_sgd_step", _student_sgd_step_backward,
                                    setup_context=_student_sgd_step_setup)


def student_sgd_step(theta, grad, grad_sum, alpha, frozen=None, backend="auto"):
    """One student step on the flat parameter vector in one pass.

    Returns (theta - alpha * g', grad_sum + g') where g' is grad with the slice `frozen` = (start, end)
    zeroed (the classifier phase freezes the backbone this way). alpha is a float or a one-element tensor.
    """
    if theta.dim() != 1:
        raise ValueError(f"theta must be a flat 1-D parameter vector, got shape {tuple(theta.shape)}")
    for name, t in (("grad", grad), ("grad_sum", grad_sum)):
        if t.shape != theta.shape or t.dtype != theta.dtype or t.device != theta.device:
            raise ValueError(f"{name} must match theta ({tuple(theta.shape)}, {theta.dtype}, {theta.device}), "
                             f"got ({tuple(t.shape)}, {t.dtype}, {t.device})")
    if not torch.is_tensor(alpha):
        alpha = torch.tensor(float(alpha), dtype=theta.dtype, device=theta.device)
    if alpha.numel() != 1:
        raise ValueError(f"alpha must hold one value, got shape {tuple(alpha.shape)}")
    start, end = frozen if frozen is not None else (0, 0)
    if not 0 <= start <= end <= theta.numel():
        raise ValueError(f"frozen range ({start}, {end}) must lie within [0, {theta.numel()}]")
    if _pick(backend, "student_sgd_step", theta.device) == "native":
        return torch.ops.ltdd_fast.student_sgd_step(theta, grad, grad_sum, alpha.to(theta.dtype), start, end)
    return reference.student_sgd_step(theta, grad, grad_sum, alpha, start, end)
