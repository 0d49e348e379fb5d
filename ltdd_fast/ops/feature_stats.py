"""class_feature_stats: per-class count, sum and sum of squares of features [N, C, *spatial] per channel, the
building block of per-class batch-norm statistics (mean = sum / count, var = sumsq / count - mean^2).
Twins: csrc/cpu/class_feature_stats.cpp, csrc/cuda/class_feature_stats.cu, kernels/class_feature_stats.py.
"""
import math

import torch
from torch import Tensor

from .dispatch import Operator, call_fast, check_classes, pick, register


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics: float64 for float64 features, float32 otherwise (float32, float16, bfloat16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference(features, classes, num_classes) -> tuple[Tensor, Tensor, Tensor]:
    """(count [K], sum [K, C], sumsq [K, C]) in acc_dtype: count is the number of feature positions of each class's
    images (images times the product of the spatial sizes), sum and sumsq add features[n, ch, ...] and its square
    over them per channel. An empty class gives 0. sum and sumsq keep their graph to features; count is a
    constant."""
    n, c = features.shape[:2]
    positions = math.prod(features.shape[2:])
    x = features.to(acc_dtype(features.dtype)).reshape(n, c, positions)
    zeros = x.new_zeros((num_classes, c))
    total = zeros.index_add(0, classes, x.sum(2))
    total_sq = zeros.index_add(0, classes, x.square().sum(2))
    count = torch.bincount(classes, minlength=num_classes).to(x.dtype) * positions
    return count, total, total_sq


def _fake(features, classes, num_classes):
    acc = acc_dtype(features.dtype)
    stat = features.new_empty((num_classes, features.shape[1]), dtype=acc)
    return features.new_empty((num_classes,), dtype=acc), stat, torch.empty_like(stat)


def backward_formula(features, classes, d_sum, d_sumsq):
    """d/dfeatures[n, ch, ...] = d_sum[classes[n], ch] + 2 features[n, ch, ...] d_sumsq[classes[n], ch], in
    features' dtype; differentiable torch ops throughout, so the backward has its own backward."""
    view = (features.shape[0], features.shape[1]) + (1,) * (features.dim() - 2)
    grad = None
    if d_sum is not None:
        grad = d_sum.index_select(0, classes).reshape(view)
    if d_sumsq is not None:
        term = 2 * features * d_sumsq.index_select(0, classes).reshape(view)
        grad = term if grad is None else grad + term
    if grad is None:
        return torch.zeros_like(features)
    return grad.to(features.dtype).expand(features.shape).contiguous()


def _autograd(op):
    def setup(ctx, inputs, output):
        features, classes, _ = inputs
        count, _, _ = output
        ctx.mark_non_differentiable(count)
        ctx.save_for_backward(features, classes)

    def backward(ctx, _d_count, d_sum, d_sumsq):
        features, classes = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return backward_formula(features, classes, d_sum, d_sumsq), None, None
    return backward, setup


def _triton(features, classes, num_classes):
    from ..kernels import class_feature_stats as kernel  # Triton: imported when first used
    return kernel.class_feature_stats(features, classes, num_classes)


OPERATOR = register(Operator(
    "class_feature_stats",
    "class_feature_stats(Tensor features, Tensor classes, int num_classes) -> (Tensor, Tensor, Tensor)",
    reference, _fake, _autograd, _triton))


def class_feature_stats(features, classes, num_classes, backend="auto"):
    """(count [K], sum [K, C], sumsq [K, C]) of features [N, C, *spatial] (spatial may be empty) over the images of
    each class (classes [N] int64 in [0, K), K = num_classes): count[k] = images of class k times the product of
    the spatial sizes, sum[k, ch] and sumsq[k, ch] the sum of features[n, ch, ...] and of its square over them.

    The statistics are float64 for float64 features, float32 otherwise; an empty class gives 0. sum and sumsq are
    differentiable w.r.t. features to any order (count is not): d/dfeatures[n, ch, ...] = d_sum[classes[n], ch] +
    2 features[n, ch, ...] d_sumsq[classes[n], ch]. Bit-identical from run to run on every backend.
    """
    if not torch.is_tensor(features) or features.dim() < 2 or not features.is_floating_point():
        got = f"{features.dtype} {tuple(features.shape)}" if torch.is_tensor(features) else type(features).__name__
        raise ValueError(f"features must be a floating point [N, C, ...] tensor, got {got}")
    check_classes(classes, features.shape[0], num_classes, features.device, "features")
    which = pick(backend, "class_feature_stats", features.device)
    if which != "reference":
        return call_fast(which, "class_feature_stats", features, classes, num_classes)
    return reference(features, classes, num_classes)
