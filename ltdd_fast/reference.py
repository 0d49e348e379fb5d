"""Plain PyTorch versions of every operator: the ground truth that the fast paths are tested against."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import AugParams, apply_chain


def student_sgd_step(theta, grad, grad_sum, alpha, frozen_start=0, frozen_end=0):
    """theta_next = theta - alpha * g', grad_sum_next = grad_sum + g', g' = grad zeroed on [frozen_start, frozen_end)."""
    g = grad.clone()
    g[frozen_start:frozen_end] = 0
    return theta - alpha * g, grad_sum + g


# ---- losses (METHOD.md sections 6, 7) ----


def dam_weights(class_counts, f: float = 0.0) -> Tensor:
    """DAM class weights w_c = (n_c + f) / (sum_c n_c + f), float32 [C]."""
    n = torch.as_tensor(class_counts, dtype=torch.float64)
    return ((n + f) / (n.sum() + f)).float()


def soft_cross_entropy(logits, target_logits, class_weights=None) -> Tensor:
    """(1/B) sum_i sum_c w_c * softmax(target_i)_c * (-log_softmax(logits_i)_c); w = 1 when None."""
    per_class = -F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)
    if class_weights is not None:
        per_class = per_class * class_weights.to(per_class)
    return per_class.sum(1).mean()


def _mask_multiplier(mask, like: Tensor) -> Tensor | None:
    return None if mask is None else mask.to(device=like.device, dtype=like.dtype)


def param_distance(theta, theta_0, theta_T, mask=None) -> Tensor:
    """||m*(theta - theta_T)||^2 / ||m*(theta_0 - theta_T)||^2 with m the mask as a float (None = all ones)."""
    m = _mask_multiplier(mask, theta)
    num, den = theta - theta_T, theta_0 - theta_T
    if m is not None:
        num, den = m * num, m * den
    return num.pow(2).sum() / den.pow(2).sum()


# ---- the fused operators' references (schemas in csrc/ops.cpp) ----


def param_distance_terms(theta_0, theta_T, grad_sum, alpha, mask=None) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, v, d_alpha) of the matching loss at theta_N = theta_0 - alpha * grad_sum (METHOD section 6).

    loss = param_distance(theta_N, theta_0, theta_T, mask) keeps its graph; v = dloss/dgrad_sum and
    d_alpha = dloss/dalpha are returned detached (the native op's v and d_alpha are not differentiable)."""
    loss = param_distance(theta_0 - alpha * grad_sum, theta_0, theta_T, mask)
    t0, tT, G = theta_0.detach(), theta_T.detach(), grad_sum.detach()
    a = torch.as_tensor(alpha).detach().to(t0)
    m = _mask_multiplier(mask, t0)
    m2 = torch.ones_like(t0) if m is None else m * m  # m enters both squared norms
    D = (m2 * (t0 - tT).pow(2)).sum()
    r = t0 - a * G - tT
    v = -2 * a * m2 * r / D
    d_alpha = -2 * (G * m2 * r).sum() / D
    return loss, v, d_alpha


def soft_ce_stats(logits, target_logits, class_weights, classes, num_classes):
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


def class_grad_stats(grads, classes, num_classes) -> tuple[Tensor, Tensor]:
    """(norm_sum [K], norm_max [K]) of the per-image L2 norms of grads [N, ...] over each class; empty class -> 0."""
    norms = grads.detach().reshape(grads.shape[0], -1).norm(dim=1)
    zeros = norms.new_zeros(num_classes)
    return zeros.index_add(0, classes, norms), zeros.scatter_reduce(0, classes, norms, "amax", include_self=True)


def scatter_add_rows(target, index, src) -> Tensor:
    """A new tensor: target with src[i] added to row index[i] for every i (repeated indices accumulate)."""
    return target.index_add(0, index, src)


# ---- one Expert-Decoupling phase (METHOD.md section 8) ----


@dataclass
class Phase:
    """One Expert-Decoupling phase's matching problem for one iteration."""

    theta_0: Tensor  # [P] expert snapshot at the start epoch (float32 or float64)
    theta_T: Tensor  # [P] snapshot M epochs later
    batches: list[Tensor]  # syn_steps int64 index tensors into the synthetic set (minibatches X_k)
    mask: Tensor | None = None  # [P] bool: parameters the loss compares; None = all
    frozen: tuple[int, int] | None = None  # slice of each student gradient zeroed (classifier phase)
    class_weights: Tensor | None = None  # DAM weights [C] for the student's inner loss; None = plain soft CE
    aug: list | None = None  # per-step AugParams (None entries = no augmentation), replayed in the second pass


def dsa(x, values, flags, transpose=False) -> Tensor:
    """The DSA chain whose draws ops.dsa takes packed (augment.AugParams.packed) on x, op by op; with transpose
    its transpose, the chain's vector-Jacobian product with cotangent x (the chain is affine in the image)."""
    params = AugParams.unpacked(values, flags)
    if not transpose:
        return apply_chain(x, params)
    with torch.enable_grad():
        point = torch.zeros_like(x, requires_grad=True)
        (out,) = torch.autograd.grad(apply_chain(point, params), point, x, create_graph=x.requires_grad)
    return out


def move_at_once(tensors, device) -> list[Tensor]:
    """tensors on `device`, moved in one copy per dtype (views of it come back, in order; tensors already there
    come back as they are). On CUDA a copy from pageable host memory waits for the stream to drain, so an
    iteration's small draws (a minibatch and an augmentation per student step) moved one by one would stall the
    GPU hundreds of times; here the copies are from pinned memory and do not wait."""
    device = torch.device(device)
    tensors, out, by_dtype = list(tensors), list(tensors), {}
    for i, t in enumerate(tensors):
        # "cuda" is whichever device is current: a tensor on a CUDA device is taken as there
        if not (t.device.type == device.type and device.index in (None, t.device.index)):
            by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        if device.type == "cuda" and flat.device.type == "cpu":
            flat = flat.pin_memory()
        parts = flat.to(device, non_blocking=flat.is_pinned()).split([tensors[i].numel() for i in idx])
        for i, part in zip(idx, parts):
            out[i] = part.view(tensors[i].shape)
    return out


def sample_phase_aug(dsa, batches, im_size, generator) -> list:
    """One augmentation draw per student step, so both passes can replay the same transform: drawn on the
    generator's device, then moved to the batches' device all at once (move_at_once)."""
    if dsa is None:
        return [None] * len(batches)
    here = generator.device if generator is not None else torch.device("cpu")
    augs = [dsa.sample(len(b), tuple(im_size), generator, device=here) for b in batches]
    slots = [(aug, op) for aug in augs for op in aug.ops]
    moved = move_at_once([aug.tensors[op] for aug, op in slots], batches[0].device if batches else here)
    for (aug, op), t in zip(slots, moved):
        aug.tensors[op] = t
    return augs


def student_grad(net, theta, images, labels, idx, aug, dsa, class_weights, frozen, create_graph) -> Tensor:
    """g = d/dtheta soft_cross_entropy(net(theta, A(images[idx])), labels[idx], class_weights), frozen slice zeroed.

    With create_graph the result carries a graph back to theta, images, labels (and whatever they depend on);
    without it, a plain tensor."""
    with torch.enable_grad():
        if not theta.requires_grad:
            # a constant theta (the start point, or theta_k detached) still needs to be differentiated against
            theta = theta.detach().requires_grad_()
        x = images[idx]
        if dsa is not None and aug is not None:
            x = dsa.apply(x, aug)
        loss = soft_cross_entropy(net.forward(theta, x), labels[idx], class_weights)
        (g,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
    if frozen is not None:
        # out-of-place so the zeroed slice also cuts the graph there
        keep = torch.ones_like(g)
        keep[frozen[0] : frozen[1]] = 0
        g = g * keep
    return g if create_graph else g.detach()


def _phase_aug(phase: Phase) -> list:
    return phase.aug if phase.aug is not None else [None] * len(phase.batches)


def _phase_params(phase: Phase, dtype) -> tuple[Tensor, Tensor]:
    # the synthetic set's dtype is the working precision (experts may be stored in float32)
    return phase.theta_0.detach().to(dtype), phase.theta_T.detach().to(dtype)


def unrolled_matching_loss(net, images, labels, alpha, phase: Phase, dsa, detach_params=False) -> Tensor:
    """L = param_distance(theta_N, theta_0, theta_T, mask) through the full unroll theta_{k+1} = theta_k - alpha*g_k.

    detach_params=False: MTT's graph through every step (small sizes only). detach_params=True: each g_k is taken
    at theta_k.detach(), so L depends on images, labels and alpha only through G = sum g_k and theta_N =
    theta_0 - alpha*G - the quantity whose gradient two_pass_gradients computes in constant memory."""
    theta_0, theta_T = _phase_params(phase, images.dtype)
    theta = theta_0
    for idx, aug in zip(phase.batches, _phase_aug(phase)):
        at = theta.detach() if detach_params else theta
        g = student_grad(net, at, images, labels, idx, aug, dsa, phase.class_weights, phase.frozen, create_graph=True)
        theta = theta - alpha * g
    return param_distance(theta, theta_0, theta_T, phase.mask)


def unroll_student(net, images, labels, alpha, phase: Phase, dsa) -> tuple[list[Tensor], Tensor]:
    """Pass 1: the student's unroll without any graph. Returns ([theta_0 .. theta_N], G = sum_k g_k)."""
    theta, _ = _phase_params(phase, images.dtype)
    images, labels, a = images.detach(), labels.detach(), alpha.detach().to(images.dtype)
    thetas, G = [theta], torch.zeros_like(theta)
    for idx, aug in zip(phase.batches, _phase_aug(phase)):
        g = student_grad(net, theta, images, labels, idx, aug, dsa, phase.class_weights, phase.frozen, create_graph=False)
        theta, G = theta - a * g, G + g
        thetas.append(theta)
    return thetas, G


def two_pass_gradients(net, images, labels, alpha, phase: Phase, dsa):
    """Constant-memory (TESLA) matching gradient: (L, dL/dimages, dL/dlabels, dL/dalpha), plain tensors.

    With theta_N = theta_0 - alpha*G, dL/dG = -alpha * dL/dtheta_N = v; pass 2 turns v into image and label
    gradients one step at a time, holding theta_k constant (so it equals unrolled_matching_loss(detach_params=True))."""
    dt = images.dtype
    theta_0, theta_T = _phase_params(phase, dt)
    a = alpha.detach().to(dt)
    thetas, G = unroll_student(net, images, labels, alpha, phase, dsa)
    L = param_distance(thetas[-1], theta_0, theta_T, phase.mask)

    # m enters the squared norms twice, hence m*m (identical to m for a bool mask)
    m = _mask_multiplier(phase.mask, theta_0)
    m2 = torch.ones_like(theta_0) if m is None else m * m
    D = (m2 * (theta_0 - theta_T).pow(2)).sum()
    v = 2 * m2 * (a * (theta_T - theta_0) + a * a * G) / D
    g_alpha = -2 * (G * m2 * (theta_0 - a * G - theta_T)).sum() / D

    # pass 2: fresh leaves so the caller's tensors are never touched; autograd accumulates repeated indices
    x = images.detach().requires_grad_()
    y = labels.detach().requires_grad_()
    g_x, g_y = torch.zeros_like(x), torch.zeros_like(y)
    for theta_k, idx, aug in zip(thetas[:-1], phase.batches, _phase_aug(phase)):
        g = student_grad(net, theta_k, x, y, idx, aug, dsa, phase.class_weights, phase.frozen, create_graph=True)
        dx, dy = torch.autograd.grad((v * g).sum(), (x, y), allow_unused=True)
        if dx is not None:
            g_x += dx
        if dy is not None:
            g_y += dy
    return L.detach(), g_x, g_y, g_alpha.to(alpha.dtype).reshape(alpha.shape)
