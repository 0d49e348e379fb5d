"""The public fast operators: one function per op, dispatching to native (C++/CUDA), Triton or reference code.

Backends: "native" (ltdd_fast._C: schemas in csrc/ops.cpp), "triton" (ltdd_fast.kernels, imported on first
use), "reference" (reference.py) and "auto": the native op for CPU tensors; for CUDA tensors the backend that
CUDA_BACKENDS names for that op (native where the op has a CUDA kernel, as measured fastest on an H100; Triton
for norm_relu_pool). Every fast op is a
torch.library operator with a fake kernel and an autograd formula registered here (one formula serves the
native and the Triton twin), so it composes with autograd and torch.compile.
"""
import importlib
import math
import os
import warnings

import torch

from . import reference
from .augment import OPS as AUG_OPS, PACKED_WIDTH, cutout_size
from .models.convnet import norm_relu_pool as _reference_norm_relu_pool

try:
    from . import _C  # noqa: F401 - loading the library registers torch.ops.ltdd_fast.*
    NATIVE_AVAILABLE = True
except ImportError as exc:  # a broken build must not break the package: the reference path still works
    NATIVE_AVAILABLE = False
    warnings.warn(f"ltdd_fast: native operators unavailable ({exc}); using the PyTorch reference")

BACKENDS = ("auto", "native", "triton", "reference")
OPS = ("student_sgd_step", "param_distance", "soft_ce_stats", "class_grad_stats", "scatter_add_rows_",
       "norm_relu_pool", "dsa")
# The native and Triton twins of each operator (norm_relu_pool is Triton only, scatter_add_rows_ native only).
_HAS = {"native": set(OPS) - {"norm_relu_pool"}, "triton": set(OPS) - {"scatter_add_rows_"}}


def _cuda_backends_from_env(text):
    """CUDA_BACKENDS with LTDD_CUDA_BACKENDS="op=backend,op=backend" applied (e.g. param_distance=native)."""
    chosen = {op: "native" if op in _HAS["native"] else "triton" for op in OPS}
    for item in filter(None, (x.strip() for x in text.split(","))):
        op, _, backend = item.partition("=")
        if op not in OPS or backend not in ("native", "triton"):
            raise ValueError(f"LTDD_CUDA_BACKENDS entry {item!r}: expected op=native|triton with op one of {OPS}")
        chosen[op] = backend
    return chosen


# Which fast backend "auto" picks for CUDA tensors, per operator: the native CUDA kernel wherever there is one.
# On an H100 (bench/results/h100-80gb-hbm3-ops-{native,triton}-2026-11-22.json) it was faster than the Triton twin
# at every size, 1.0x (SGD step at 11M parameters, both at the copy bandwidth) to 6.6x (class_grad_stats); the
# Triton launches cost 60-150 us of host time each against the native ops' 15-35 us. Set per op with
# set_cuda_backend() or the environment variable LTDD_CUDA_BACKENDS="param_distance=triton,...".
CUDA_BACKENDS = _cuda_backends_from_env(os.environ.get("LTDD_CUDA_BACKENDS", ""))


def set_cuda_backend(op_name, backend):
    """Make backend="auto" run `op_name` on CUDA tensors with `backend` ("native" or "triton")."""
    if op_name not in OPS or backend not in ("native", "triton"):
        raise ValueError(f"expected an op of {OPS} and a backend 'native' or 'triton', got {op_name!r}, {backend!r}")
    CUDA_BACKENDS[op_name] = backend


# (op, device type) pairs found to have a native kernel. The dispatcher lookup costs a few microseconds per call,
# a sizeable part of a small op (a 0.3M-parameter student step takes ~50 us); kernels, once registered, stay.
_NATIVE_KERNELS = set()


@torch.compiler.assume_constant_result  # traced code (torch.compile) takes the answer as a constant
def _native_supports(op_name, device):
    if not NATIVE_AVAILABLE or op_name not in _HAS["native"]:
        return False
    if (op_name, device.type) in _NATIVE_KERNELS:
        return True
    found = torch._C._dispatch_has_kernel_for_dispatch_key(f"ltdd_fast::{op_name}", device.type.upper())
    if found:
        _NATIVE_KERNELS.add((op_name, device.type))
    return found


@torch.compiler.assume_constant_result
def _triton_problem(op_name, device):
    """Why the Triton kernel of op_name cannot run on device (None when it can). Imports Triton."""
    if op_name not in _HAS["triton"]:
        return f"ltdd_fast has no Triton kernel for {op_name}"
    from . import kernels
    if not kernels.AVAILABLE:
        return f"Triton is not installed ({kernels.IMPORT_ERROR}): pip install triton"
    if not kernels.supports(device):
        if kernels.INTERPRET:
            return (f"Triton runs in its interpreter (TRITON_INTERPRET=1) in this process, on CPU tensors only; "
                    f"got {device.type} tensors")
        return (f"Triton kernels need CUDA tensors (got {device.type}); on CPU they run only under its interpreter: "
                f"set TRITON_INTERPRET=1 before ltdd_fast.kernels is imported")
    return None


def backend_problem(backend, device):
    """Why `backend` cannot run its operators on `device` in this process (None when it can): a check for
    callers that want to fail before any work, e.g. the Distiller."""
    device = torch.device(device)
    if backend == "triton":
        return _triton_problem("param_distance", device)
    if backend == "native" and not _native_supports("param_distance", device):
        return f"this build has no native kernels for {device.type} tensors"
    return None


def _pick(backend, op_name, device):
    """"native", "triton" or "reference" for this op on tensors of `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "native":
        if not _native_supports(op_name, device):
            raise RuntimeError(f"ltdd_fast::{op_name} has no native kernel for {device.type} tensors in this build")
        return "native"
    if backend == "triton":
        problem = _triton_problem(op_name, device)
        if problem:
            raise RuntimeError(f"backend='triton' cannot run {op_name}: {problem}")
        return "triton"
    # auto
    if device.type == "cuda" and CUDA_BACKENDS.get(op_name) == "triton" and _triton_problem(op_name, device) is None:
        return "triton"
    if _native_supports(op_name, device):
        return "native"
    if device.type == "cuda" and _triton_problem(op_name, device) is None:
        return "triton"
    return "reference"


_TRITON_OPS = {}


def _triton_op(op_name):
    """torch.ops.ltdd_triton.<op_name>, defined (and given the shared autograd formula) on first use."""
    if op_name not in _TRITON_OPS:
        importlib.import_module(f"ltdd_fast.kernels.{op_name}")
        if op_name in _AUTOGRAD:
            backward, setup = _AUTOGRAD[op_name]
            torch.library.register_autograd(f"ltdd_triton::{op_name}", backward, setup_context=setup)
        if op_name == "dsa":
            backward, setup = _dsa_autograd(lambda: torch.ops.ltdd_triton.dsa)
            torch.library.register_autograd("ltdd_triton::dsa", backward, setup_context=setup)
        _TRITON_OPS[op_name] = getattr(torch.ops.ltdd_triton, op_name)
    return _TRITON_OPS[op_name]


def _fast_op(which, op_name):
    return getattr(torch.ops.ltdd_fast, op_name) if which == "native" else _triton_op(op_name)


def _call_fast(which, op_name, *args):
    """_fast_op(which, op_name)(*args), called below the autograd dispatch key when no gradient is needed: the
    autograd formula registered from Python is a Python kernel that costs ~4 us a call only to find that out and
    redispatch (a tenth of a 0.3M-parameter student step). The test is the one that kernel makes, under the same
    guard; traced code (torch.compile) and torch.func transforms take the ordinary path."""
    op = _fast_op(which, op_name)
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _check_flat_vectors(first, *others, alpha):
    """The first (name, tensor) must be a flat floating-point vector and the others must match it; returns alpha
    as a one-element tensor of its dtype and device."""
    name0, ref = first
    if ref.dim() != 1:
        raise ValueError(f"{name0} must be a flat 1-D parameter vector, got shape {tuple(ref.shape)}")
    if not ref.is_floating_point():
        raise ValueError(f"{name0} must be floating point, got {ref.dtype}")
    for name, t in others:
        if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
            raise ValueError(f"{name} must match {name0} ({tuple(ref.shape)}, {ref.dtype}, {ref.device}), "
                             f"got ({tuple(t.shape)}, {t.dtype}, {t.device})")
    if not torch.is_tensor(alpha):
        alpha = torch.tensor(float(alpha), dtype=ref.dtype, device=ref.device)
    if alpha.numel() != 1:
        raise ValueError(f"alpha must hold one value, got shape {tuple(alpha.shape)}")
    return alpha


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


def student_sgd_step(theta, grad, grad_sum, alpha, frozen=None, backend="auto"):
    """One student step on the flat parameter vector in one pass.

    Returns (theta - alpha * g', grad_sum + g') where g' is grad with the slice `frozen` = (start, end)
    zeroed (the classifier phase freezes the backbone this way). alpha is a float or a one-element tensor.
    """
    alpha = _check_flat_vectors(("theta", theta), ("grad", grad), ("grad_sum", grad_sum), alpha=alpha)
    start, end = frozen if frozen is not None else (0, 0)
    if not 0 <= start <= end <= theta.numel():
        raise ValueError(f"frozen range ({start}, {end}) must lie within [0, {theta.numel()}]")
    which = _pick(backend, "student_sgd_step", theta.device)
    if which == "reference":
        return reference.student_sgd_step(theta, grad, grad_sum, alpha, start, end)
    alpha = alpha if alpha.dtype == theta.dtype else alpha.to(theta.dtype)
    return _call_fast(which, "student_sgd_step", theta, grad, grad_sum, alpha, start, end)



# ---- shared input checks of the ops below ----------------------------------------------------------------

def _check_classes(classes, rows, num_classes, device, what):
    if not torch.is_tensor(classes) or classes.dtype != torch.int64 or classes.shape != (rows,):
        got = f"{classes.dtype} {tuple(classes.shape)}" if torch.is_tensor(classes) else type(classes).__name__
        raise ValueError(f"classes must be an int64 tensor of shape ({rows},) (one class per row of {what}), "
                         f"got {got}")
    if classes.device != device:
        raise ValueError(f"classes must be on {device}, got {classes.device}")
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    # a range check on an accelerator would synchronise every call; the kernels check on CPU anyway
    if classes.device.type == "cpu" and rows:
        lo, hi = (int(x) for x in torch.aminmax(classes))  # one pass for both bounds
        if not (0 <= lo and hi < num_classes):
            raise ValueError(f"classes must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


# ---- normalised parameter distance (METHOD section 6) ------------------------------------------------

if NATIVE_AVAILABLE:
    @torch.library.register_fake("ltdd_fast::param_distance")
    def _param_distance_fake(theta_0, theta_T, grad_sum, alpha, mask):
        return theta_0.new_empty(()), torch.empty_like(theta_0), theta_0.new_empty(())


def _param_distance_setup(ctx, inputs, output):
    theta_0, theta_T, grad_sum, alpha, mask = inputs
    loss, v, d_alpha = output
    ctx.mark_non_differentiable(v, d_alpha)
    ctx.save_for_backward(theta_0, theta_T, grad_sum, alpha, mask, loss, v, d_alpha)


def _param_distance_backward(ctx, d_loss, _d_v, _d_d_alpha):
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


def param_distance(theta_0, theta_T, grad_sum, alpha, mask=None, backend="auto"):
    """(loss, v, d_alpha) of the normalised parameter distance at theta_N = theta_0 - alpha * grad_sum, in one
    reduction pass: loss = ||m (theta_N - theta_T)||^2 / ||m (theta_0 - theta_T)||^2, v = dloss/dgrad_sum (the
    constant-memory gradient's vector), d_alpha = dloss/dalpha.

    mask: None (all parameters), bool [P], or float [P] (weights m, entering the squares as m^2). loss is
    differentiable w.r.t. theta_0, theta_T, grad_sum and alpha; v and d_alpha are not.
    """
    alpha = _check_flat_vectors(("theta_0", theta_0), ("theta_T", theta_T), ("grad_sum", grad_sum), alpha=alpha)
    if mask is not None:
        if mask.shape != theta_0.shape or mask.device != theta_0.device:
            raise ValueError(f"mask must have theta_0's shape {tuple(theta_0.shape)} on {theta_0.device}, "
                             f"got {tuple(mask.shape)} on {mask.device}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"mask must be bool or floating point, got {mask.dtype}")
    which = _pick(backend, "param_distance", theta_0.device)
    if which == "reference":
        out = reference.param_distance_terms(theta_0, theta_T, grad_sum, alpha, mask)
    else:
        if alpha.dtype != theta_0.dtype or alpha.dim() != 0:
            alpha = alpha.to(theta_0.dtype).reshape(())
        out = _call_fast(which, "param_distance", theta_0, theta_T, grad_sum, alpha, mask)
    # An all-False / zero mask makes the denominator 0 and every output nan. Checked after the call, and only when
    # the loss is not finite, so the common case pays no extra pass over the mask (.item() rather than a
    # torch.isfinite op: the same sync, a fraction of the cost).
    if mask is not None and not math.isfinite(out[0].item()) and not mask.any():
        raise ValueError("mask selects no parameter (all False / zero): the distance is undefined")
    return out


# ---- DAM soft-label cross-entropy with per-class statistics (METHOD section 7) ------------------------

if NATIVE_AVAILABLE:
    @torch.library.register_fake("ltdd_fast::soft_ce_stats")
    def _soft_ce_stats_fake(logits, target_logits, class_weights, classes, num_classes):
        stat = logits.new_empty((num_classes,))
        return (logits.new_empty(()), torch.empty_like(logits), torch.empty_like(target_logits), stat,
                classes.new_empty((num_classes,)), torch.empty_like(stat))


def _soft_ce_stats_setup(ctx, inputs, output):
    logits, target_logits, class_weights, _, _ = inputs
    _, grad_logits, grad_target, *stats = output
    ctx.mark_non_differentiable(grad_logits, grad_target, *stats)
    ctx.save_for_backward(grad_logits, grad_target, logits, target_logits, class_weights)


def _soft_ce_stats_backward(ctx, d_loss, *_):
    grad_logits, grad_target, logits, target_logits, class_weights = ctx.saved_tensors
    wanted = ctx.needs_input_grad[:2]
    if torch.is_grad_enabled():
        # create_graph=True (a double backward, as the constant-memory second pass takes): the kernel's gradients
        # are constants, so differentiate the reference formula instead, which keeps its dependence on the inputs
        inputs = [t for t, w in zip((logits, target_logits), wanted) if w]
        loss = reference.soft_cross_entropy(logits, target_logits, class_weights)
        grads = iter(torch.autograd.grad(loss, inputs, d_loss, create_graph=True))
        return (next(grads) if wanted[0] else None, next(grads) if wanted[1] else None, None, None, None)
    return (d_loss * grad_logits if wanted[0] else None, d_loss * grad_target if wanted[1] else None,
            None, None, None)


def soft_ce_stats(logits, target_logits, class_weights, classes, num_classes=None, backend="auto"):
    """The DAM loss (1/B) sum_i sum_c w_c softmax(target_i)_c (-log softmax(logits_i)_c) with its gradients and
    per-class statistics in one kernel.

    classes [B] int64 names each row's class (for the statistics); num_classes defaults to C. Returns (loss,
    grad_logits, grad_target, class_loss_sum [K], class_count [K] int64, class_grad_norm [K]) as
    reference.soft_ce_stats. loss is differentiable w.r.t. logits and target_logits (not class_weights): a first
    order backward scales the kernel's gradients; a backward with create_graph=True differentiates the reference
    formula, so higher derivatives are exact (and cost what the reference costs).
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
    _check_classes(classes, b, num_classes, logits.device, "logits")
    which = _pick(backend, "soft_ce_stats", logits.device)
    if which != "reference":
        return _fast_op(which, "soft_ce_stats")(logits, target_logits, class_weights, classes, num_classes)
    return reference.soft_ce_stats(logits, target_logits, class_weights, classes, num_classes)


# ---- per-class gradient-norm statistics -----------------------------------------------------------------

if NATIVE_AVAILABLE:
    @torch.library.register_fake("ltdd_fast::class_grad_stats")
    def _class_grad_stats_fake(grads, classes, num_classes):
        return grads.new_empty((num_classes,)), grads.new_empty((num_classes,))


def class_grad_stats(grads, classes, num_classes, backend="auto"):
    """(norm_sum [K], norm_max [K]): the L2 norms of each image's gradient grads[i] summed and maxed over each
    class; an empty class gives 0. A statistic, so not differentiable (grads is read detached)."""
    if grads.dim() < 1 or not grads.is_floating_point():
        raise ValueError(f"grads must be a floating point [N, ...] tensor, got {grads.dtype} {tuple(grads.shape)}")
    _check_classes(classes, grads.shape[0], num_classes, grads.device, "grads")
    grads = grads.detach()
    which = _pick(backend, "class_grad_stats", grads.device)
    if which != "reference":
        return _fast_op(which, "class_grad_stats")(grads, classes, num_classes)
    return reference.class_grad_stats(grads, classes, num_classes)


# ---- row scatter-add ---------------------------------------------------------------------------------------

if NATIVE_AVAILABLE:
    @torch.library.register_fake("ltdd_fast::scatter_add_rows_")
    def _scatter_add_rows_fake(target, index, src):
        return None


def scatter_add_rows_(target, index, src, backend="auto"):
    """target[index[i]] += src[i] for every i, in place (repeated indices accumulate); returns target.

    Deterministic on CPU. No autograd: it accumulates gradients, it is not differentiated itself."""
    if target.dim() < 1 or not target.is_floating_point():
        raise ValueError(f"target must be a floating point [M, ...] tensor, got {target.dtype} {tuple(target.shape)}")
    if not torch.is_tensor(index) or index.dtype != torch.int64 or index.dim() != 1 or index.device != target.device:
        got = f"{index.dtype} {tuple(index.shape)} on {index.device}" if torch.is_tensor(index) else type(index).__name__
        raise ValueError(f"index must be a 1-D int64 tensor on {target.device}, got {got}")
    want = (index.shape[0], *target.shape[1:])
    if src.shape != want or src.dtype != target.dtype or src.device != target.device:
        raise ValueError(f"src must be {want} {target.dtype} on {target.device}, "
                         f"got {tuple(src.shape)} {src.dtype} on {src.device}")
    if index.device.type == "cpu" and index.numel():
        lo, hi = (int(x) for x in torch.aminmax(index))  # one pass for both bounds
        if not (0 <= lo and hi < target.shape[0]):
            raise ValueError(f"index must lie in [0, {target.shape[0]}) (rows of target), got values in [{lo}, {hi}]")
    if _pick(backend, "scatter_add_rows_", target.device) != "reference":
        torch.ops.ltdd_fast.scatter_add_rows_(target, index, src)
    else:
        target.copy_(reference.scatter_add_rows(target, index, src))
    return target


# ---- the DSA augmentation chain --------------------------------------------------------------------------------

if NATIVE_AVAILABLE:
    @torch.library.register_fake("ltdd_fast::dsa")
    def _dsa_fake(x, values, flags, cutout_h, cutout_w, transpose):
        return x.new_empty(x.shape)


def _dsa_autograd(op):
    """(backward, setup_context) of the dsa operator op(). The chain is affine in the image, x -> L x + c (c:
    brightness's constant), so its gradient is the transpose L^T and the transpose's gradient L: the chain with
    brightness switched off. To any order."""
    def setup(ctx, inputs, output):
        _, values, flags, cutout_h, cutout_w, transpose = inputs
        if transpose:  # (on the device: no host sync)
            flags = flags.clone()
            flags[AUG_OPS.index("brightness")] = 0
        ctx.save_for_backward(values, flags)
        ctx.args = (cutout_h, cutout_w, not transpose)

    def backward(ctx, d_out):
        values, flags = ctx.saved_tensors
        return op()(d_out.contiguous(), values, flags, *ctx.args), None, None, None, None, None
    return backward, setup


def dsa(x, values, flags, transpose=False, backend="auto"):
    """The DSA chain of one call on images x [B, C, H, W] in one kernel (or with transpose=True its transpose,
    in one kernel): the ops that flags [len(augment.OPS)] int32 switch on, in augment.OPS's order, each image
    with its row of draws in values [B, augment.PACKED_WIDTH] (x's dtype; augment.AugParams.packed makes both).
    Equals reference.dsa, the ops applied one by one. Differentiable w.r.t. x to any order (the gradient of the
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
    which = _pick(backend, "dsa", x.device)
    if which == "reference":
        return reference.dsa(x, values, flags, transpose)
    return _call_fast(which, "dsa", x, values, flags, *cutout_size(h, w), bool(transpose))


# ---- instance norm + ReLU + 2x2 average pool (the memory-bound tail of a ConvNet block) ------------------------


def norm_relu_pool(x, weight, bias, backend="auto"):
    """avg_pool2d(relu(instance_norm(x) * weight + bias), 2): x [B, C, H, W], weight and bias [C].

    Triton only ("auto" takes it for CUDA tensors when CUDA_BACKENDS says so, the reference otherwise; "native"
    has no kernel for it and runs the reference). Differentiable to any order: the Triton op's first-order
    backward is a fused kernel and its double backward differentiates the reference (kernels/norm_relu_pool.py).
    """
    which = "reference" if backend == "native" else _pick(backend, "norm_relu_pool", x.device)
    if which == "triton":
        return importlib.import_module("ltdd_fast.kernels.norm_relu_pool").norm_relu_pool(x, weight, bias)
    return _reference_norm_relu_pool(x, weight, bias)


_AUTOGRAD = {"student_sgd_step": (_student_sgd_step_backward, _student_sgd_step_setup),
             "param_distance": (_param_distance_backward, _param_distance_setup),
             "soft_ce_stats": (_soft_ce_stats_backward, _soft_ce_stats_setup)}
if NATIVE_AVAILABLE:
    for _name, (_backward, _setup) in _AUTOGRAD.items():
        torch.library.register_autograd(f"ltdd_fast::{_name}", _backward, setup_context=_setup)
    _backward, _setup = _dsa_autograd(lambda: torch.ops.ltdd_fast.dsa)
    torch.library.register_autograd("ltdd_fast::dsa", _backward, setup_context=_setup)
