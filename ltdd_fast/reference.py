"""Plain PyTorch versions of the whole matching step (METHOD sections 6-8): the ground truth that the fast path,
matching.two_pass_gradients, is tested against. Each fused operator's own reference sits beside it in
ltdd_fast/ops/. Nothing here is on the path of `ltdd distill`'s fast backends.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dam import soft_cross_entropy
from .ops.distance import distance as param_distance, squared_mask
# the README's example builds its phases through these names
from .phases import Phase, sample_phase_aug  # noqa: F401


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
    m2 = squared_mask(phase.mask, theta_0)
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
