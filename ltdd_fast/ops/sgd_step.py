"""student_sgd_step: the student's SGD step on the flat parameter vector, in one pass (METHOD section 6).

theta' = theta - alpha g', G' = G + g', g' = grad with the slice [frozen_start, frozen_end) zeroed (the classifier
phase freezes the backbone this way). Twins: csrc/cpu/student_sgd_step.cpp, csrc/cuda/student_sgd_step.cu,
kernels/student_sgd_step.py.
"""
import torch

from .dispatch import Operator, call_fast, check_flat_vectors, pick, register


def reference(theta, grad, grad_sum, alpha, frozen_start=0, frozen_end=0):
    """theta_next = theta - alpha * g', grad_sum_next = grad_sum + g', g' = grad zeroed on [frozen_start, frozen_end)."""
    g = grad.clone()
    g[frozen_start:frozen_end] = 0
    return theta - alpha * g, grad_sum + g


def _fake(theta, grad, grad_sum, alpha, frozen_start, frozen_end):
    return torch.empty_like(theta), torch.empty_like(grad_sum)


def _autograd(op):
    def setup(ctx, inputs, output):
        _, grad, _, alpha, frozen_start, frozen_end = inputs
        ctx.save_for_backward(grad, alpha)
        ctx.frozen = (frozen_start, frozen_end)

    def backward(ctx, d_theta_next, d_sum_next):
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
    return backward, setup


def _triton(theta, grad, grad_sum, alpha, frozen_start, frozen_end):
    from ..kernels import student_sgd_step as kernel  # Triton: imported when first used
    return kernel.student_sgd_step(theta, grad, grad_sum, alpha, frozen_start, frozen_end)


OPERATOR = register(Operator(
    "student_sgd_step",
    "student_sgd_step(Tensor theta, Tensor grad, Tensor grad_sum, Tensor alpha, int frozen_start, int frozen_end) "
    "-> (Tensor, Tensor)",
    reference, _fake, _autograd, _triton))


def student_sgd_step(theta, grad, grad_sum, alpha, frozen=None, backend="auto"):
    """One student step on the flat parameter vector in one pass.

    Returns (theta - alpha * g', grad_sum + g') where g' is grad with the slice `frozen` = (start, end)
    zeroed (the classifier phase freezes the backbone this way). alpha is a float or a one-element tensor.
    """
    alpha = check_flat_vectors(("theta", theta), ("grad", grad), ("grad_sum", grad_sum), alpha=alpha)
    start, end = frozen if frozen is not None else (0, 0)
    if not 0 <= start <= end <= theta.numel():
        raise ValueError(f"frozen range ({start}, {end}) must lie within [0, {theta.numel()}]")
    which = pick(backend, "student_sgd_step", theta.device)
    if which == "reference":
        return reference(theta, grad, grad_sum, alpha, start, end)
    alpha = alpha if alpha.dtype == theta.dtype else alpha.to(theta.dtype)
    return call_fast(which, "student_sgd_step", theta, grad, grad_sum, alpha, start, end)
