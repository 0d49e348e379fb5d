"""norm_relu_pool: instance norm (affine) -> ReLU -> 2x2 average pool, the memory-bound tail of every ConvNet
block (Triton only: kernels/norm_relu_pool.py).

Operators: ltdd_triton::norm_relu_pool(x, weight, bias) -> (y, mean, rstd), with mean and rstd per (b, c) plane in
the accumulation type, kept for the backward and not differentiable; ltdd_triton::norm_relu_pool_backward (an
internal helper of the first). The first-order backward is the fused backward kernel; with grad mode on inside
backward (create_graph=True: a double backward, as the distillation's second pass takes) the backward
differentiates the reference instead, so higher derivatives are exact.
"""
import torch
import torch.nn.functional as F

from .dispatch import Operator, call_fast, pick, register

INSTANCE_NORM_EPS = 1e-5


def instance_norm(x, weight, bias):
    """Each (image, channel) plane normalised by its own mean and variance (eps INSTANCE_NORM_EPS), then scaled by
    weight and shifted by bias per channel: a group norm with one group per channel."""
    return F.group_norm(x, x.shape[1], weight, bias, INSTANCE_NORM_EPS)


def reference(x, weight, bias):
    """Instance norm -> ReLU -> 2x2 average pool, which floors odd sizes: the last row/column of an odd plane counts
    in the statistics but not in the pool."""
    return F.avg_pool2d(F.relu(instance_norm(x, weight, bias)), 2)


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake(x, weight, bias):
    b, c, h, w = x.shape
    mean = x.new_empty((b * c,), dtype=_stats_dtype(x.dtype))
    return x.new_empty((b, c, h // 2, w // 2)), mean, torch.empty_like(mean)


def _reference_backward(x, weight, bias, dy):
    """(dx, dweight, dbias) as a differentiable function of x, weight, bias and dy, through the reference."""
    with torch.enable_grad():
        # torch.autograd.grad needs every input to require grad; the ones that did not become fresh leaves
        inputs = [t if t.requires_grad else t.detach().requires_grad_() for t in (x, weight, bias)]
        return torch.autograd.grad(reference(*inputs), inputs, dy, create_graph=True)


def _autograd(op):
    def setup(ctx, inputs, output):
        x, weight, bias = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: higher derivatives through the reference
            grads = _reference_backward(x, weight, bias, dy)
        else:
            grads = torch.ops.ltdd_triton.norm_relu_pool_backward(dy, x, mean, rstd, weight, bias)
        return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))
    return backward, setup


def _triton(x, weight, bias):
    from ..kernels import norm_relu_pool as kernel  # Triton: imported when first used
    return kernel.forward(x, weight, bias, INSTANCE_NORM_EPS)


def _backward_reference(dy, x, mean, rstd, weight, bias):
    return tuple(g.detach() for g in _reference_backward(x, weight, bias, dy))


def _backward_fake(dy, x, mean, rstd, weight, bias):
    return torch.empty_like(x), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _backward_triton(dy, x, mean, rstd, weight, bias):
    from ..kernels import norm_relu_pool as kernel  # Triton: imported when first used
    return kernel.backward(dy, x, mean, rstd, weight, bias)


OPERATOR = register(Operator(
    "norm_relu_pool", "norm_relu_pool(Tensor x, Tensor weight, Tensor bias) -> (Tensor, Tensor, Tensor)",
    reference, _fake, _autograd, _triton, native=False))
BACKWARD = register(Operator(
    "norm_relu_pool_backward",
    "norm_relu_pool_backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor weight, Tensor bias) "
    "-> (Tensor, Tensor, Tensor)",
    _backward_reference, _backward_fake, None, _backward_triton, native=False, internal=True))


def norm_relu_pool(x, weight, bias, backend="auto"):
    """avg_pool2d(relu(instance_norm(x) * weight + bias), 2): x [B, C, H, W], weight and bias [C].

    Triton only ("auto" takes it for CUDA tensors when CUDA_BACKENDS says so, the reference otherwise; "native"
    has no kernel for it and runs the reference). Differentiable to any order (see the module docstring).
    """
    which = "reference" if backend == "native" else pick(backend, "norm_relu_pool", x.device)
    if which == "triton":
        from ..kernels import norm_relu_pool as kernel  # Triton: imported when first used
        kernel.check_inputs(x, weight, bias)
        return call_fast("triton", "norm_relu_pool", x.contiguous(), weight, bias)[0]
    return reference(x, weight, bias)
