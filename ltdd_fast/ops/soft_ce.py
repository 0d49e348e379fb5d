"""soft_ce_stats: DAM's soft-label cross-entropy with both gradients and per-class statistics in one kernel
(METHOD section 7). Twins: csrc/cpu/soft_ce_stats.cpp, csrc/cuda/soft_ce_stats.cu, kernels/soft_ce_stats.py.
"""
import torch
import torch.nn.functional as F

from ..dam import soft_cross_entropy
from .dispatch import Operator, call_fast, check_classes, pick, register


def reference(logits, target_logits, class_weights, classes, num_classes):
    """soft_cross_entropy with its gradients and per-class statistics.

    Returns (loss [], grad_logits [B,C], grad_target [B,C], class_loss_sum [K], class_count [K] int64,
    class_grad_norm [K]): loss keeps its graph; the rest are detached. class_loss_sum sums the per-row losses
    (before the 1/B mean) of each class's rows; class_grad_norm is the L2 norm of grad_logits (which includes 1/B)
    over each class's rows. Statistics have the logits' dtype; an empty class gives 0."""
    loss = soft_cross_entropy(logits, target_logits, class_weights)
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        t = target_logits.detach().requires_grad_()
        per_class = -F.softmax(t, dim=1) * F.log_softmax(z, dim=1)
        if class_weights is not None:
            per_class = per_class * class_weights.to(per_class)
        rows = per_class.sum(1)
        grad_logits, grad_target = torch.autograd.grad(rows.mean(), (z, t))
    rows = rows.detach()
    zeros = rows.new_zeros(num_classes)
    class_loss_sum = zeros.index_add(0, classes, rows)
    class_count = torch.bincount(classes, minlength=num_classes)
    class_grad_norm = zeros.index_add(0, classes, grad_logits.pow(2).sum(1)).sqrt()
    return loss, grad_logits, grad_target, class_loss_sum, class_count, class_grad_norm


def _fake(logits, target_logits, class_weights, classes, num_classes):
    stat = logits.new_empty((num_classes,))
    return (logits.new_empty(()), torch.empty_like(logits), torch.empty_like(target_logits), stat,
            classes.new_empty((num_classes,)), torch.empty_like(stat))


def _autograd(op):
    def setup(ctx, inputs, output):
        logits, target_logits, class_weights, _, _ = inputs
        _, grad_logits, grad_target, *stats = output
        ctx.mark_non_differentiable(grad_logits, grad_target, *stats)
        ctx.save_for_backward(grad_logits, grad_target, logits, target_logits, class_weights)

    def backward(ctx, d_loss, *_):
        grad_logits, grad_target, logits, target_logits, class_weights = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            # create_graph=True (a double backward, as the constant-memory second pass takes): the kernel's
            # gradients are constants, so differentiate the reference formula instead, which keeps its dependence
            # on the inputs
            inputs = [t for t, w in zip((logits, target_logits), wanted) if w]
            loss = soft_cross_entropy(logits, target_logits, class_weights)
            grads = iter(torch.autograd.grad(loss, inputs, d_loss, create_graph=True))
            return (next(grads) if wanted[0] else None, next(grads) if wanted[1] else None, None, None, None)
        return (d_loss * grad_logits if wanted[0] else None, d_loss * grad_target if wanted[1] else None,
                None, None, None)
    return backward, setup


def _triton(logits, target_logits, class_weights, classes, num_classes):
    from ..kernels import soft_ce_stats as kernel  # Triton: imported when first used
    return kernel.soft_ce_stats(logits, target_logits, class_weights, classes, num_classes)


OPERATOR = register(Operator(
    "soft_ce_stats",
    "soft_ce_stats(Tensor logits, Tensor target_logits, Tensor? class_weights, Tensor classes, int num_classes) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    reference, _fake, _autograd, _triton))


def soft_ce_stats(logits, target_logits, class_weights, classes, num_classes=None, backend="auto"):
    """The DAM loss (1/B) sum_i sum_c w_c softmax(target_i)_c (-log softmax(logits_i)_c) with its gradients and
    per-class statistics in one kernel.

    classes [B] int64 names each row's class (for the statistics); num_classes defaults to C. Returns (loss,
    grad_logits, grad_target, class_loss_sum [K], class_count [K] int64, class_grad_norm [K]) as reference().
    loss is differentiable w.r.t. logits and target_logits (not class_weights): a first order backward scales the
    kernel's gradients; a backward with create_graph=True differentiates the reference formula, so higher
    derivatives are exact (and cost what the reference costs).
    """
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [B, C] with B, C > 0, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if (target_logits.shape != logits.shape or target_logits.dtype != logits.dtype
            or target_logits.device != logits.device):
        raise ValueError(f"target_logits must match logits ({tuple(logits.shape)}, {logits.dtype}, {logits.device}), "
                         f"got ({tuple(target_logits.shape)}, {target_logits.dtype}, {target_logits.device})")
    b, c = logits.shape
    if class_weights is not None:
        if (class_weights.shape != (c,) or not class_weights.is_floating_point()
                or class_weights.device != logits.device):
            raise ValueError(f"class_weights must be a floating point tensor of shape ({c},) on {logits.device}, "
                             f"got {class_weights.dtype} {tuple(class_weights.shape)} on {class_weights.device}")
    num_classes = c if num_classes is None else num_classes
    check_classes(classes, b, num_classes, logits.device, "logits")
    which = pick(backend, "soft_ce_stats", logits.device)
    if which != "reference":
        return call_fast(which, "soft_ce_stats", logits, target_logits, class_weights, classes, num_classes)
    return reference(logits, target_logits, class_weights, classes, num_classes)
