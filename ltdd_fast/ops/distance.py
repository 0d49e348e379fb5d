"""param_distance: the normalised parameter distance of trajectory matching with its constant-memory gradient
vector, in one reduction pass (METHOD section 6). Twins: csrc/cpu/param_distance.cpp, csrc/cuda/param_distance.cu,
kernels/param_distance.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .dispatch import Operator, call_fast, check_flat_vectors, pick, register


def _mask_multiplier(mask, like: Tensor) -> Tensor | None:
    return None if mask is None else mask.to(device=like.device, dtype=like.dtype)


def distance(theta, theta_0, theta_T, mask=None) -> Tensor:
    """||m*(theta - theta_T)||^2 / ||m*(theta_0 - theta_T)||^2 with m the mask as a float (None = all ones)."""
    m = _mask_multiplier(mask, theta)
    num, den = theta - theta_T, theta_0 - theta_T
    if m is not None:
        num, den = m * num, m * den
    return num.pow(2).sum() / den.pow(2).sum()


def squared_mask(mask, like: Tensor) -> Tensor:
    """m^2 as a float vector like `like` (all ones for None): the mask enters both squared norms."""
    m = _mask_multiplier(mask, like)
    return torch.ones_like(like) if m is None else m * m


def reference(theta_0, theta_T, grad_sum, alpha, mask=None) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, v, d_alpha) of the matching loss at theta_N = theta_0 - alpha * grad_sum (METHOD section 6).

    loss = distance(theta_N, theta_0, theta_T, mask) keeps its graph; v = dloss/dgrad_sum and
    d_alpha = dloss/dalpha are returned detached (the native op's v and d_alpha are not differentiable)."""
    loss = distance(theta_0 - alpha * grad_sum, theta_0, theta_T, mask)
    t0, tT, G = theta_0.detach(), theta_T.detach(), grad_sum.detach()
    a = torch.as_tensor(alpha).detach().to(t0)
    m2 = squared_mask(mask, t0)
    D = (m2 * (t0 - tT).pow(2)).sum()
    r = t0 - a * G - tT
    v = -2 * a * m2 * r / D
    d_alpha = -2 * (G * m2 * r).sum() / D
    return loss, v, d_alpha


def _fake(theta_0, theta_T, grad_sum, alpha, mask):
    return theta_0.new_empty(()), torch.empty_like(theta_0), theta_0.new_empty(())


def _autograd(op):
    def setup(ctx, inputs, output):
        theta_0, theta_T, grad_sum, alpha, mask = inputs
        loss, v, d_alpha = output
        ctx.mark_non_differentiable(v, d_alpha)
        ctx.save_for_backward(theta_0, theta_T, grad_sum, alpha, mask, loss, v, d_alpha)

    def backward(ctx, d_loss, _d_v, _d_d_alpha):
        # the kernel's v and d_alpha are dloss/dgrad_sum and dloss/dalpha; theta_0 and theta_T need
        # dloss/dtheta_0 = 2 m2 (r - loss e) / D = -dloss/dtheta_T, e = theta_0 - theta_T, r = e - alpha grad_sum
        theta_0, theta_T, grad_sum, alpha, mask, loss, v, d_alpha = ctx.saved_tensors
        d_theta_0 = d_theta_T = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            e = theta_0 - theta_T
            r = e - alpha.reshape(()) * grad_sum
            m2 = None if mask is None else mask.to(theta_0.dtype).square()
            D = e.square().sum() if m2 is None else (m2 * e.square()).sum()
            d_theta_0 = (2 * d_loss / D) * (r - loss * e)
            if m2 is not None:
                d_theta_0 = m2 * d_theta_0
            d_theta_T = -d_theta_0
        d_alpha_in = (d_loss * d_alpha).reshape(alpha.shape) if ctx.needs_input_grad[3] else None
        return d_theta_0, d_theta_T, d_loss * v, d_alpha_in, None
    return backward, setup


def _triton(theta_0, theta_T, grad_sum, alpha, mask):
    from ..kernels import param_distance as kernel  # Triton: imported when first used
    return kernel.param_distance(theta_0, theta_T, grad_sum, alpha, mask)


OPERATOR = register(Operator(
    "param_distance",
    "param_distance(Tensor theta_0, Tensor theta_T, Tensor grad_sum, Tensor alpha, Tensor? mask) "
    "-> (Tensor, Tensor, Tensor)",
    reference, _fake, _autograd, _triton))


def param_distance(theta_0, theta_T, grad_sum, alpha, mask=None, backend="auto"):
    """(loss, v, d_alpha) of the normalised parameter distance at theta_N = theta_0 - alpha * grad_sum, in one
    reduction pass: loss = ||m (theta_N - theta_T)||^2 / ||m (theta_0 - theta_T)||^2, v = dloss/dgrad_sum (the
    constant-memory gradient's vector), d_alpha = dloss/dalpha.

    mask: None (all parameters), bool [P], or float [P] (weights m, entering the squares as m^2). loss is
    differentiable w.r.t. theta_0, theta_T, grad_sum and alpha; v and d_alpha are not.
    """
    alpha = check_flat_vectors(("theta_0", theta_0), ("theta_T", theta_T), ("grad_sum", grad_sum), alpha=alpha)
    if mask is not None:
        if mask.shape != theta_0.shape or mask.device != theta_0.device:
            raise ValueError(f"mask must have theta_0's shape {tuple(theta_0.shape)} on {theta_0.device}, "
                             f"got {tuple(mask.shape)} on {mask.device}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"mask must be bool or floating point, got {mask.dtype}")
    which = pick(backend, "param_distance", theta_0.device)
    if which == "reference":
        out = reference(theta_0, theta_T, grad_sum, alpha, mask)
    else:
        if alpha.dtype != theta_0.dtype or alpha.dim() != 0:
            alpha = alpha.to(theta_0.dtype).reshape(())
        out = call_fast(which, "param_distance", theta_0, theta_T, grad_sum, alpha, mask)
    # An all-False / zero mask makes the denominator 0 and every output nan. Checked after the call, and only when
    # the loss is not finite, so the common case pays no extra pass over the mask (.item() rather than a
    # torch.isfinite op: the same sync, a fraction of the cost).
    if mask is not None and not math.isfinite(out[0].item()) and not mask.any():
        raise ValueError("mask selects no parameter (all False / zero): the distance is undefined")
    return out

