"""class_grad_stats: the per-class sum and max of per-image gradient L2 norms (a statistic, not differentiated).
Twins: csrc/cpu/class_grad_stats.cpp, csrc/cuda/class_grad_stats.cu, kernels/class_grad_stats.py.
"""
from torch import Tensor

from .dispatch import Operator, call_fast, check_classes, pick, register


def reference(grads, classes, num_classes) -> tuple[Tensor, Tensor]:
    """(norm_sum [K], norm_max [K]) of the per-image L2 norms of grads [N, ...] over each class; empty class -> 0."""
    norms = grads.detach().reshape(grads.shape[0], -1).norm(dim=1)
    zeros = norms.new_zeros(num_classes)
    return zeros.index_add(0, classes, norms), zeros.scatter_reduce(0, classes, norms, "amax", include_self=True)


def _fake(grads, classes, num_classes):
    return grads.new_empty((num_classes,)), grads.new_empty((num_classes,))


def _triton(grads, classes, num_classes):
    from ..kernels import class_grad_stats as kernel  # Triton: imported when first used
    return kernel.class_grad_stats(grads, classes, num_classes)


OPERATOR = register(Operator(
    "class_grad_stats", "class_grad_stats(Tensor grads, Tensor classes, int num_classes) -> (Tensor, Tensor)",
    reference, _fake, None, _triton))


def class_grad_stats(grads, classes, num_classes, backend="auto"):
    """(norm_sum [K], norm_max [K]): the L2 norms of each image's gradient grads[i] summed and maxed over each
    class; an empty class gives 0. A statistic, so not differentiable (grads is read detached)."""
    if grads.dim() < 1 or not grads.is_floating_point():
        raise ValueError(f"grads must be a floating point [N, ...] tensor, got {grads.dtype} {tuple(grads.shape)}")
    check_classes(classes, grads.shape[0], num_classes, grads.device, "grads")
    grads = grads.detach()
    which = pick(backend, "class_grad_stats", grads.device)
    if which != "reference":
        return call_fast(which, "class_grad_stats", grads, classes, num_classes)
    return reference(grads, classes, num_classes)
