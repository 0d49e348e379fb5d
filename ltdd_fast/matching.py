"""The constant-memory matching gradient on the fused operators: the fast twin of reference.two_pass_gradients.

Pass 1 runs the student on ops.soft_ce_stats (its backward is first order, which is all pass 1 needs) and
ops.student_sgd_step; ops.param_distance turns the end point into L, v and dL/dalpha in one reduction.
Pass 2 differentiates the student gradient once more (d/dX of v . g_k): it takes the plain loss (the fused op
would also compute gradients and statistics that pass 2 does not use; its double backward is the reference's
anyway) and scatters each step's batch gradients with ops.scatter_add_rows_ (native, or the reference: it has no
Triton twin). The network's blocks run on whatever backend was set on `net` (FunctionalNet.set_block_backend).
"""
import torch

from . import ops, reference


def _batch(images, labels, idx, aug, dsa):
    x = images[idx]
    return (dsa.apply(x, aug) if dsa is not None and aug is not None else x), labels[idx]


def two_pass_gradients(net, images, labels, alpha, phase, dsa, classes=None, backend="native", store_thetas=False):
    """(L, dL/dimages, dL/dlabels, dL/dalpha) as reference.two_pass_gradients, on the fused operators.

    classes [M] is each synthetic image's class (for the loss statistics); default: the labels' argmax.

    Memory: TESLA keeps theta_0..theta_{N-1} from pass 1 for pass 2, N parameter vectors. Pass 2 computes each
    step's gradient g_k anyway (to differentiate v . g_k), and theta_{k+1} = theta_k - alpha g_k, so by default
    (store_thetas=False) pass 2 re-walks the trajectory from theta_0 with those same gradients and keeps one
    vector: memory does not grow with syn_steps, at no extra gradient evaluation. The walk equals pass 1's up
    to floating-point reassociation (pass 2's g_k comes from the double-differentiable loss). store_thetas=True
    keeps pass 1's vectors, as the reference does."""
    dt = images.dtype
    images, labels = images.detach(), labels.detach()
    classes = labels.argmax(1) if classes is None else classes.to(images.device)
    theta_0, theta_T = phase.theta_0.detach().to(dt), phase.theta_T.detach().to(dt)
    a = alpha.detach().to(dt).reshape(())
    weights = phase.class_weights.to(dt) if phase.class_weights is not None else None
    augs = phase.aug if phase.aug is not None else [None] * len(phase.batches)
    frozen = phase.frozen
    scatter_backend = "auto" if backend == "triton" else backend

    theta, G, thetas = theta_0, torch.zeros_like(theta_0), []
    for idx, aug in zip(phase.batches, augs):
        if store_thetas:
            thetas.append(theta)
        x, y = _batch(images, labels, idx, aug, dsa)
        leaf = theta.detach().requires_grad_()
        with torch.enable_grad():
            loss = ops.soft_ce_stats(net.forward(leaf, x), y, weights, classes[idx], labels.shape[1],
                                     backend=backend)[0]
            (g,) = torch.autograd.grad(loss, leaf)
        theta, G = ops.student_sgd_step(theta, g, G, a, frozen=frozen, backend=backend)

    mask = phase.mask.to(images.device) if phase.mask is not None else None
    L, v, g_alpha = ops.param_distance(theta_0, theta_T, G, a, mask, backend=backend)

    g_x = torch.zeros_like(images)
    g_y = torch.zeros_like(labels)
    theta_k = theta_0
    for k, (idx, aug) in enumerate(zip(phase.batches, augs)):
        if store_thetas:
            theta_k = thetas[k]
        xb = images[idx].requires_grad_()
        yb = labels[idx].requires_grad_()
        with torch.enable_grad():
            x = dsa.apply(xb, aug) if dsa is not None and aug is not None else xb
            leaf = theta_k.detach().requires_grad_()
            loss = reference.soft_cross_entropy(net.forward(leaf, x), yb, weights)
            (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
            if frozen is not None:
                keep = torch.ones_like(g)
                keep[frozen[0]:frozen[1]] = 0
                g = g * keep
            dx, dy = torch.autograd.grad((v * g).sum(), (xb, yb), allow_unused=True)
        if not store_thetas and k + 1 < len(phase.batches):  # theta_{k+1}, from this step's (frozen-masked) g
            theta_k = theta_k - a * g.detach()
        if dx is not None:
            ops.scatter_add_rows_(g_x.view(g_x.shape[0], -1), idx, dx.reshape(dx.shape[0], -1),
                                  backend=scatter_backend)
        if dy is not None:
            ops.scatter_add_rows_(g_y, idx, dy, backend=scatter_backend)
    return L.detach(), g_x, g_y, g_alpha.to(alpha.dtype).reshape(alpha.shape)
