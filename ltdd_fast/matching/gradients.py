"""The constant-memory matching gradient of one phase's students (two_pass_gradients) and of a whole
iteration's phases (iteration_gradients), on the fused operators."""
import contextlib
from dataclasses import dataclass

import torch

from .. import distributed, ops, reference
from ..config import check_matching_options
from ..errors import ConfigError
from .second_pass import FD_EPS, MIXED, fd_steps, mixed_compiled, mixed_exact, mixed_forward, mixed_fd, student_grad
from .students import Problem, as_students, rows_of, split_leaf, widen

@dataclass(frozen=True)
class Options:
    """How two_pass_gradients computes (none of it changes the gradient, except the approximations second_pass fd
    and precision bf16): see its docstring."""
    second_pass: str = "exact"
    chunk: int | None = None
    precision: str = "full"
    compile: str | None = None
    store_thetas: bool = False
    fd_eps: float | None = None

    def __post_init__(self):
        check_matching_options("argument", second_pass=self.second_pass, precision=self.precision,
                               compile=self.compile, chunk=self.chunk)


def two_pass_gradients(net, images, labels, alpha, phase, dsa, classes=None, backend="native", **options):
    """(L, dL/dimages, dL/dlabels, dL/dalpha) as reference.two_pass_gradients, on the fused operators.

    phase: a phases.Phase, or a list of K of them (K students; the result is the mean over students).
    classes [M] is each synthetic image's class (for the loss statistics); default: the labels' argmax.

    Memory: TESLA keeps theta_0..theta_{N-1} from pass 1 for pass 2, N parameter vectors. Pass 2 computes each
    step's gradient g_k anyway (to differentiate v . g_k), and theta_{k+1} = theta_k - alpha g_k, so by default
    (options store_thetas=False) pass 2 re-walks the trajectory from theta_0 with those same gradients and keeps one
    vector: memory does not grow with syn_steps, at no extra gradient evaluation (fd mode takes g_k from its two
    points). The walk equals pass 1's up to floating-point reassociation. store_thetas=True keeps pass 1's
    vectors, as the reference does.

    compile (one of COMPILE_MODES; None runs eagerly): each step's student terms run as torch.func functions
    under torch.compile (fixed shapes; "reduce-overhead" adds CUDA graphs on a GPU): pass 1's gradient
    (student_grad) in every mode, and pass 2's (exact_terms: reverse over reverse, traced whole; fd_grads).
    The compiled network has its plain PyTorch blocks (inductor fuses them) and the loss its plain formula, not
    the fused operators. The augmentation runs inside the compiled functions too (ops.dsa, traced: one kernel
    for the chain and, in pass 2, one for its transpose), each function taking the gathered images and the
    step's packed draws; draws with no fused form are augmented op by op outside. A "forward" pass 2 runs
    eagerly.

    options: the fields of Options (second_pass, chunk, precision, compile, store_thetas, fd_eps), checked once."""
    opts = Options(**options)
    second_pass, chunk, precision, compile = opts.second_pass, opts.chunk, opts.precision, opts.compile
    store_thetas = opts.store_thetas
    phases = as_students(phase)
    if chunk and chunk < len(phases[0].batches[0]) and net.uses_batch_statistics:
        raise ConfigError(f"chunk {chunk}: {net.name} normalises with batch statistics, so a minibatch cannot be "
                          f"split; use a network with instance norm or no chunk")
    dt = images.dtype
    images, labels = images.detach(), labels.detach()
    classes = labels.argmax(1) if classes is None else classes.to(images.device)
    a = alpha.detach().to(dt).reshape(())
    first = phases[0]
    weights = first.class_weights.to(dt) if first.class_weights is not None else None
    frozen = first.frozen
    prob = Problem(net, phases, dsa, weights, precision, compile, backend)
    k, steps, num_classes = prob.k, len(first.batches), labels.shape[1]
    pieces = rows_of(prob.batch, chunk)
    scatter_backend = "auto" if backend == "triton" else backend

    head = prob.head
    mixed = mixed_exact if head is not None else MIXED[second_pass]  # a classifier-only pass 2 is exact
    if compile is not None and mixed is mixed_exact:
        mixed = mixed_compiled
    theta_0 = torch.stack([p.theta_0.detach().to(dt) for p in phases])  # [K, P]
    theta, G, thetas = theta_0, torch.zeros_like(theta_0), []
    for step in range(steps):
        if store_thetas:
            thetas.append(theta)
        g = None
        for rows in pieces:
            idx = prob.index(step, rows)
            x = images[idx]
            if compile is not None:
                draws, x, _ = prob.augmented(x, step, rows)
                (gc,) = prob.rescale(rows, prob.run(student_grad, theta, x, draws, prob.backend, labels[idx],
                                                    weights, head))
            else:
                u = prob.inputs(x, step, rows)
                leaf, flats, classifier = split_leaf(theta, head)
                with torch.enable_grad():
                    loss = ops.soft_ce_stats(prob.logits(flats, u, classifier), labels[idx], weights, classes[idx],
                                             num_classes, backend=backend)[0]
                    (gc,) = torch.autograd.grad(prob.scaled(loss, rows), leaf)
            gc = widen(gc, theta, head)
            g = gc if g is None else g + gc
        theta, G = _sgd_step(theta, g, G, a, frozen, backend)

    mask = first.mask.to(images.device) if first.mask is not None else None
    terms = [ops.param_distance(theta_0[i], p.theta_T.detach().to(dt), G[i], a, mask, backend=backend)
             for i, p in enumerate(phases)]
    L = sum(t[0] for t in terms) / k
    V = torch.stack([t[1] for t in terms]) / k if k > 1 else terms[0][1].unsqueeze(0)
    g_alpha = sum(t[2] for t in terms) / k
    if frozen is not None:  # v . (keep * g) = (keep * v) . g
        V = V.clone()
        V[:, frozen[0]:frozen[1]] = 0

    g_x = torch.zeros_like(images)
    g_y = torch.zeros_like(labels)
    block = net.block_backend_as("reference") if mixed is mixed_forward else contextlib.nullcontext()
    with block:
        theta_k = theta_0
        compute = torch.bfloat16 if precision == "bf16" else dt
        h = fd_steps(theta_0, V, opts.fd_eps or FD_EPS.get(compute, 1e-2)) if mixed is mixed_fd else None
        for step in range(steps):
            if store_thetas:
                theta_k = thetas[step]
            walk = not store_thetas and step + 1 < steps
            g_step = None
            for rows in pieces:
                idx = prob.index(step, rows)
                gk, dx, dy = mixed(prob, theta_k, V, images[idx], labels[idx], step, rows, h, walk)
                if gk is not None:
                    g_step = gk if g_step is None else g_step + gk
                if dx is not None:
                    ops.scatter_add_rows_(g_x.view(g_x.shape[0], -1), idx, dx.reshape(dx.shape[0], -1),
                                          backend=scatter_backend)
                if dy is not None:
                    ops.scatter_add_rows_(g_y, idx, dy, backend=scatter_backend)
            if walk:  # theta_{k+1}, from this step's (frozen-masked) g
                if frozen is not None:
                    g_step[:, frozen[0]:frozen[1]] = 0
                theta_k = torch.addcmul(theta_k, a, g_step, value=-1)  # one kernel for theta_k - a g_step
    return L.detach(), g_x, g_y, g_alpha.to(alpha.dtype).reshape(alpha.shape)


def _sgd_step(theta, g, G, a, frozen, backend):
    """The K students' SGD step on [K, P] (one fused call on the flattened vectors)."""
    if theta.shape[0] == 1:
        t, s = ops.student_sgd_step(theta[0], g[0], G[0], a, frozen=frozen, backend=backend)
        return t.unsqueeze(0), s.unsqueeze(0)
    if frozen is not None:
        g[:, frozen[0]:frozen[1]] = 0  # g is this step's own sum of fresh gradients
    t, s = ops.student_sgd_step(theta.reshape(-1), g.reshape(-1), G.reshape(-1), a, backend=backend)
    return t.view_as(theta), s.view_as(theta)


def iteration_gradients(net, images, labels, alpha, weighted_phases, dsa, classes=None, backend="native",
                        cudnn_benchmark=False, **options):
    """One distillation iteration's gradients: sum over phases of weight * (the mean over the phase's students).

    weighted_phases: (name, weight, [Phase, ...]) per Expert-Decoupling phase, a list of K students each.
    backend "reference" runs reference.two_pass_gradients student after student (the plain loop, `options`
    ignored); any other backend runs two_pass_gradients with `options` (second_pass, chunk, precision, ...).
    cudnn_benchmark: the fast path runs with torch.backends.cudnn.benchmark on (cuDNN times its convolution
    algorithms for each new shape and keeps the fastest: the student's shapes are fixed; a CUDA-only effect, whose
    pick may differ between runs), restored afterwards.
    Under torchrun (distributed.world() with several ranks) every rank passes the same weighted_phases; each
    computes its share (share_of) and one all-reduce sums them, so every rank returns the whole iteration's
    gradients: the single-process result up to floating-point reassociation.
    Returns ({name: loss tensor}, dL/dimages, dL/dlabels, dL/dalpha); nothing is updated."""
    if cudnn_benchmark and backend != "reference" and not torch.backends.cudnn.benchmark:
        torch.backends.cudnn.benchmark = True
        try:
            return iteration_gradients(net, images, labels, alpha, weighted_phases, dsa, classes, backend, **options)
        finally:
            torch.backends.cudnn.benchmark = False
    world = distributed.world()
    local = share_of(weighted_phases, world) if world.active else weighted_phases
    losses = {}
    g_img, g_y, g_a = torch.zeros_like(images), torch.zeros_like(labels), torch.zeros_like(alpha)
    for name, weight, students in local:
        if backend == "reference":
            parts = [reference.two_pass_gradients(net, images, labels, alpha, p, dsa) for p in students]
            loss, gi, gy, ga = (sum(t) / len(parts) if len(parts) > 1 else t[0] for t in zip(*parts))
        else:
            loss, gi, gy, ga = two_pass_gradients(net, images, labels, alpha, students, dsa, classes=classes,
                                                  backend=backend, **options)
        losses[name] = loss
        g_img += weight * gi
        g_y += weight * gy
        g_a += weight * ga
    if not world.active:
        return losses, g_img, g_y, g_a
    # each phase's loss as its share of the phase's mean; one all-reduce (in float64) of everything
    shares = {name: weight for name, weight, _ in local}
    full = {name: weight for name, weight, _ in weighted_phases}
    zero = torch.zeros((), device=g_img.device, dtype=torch.float64)
    loss_vec = torch.stack([losses[name].double() * (shares[name] / full[name]) if name in losses else zero
                            for name in full])
    parts = (g_img, g_y, g_a.reshape(1), loss_vec)
    packed = torch.cat([t.detach().double().reshape(-1) for t in parts])
    distributed.all_reduce_sum([packed], "summing an iteration's gradients")
    g_img, g_y, g_a, loss_vec = (chunk.view(t.shape).to(t.dtype) for chunk, t in
                                 zip(packed.split([t.numel() for t in parts]), parts))
    return dict(zip(full, loss_vec.to(images.dtype).unbind())), g_img, g_y, g_a.reshape(alpha.shape)


def share_of(weighted_phases, world):
    """This rank's part of an iteration's matching problems: the (phase, student) pairs dealt round-robin over
    the ranks, phase by phase (2 ranks and one student: a phase each; more ranks: the students too), each phase's
    weight scaled by the share of its students taken here, so that the sum over the ranks is the iteration."""
    units = [(p, k) for p, (_, _, students) in enumerate(weighted_phases) for k in range(len(students))]
    mine = world.mine(units)
    out = []
    for p, (name, weight, students) in enumerate(weighted_phases):
        taken = [students[k] for q, k in mine if q == p]
        if taken:
            out.append((name, weight * len(taken) / len(students), taken))
    return out
