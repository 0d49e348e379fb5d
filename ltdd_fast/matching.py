"""The constant-memory matching gradient on the fused operators: the fast twin of reference.two_pass_gradients.

Pass 1 unrolls the student on ops.soft_ce_stats and ops.student_sgd_step; ops.param_distance turns the end point
into L, v and dL/dalpha in one reduction. Pass 2 turns v into image and label gradients one step at a time: it
needs the mixed derivative d/dX (v . g_k), computed one of three ways (`second_pass`):
- "exact": reverse over reverse, as the reference (differentiate g_k, built with create_graph, once more);
- "forward": forward over reverse (torch.func.jvp of the first-order gradient along v): the same derivative up
  to floating-point reassociation. On a CPU it is slower than "exact" and holds more memory (dual tensors);
  it is here to be measured on other devices;
- "fd": central finite differences of the first-order image and label gradients at theta_k +/- h v, with a
  ConvNet's ReLU pattern held at theta_k's (_held_loss). First-order kernels only; an approximation whose
  cosine similarity to the exact gradients bench e2e reports (0.99999999 at CIFAR shapes in fp32).
Pass 2 scatters each step's batch gradients with ops.scatter_add_rows_ (native, or the reference: it has no Triton
twin). The network's blocks run on whatever backend was set on `net` (FunctionalNet.set_block_backend), except in
pass 2 of forward mode (it needs forward-mode derivatives, which only the PyTorch block has) and of fd mode (its
ReLU-pattern block).

compile: the same terms as pure torch.func functions of the step's tensors (_student_grad, _exact_terms, _fd_grads)
traced by torch.compile; the reverse-over-reverse exact term compiles too, as a function (torch.func.grad of
torch.func.grad) rather than as autograd.grad with create_graph. Each takes the gathered images and the step's
packed augmentation draws, and differentiates with respect to the augmented images u: the fused DSA chain runs
inside the graph, and so does its transpose, which maps d/du to the images (_augment, _augment_transpose).

Several students at once: given a list of K phases (K expert trajectories or start epochs, each with its own
minibatches and augmentation, all of one batch size), the K students advance together through
net.forward_students (K-grouped convolutions for a ConvNet) and the result is the mean of their K matching
gradients. K = 1 is the published method.

Memory: `chunk` splits every student minibatch into pieces of at most that many images whose gradients are
summed, so activation memory follows the chunk, not batch_syn (exact for per-sample normalisation; refused for a
network with batch statistics). `precision="bf16"` runs the student's network in bf16.
"""
import contextlib

import torch
import torch.nn.functional as F

from . import ops, reference
from .augment import AugParams
from .errors import ConfigError
from .models.convnet import INSTANCE_NORM_EPS, norm_relu_pool

SECOND_PASSES = ("exact", "forward", "fd")
PRECISIONS = ("full", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile modes; None: eager
# compilations a compiled function may keep (dynamo's default is 8): a run has two phases, up to two piece sizes,
# a gradient with and without respect to theta, and a test session several networks and dtypes
RECOMPILE_LIMIT = 64
_COMPILED = {}
# fd: the perturbation h v has norm fd_eps * max(1, ||theta_k||): truncation error shrinks as h^2, rounding error
# grows as machine epsilon / h. (A ConvNet holds its ReLU pattern fixed, see _held_loss; another network's ReLU
# units that the perturbation flips add jumps of order 1/h, so keep h small there.)
# Keyed by the dtype the network computes in: with precision="bf16" a perturbation of 1e-3 sits below bf16's
# resolution (2^-8) and the difference is rounding (cosine 0.58 to 0.69 against the exact gradients on the test
# ConvNet); 3e-2 gave 0.997 there, against 0.998 for bf16's exact second pass.
FD_EPS = {torch.float64: 1e-5, torch.float32: 1e-3, torch.bfloat16: 3e-2}


def _as_students(phase):
    phases = list(phase) if isinstance(phase, (list, tuple)) else [phase]
    if not phases:
        raise ConfigError("two_pass_gradients needs at least one phase")
    first = phases[0]
    steps, size = len(first.batches), len(first.batches[0])
    for p in phases[1:]:
        if len(p.batches) != steps or any(len(b) != size for b in p.batches):
            raise ConfigError(f"the {len(phases)} students need equal syn_steps and batch sizes: got "
                              f"{len(p.batches)} steps of {[len(b) for b in p.batches][:3]} against {steps} of {size}")
        if p.frozen != first.frozen or (p.mask is None) != (first.mask is None) or \
                (p.class_weights is None) != (first.class_weights is None):
            raise ConfigError("the students of one phase must share its mask, frozen slice and class weights")
    return phases


def _rows(batch_size, chunk):
    """The row slices a minibatch is split into."""
    step = batch_size if not chunk else min(chunk, batch_size)
    return [slice(i, min(i + step, batch_size)) for i in range(0, batch_size, step)]


def _aug_rows(aug, rows, batch):
    """aug's draws for the rows of one piece of a minibatch of `batch` images (aug itself for the whole one)."""
    if aug is None or (rows.start == 0 and rows.stop == batch):
        return aug
    return AugParams(aug.ops, {k: t[rows] for k, t in aug.tensors.items()})


class _Problem:
    """One phase's K students: their batches, the loss and the network call, shared by both passes."""

    def __init__(self, net, phases, dsa, weights, precision, compile=None, backend="auto"):
        self.net, self.phases, self.dsa, self.weights = net, phases, dsa, weights
        self.backend = backend  # the augmentation's: the fused DSA chain (ops.dsa) unless "reference"
        self.k, self.batch = len(phases), len(phases[0].batches[0])
        self.precision, self.compile = precision, compile
        # a classifier phase whose student moves only the classifier: every gradient is taken with respect to the
        # classifier alone, so no pass runs the backbone's backward for weights (pass 1) or twice (pass 2)
        offset = net.classifier_offset
        self.head = offset if phases[0].frozen == (0, offset) else None
        self.augs = [p.aug if p.aug is not None else [None] * len(p.batches) for p in phases]

    def index(self, step, rows):
        """The synthetic-set rows the K students see in this piece of this step, student after student."""
        if self.k == 1:
            return self.phases[0].batches[step][rows]
        return torch.cat([p.batches[step][rows] for p in self.phases])

    def draws(self, x, step, rows):
        """Each student's augmentation of this piece as the fused chain's (values, flags) (None: not augmented),
        for images like x; None when some student's has no fused form (backend "reference", or draws out of the
        fused order: DSA.apply then runs the chain op by op). A piece's values are rows of the whole minibatch's
        packing, so both passes and every piece share one packing per draw."""
        out = []
        for augs in self.augs:
            aug = augs[step] if self.dsa is not None else None
            if aug is None or not aug.ops:
                out.append(None)
                continue
            packed = aug.packed(x.dtype, x.device) if self.backend != "reference" else None
            if packed is None:
                return None
            out.append((packed[0][rows], packed[1]))
        return tuple(out)

    def inputs(self, x, step, rows):
        """x: the gathered images [K*n, ...] of index(step, rows) -> augmented [K, n, ...], differentiable."""
        draws = self.draws(x, step, rows)
        return _augment(x, draws, self.backend) if draws is not None else self._chain(x, step, rows)

    def _chain(self, x, step, rows):
        """inputs() op by op (DSA.apply), for draws with no fused form."""
        def augment(xi, aug):
            aug = _aug_rows(aug, rows, self.batch)
            return self.dsa.apply(xi, aug, self.backend) if self.dsa is not None and aug is not None else xi
        if self.k == 1:
            return augment(x, self.augs[0][step]).unsqueeze(0)
        n = x.shape[0] // self.k
        return torch.stack([augment(x[i * n:(i + 1) * n], self.augs[i][step]) for i in range(self.k)])

    def augmented(self, x, step, rows):
        """(draws, x', back) for the compiled functions and pass 2's terms, which take images x' [K*n, ...] with
        draws, augment them by _augment and return image gradients by _augment_transpose (inside the compiled
        graphs), to which back(dx) is applied. With the fused chain: (draws, x, identity). Otherwise x' is x
        augmented here (op by op), draws say "as they are" and back is the chain's transpose, by autograd (DSA
        is linear in the image, so first order is exact)."""
        draws = self.draws(x, step, rows)
        if draws is not None:
            return draws, x, _unchanged
        xb = x.detach().requires_grad_()
        with torch.enable_grad():
            u = self._chain(xb, step, rows)  # some student's draws augment, so u has a graph back to xb
        return (None,) * self.k, u.detach().flatten(0, 1), lambda dx: torch.autograd.grad(u, xb, dx.view_as(u))[0]

    def logits(self, theta, x, classifier=None):
        return _logits(self.net, theta, x, classifier, self.precision)

    def run(self, fn, *args):
        """fn(net, *args, precision), through torch.compile when this problem compiles. Under CUDA graphs
        ("reduce-overhead") each call starts a new iteration, whose replay overwrites the previous call's outputs
        (they live in the graphs' memory pool), so they are copied out."""
        if self.compile is None:
            return fn(self.net, *args, self.precision)
        out = _compiled(fn, self.compile)(self.net, *args, self.precision)
        if self.compile == "reduce-overhead":
            out = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, out)
        return out

    def scale(self, rows):
        """The factor turning a mean over this piece's K*n rows into the sum over students of each student's
        batch mean restricted to the piece (1 for one student and one piece: nothing to rescale)."""
        n = rows.stop - rows.start
        return None if self.k == 1 and n == self.batch else self.k * n / self.batch

    def scaled(self, loss, rows):
        """The piece's mean loss times scale(rows)."""
        s = self.scale(rows)
        return loss if s is None else loss * s

    def rescale(self, rows, *grads):
        """Gradients of the piece's mean loss as gradients of scaled(loss) (None stays None)."""
        s = self.scale(rows)
        return grads if s is None else tuple(None if g is None else g * s for g in grads)

    def plain_loss(self, theta, u, yb, rows, classifier=None):
        """The student loss of the piece on augmented images u [K, n, ...], differentiable to any order (pass 2)."""
        return self.scaled(reference.soft_cross_entropy(self.logits(theta, u, classifier), yb, self.weights), rows)


def _logits(net, theta, x, classifier, precision, block=None):
    """[K*n, classes] in the images' dtype. precision bf16: the network computes in bf16 (parameters and images
    cast on the way in, logits cast back; gradients flow through the casts). An explicit cast rather than
    autocast, which does not compose with forward mode's dual tensors."""
    if precision == "bf16":
        z = net.forward_students(theta.to(torch.bfloat16), x.to(torch.bfloat16),
                                 None if classifier is None else classifier.to(torch.bfloat16), block).to(x.dtype)
    else:
        z = net.forward_students(theta, x, classifier, block)
    return z.reshape(-1, z.shape[-1])


def _loss_of(net, theta, head, weights, precision, block=None):
    """loss(t, u, y): the students' mean soft-label cross-entropy on augmented images u [K, n, ...] as a function
    of t = the parameters [K, P] (head None) or of t = the classifier slice, the backbone taken from theta."""
    def loss(t, u, y):
        z = _logits(net, t, u, None, precision, block) if head is None else \
            _logits(net, theta, u, t, precision, block)
        return reference.soft_cross_entropy(z, y, weights)
    return loss


def _variable(theta, head):
    return theta if head is None else theta[:, head:]


# The first-order and exact second-order student terms as pure functions (torch.func), for torch.compile: the
# network's blocks in plain PyTorch (inductor fuses them) and the loss by its plain formula.

def _student_grad(net, theta, x, draws, backend, y, weights, head, precision):
    """Pass 1: d loss / d theta (head: d loss / d classifier slice) on images x augmented by draws (_augment)."""
    return torch.func.grad(_loss_of(net, theta, head, weights, precision, norm_relu_pool))(
        _variable(theta, head), _augment(x, draws, backend), y)


def _exact_terms(net, theta, V, x, draws, backend, y, weights, head, precision):
    """Pass 2, exact: (g, d/dx (v . g), d/dy (v . g)) with g = d loss / d theta (head: the classifier slice's
    gradient, and v's slice) on images x augmented by draws, reverse over reverse: d/du (v . g) for the
    augmented images u, then the augmentation's transpose."""
    loss = _loss_of(net, theta, head, weights, precision, norm_relu_pool)
    t, v = _variable(theta, head), _variable(V, head)

    def v_dot_g(u, y):
        g = torch.func.grad(loss)(t, u, y)
        return (v * g).sum(), g
    (du, dy), g = torch.func.grad(v_dot_g, argnums=(0, 1), has_aux=True)(_augment(x, draws, backend), y)
    return g, _augment_transpose(du, draws, backend), dy


def _compiled(fn, mode):
    """fn under torch.compile (mode: one of COMPILE_MODES), made once per function and mode. Shapes
    are static (a CUDA graph needs them so); each new shape, dtype or network is one more compilation, so the
    recompile limit is raised to cover a run's phases, pieces and second passes."""
    key = (fn, mode)
    if key not in _COMPILED:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED[key] = torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False, fullgraph=True)
    return _COMPILED[key]


def two_pass_gradients(net, images, labels, alpha, phase, dsa, classes=None, backend="native", store_thetas=False,
                       second_pass="exact", chunk=None, precision="full", fd_eps=None, compile=None):
    """(L, dL/dimages, dL/dlabels, dL/dalpha) as reference.two_pass_gradients, on the fused operators.

    phase: a reference.Phase, or a list of K of them (K students; the result is the mean over students).
    classes [M] is each synthetic image's class (for the loss statistics); default: the labels' argmax.

    Memory: TESLA keeps theta_0..theta_{N-1} from pass 1 for pass 2, N parameter vectors. Pass 2 computes each
    step's gradient g_k anyway (to differentiate v . g_k), and theta_{k+1} = theta_k - alpha g_k, so by default
    (store_thetas=False) pass 2 re-walks the trajectory from theta_0 with those same gradients and keeps one
    vector: memory does not grow with syn_steps, at no extra gradient evaluation (fd mode takes g_k from its two
    points). The walk equals pass 1's up to floating-point reassociation. store_thetas=True keeps pass 1's
    vectors, as the reference does.

    compile (one of COMPILE_MODES; None runs eagerly): each step's student terms run as torch.func functions
    under torch.compile (fixed shapes; "reduce-overhead" adds CUDA graphs on a GPU): pass 1's gradient
    (_student_grad) in every mode, and pass 2's (_exact_terms: reverse over reverse, traced whole; _fd_grads).
    The compiled network has its plain PyTorch blocks (inductor fuses them) and the loss its plain formula, not
    the fused operators. The augmentation runs inside the compiled functions too (ops.dsa, traced: one kernel
    for the chain and, in pass 2, one for its transpose), each function taking the gathered images and the
    step's packed draws; draws with no fused form are augmented op by op outside. A "forward" pass 2 runs
    eagerly."""
    if compile is not None and compile not in COMPILE_MODES:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)} or None, got {compile!r}")
    if second_pass not in SECOND_PASSES:
        raise ConfigError(f"second_pass must be one of {', '.join(SECOND_PASSES)}, got {second_pass!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if chunk is not None and chunk < 1:
        raise ConfigError(f"chunk must be a positive number of images, got {chunk}")
    phases = _as_students(phase)
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
    prob = _Problem(net, phases, dsa, weights, precision, compile, backend)
    k, steps, num_classes = prob.k, len(first.batches), labels.shape[1]
    pieces = _rows(prob.batch, chunk)
    scatter_backend = "auto" if backend == "triton" else backend

    head = prob.head
    mixed = _mixed_exact if head is not None else _MIXED[second_pass]  # a classifier-only pass 2 is exact
    if compile is not None and mixed is _mixed_exact:
        mixed = _mixed_compiled
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
                (gc,) = prob.rescale(rows, prob.run(_student_grad, theta, x, draws, prob.backend, labels[idx],
                                                    weights, head))
            else:
                u = prob.inputs(x, step, rows)
                leaf, flats, classifier = _leaf(theta, head)
                with torch.enable_grad():
                    loss = ops.soft_ce_stats(prob.logits(flats, u, classifier), labels[idx], weights, classes[idx],
                                             num_classes, backend=backend)[0]
                    (gc,) = torch.autograd.grad(prob.scaled(loss, rows), leaf)
            gc = _widen(gc, theta, head)
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
    block = net.block_backend_as("reference") if mixed is _mixed_forward else contextlib.nullcontext()
    with block:
        theta_k = theta_0
        compute = torch.bfloat16 if precision == "bf16" else dt
        h = _fd_steps(theta_0, V, fd_eps or FD_EPS.get(compute, 1e-2)) if mixed is _mixed_fd else None
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


def _leaf(theta, head):
    """(the tensor to differentiate against, the network's parameters, its `classifier` argument): theta itself,
    or with head set only theta[:, head:] (the classifier), the backbone a constant."""
    if head is None:
        leaf = theta.detach().requires_grad_()
        return leaf, leaf, None
    leaf = theta[:, head:].detach().requires_grad_()
    return leaf, theta.detach(), leaf


def _widen(g, theta, head):
    """A classifier-only gradient as a full-length one (zero on the backbone)."""
    if head is None:
        return g
    out = torch.zeros_like(theta)
    out[:, head:] = g
    return out


def _fd_steps(theta, V, eps):
    """Per-student step h_i with ||h_i v_i|| = eps * max(1, ||theta_i||) (h_i = 0 where v_i = 0)."""
    vnorm = V.norm(dim=1)
    scale = eps * theta.norm(dim=1).clamp(min=1)
    return torch.where(vnorm > 0, scale / vnorm.clamp(min=torch.finfo(V.dtype).tiny), torch.zeros_like(vnorm))


def _unchanged(x):
    return x


def _augment(x, draws, backend):
    """u [K, n, ...]: the K students' blocks of rows of x [K*n, ...], each through the fused DSA chain of its
    draws ((values, flags); None: as it is). Differentiable; traceable by torch.compile."""
    k = len(draws)
    n = x.shape[0] // k
    parts = [x[i * n:(i + 1) * n] if d is None else ops.dsa(x[i * n:(i + 1) * n], *d, backend=backend)
             for i, d in enumerate(draws)]
    return parts[0].unsqueeze(0) if k == 1 else torch.stack(parts)


def _augment_transpose(du, draws, backend):
    """_augment's transpose: the image gradient [K*n, ...] of an output gradient du [K, n, ...]."""
    parts = [du[i] if d is None else ops.dsa(du[i], *d, transpose=True, backend=backend)
             for i, d in enumerate(draws)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _mixed_exact(prob, theta, V, xb, yb, step, rows, h, walk):
    """Reverse over reverse. For a student that moves only its classifier (prob.head) v is zero on the backbone,
    so v . g_k needs g_k's classifier part alone, whose graph to the images is the features' first-order
    backward."""
    head = prob.head
    xb, yb = xb.requires_grad_(), yb.requires_grad_()
    leaf, flats, classifier = _leaf(theta, head)
    with torch.enable_grad():
        loss = prob.plain_loss(flats, prob.inputs(xb, step, rows), yb, rows, classifier)
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
        dx, dy = torch.autograd.grad((_variable(V, head) * g).sum(), (xb, yb), allow_unused=True)
    return _widen(g.detach(), theta, head), dx, dy


def _mixed_forward(prob, theta, V, xb, yb, step, rows, h, walk):
    # d/dX (v . g) = A^T d/du (v . g) with u = A(X): the jvp runs on the network only (some augmentation ops,
    # grid_sample's backward among them, have no forward-mode derivative)
    draws, x, back = prob.augmented(xb, step, rows)
    u = _augment(x, draws, prob.backend)
    grads = torch.func.grad(lambda t, x, y: prob.plain_loss(t, x, y, rows), argnums=(0, 1, 2))
    with torch.enable_grad():
        (g, _, _), (_, du, dy) = torch.func.jvp(lambda t: grads(t, u, yb.detach()), (theta.detach(),), (V,))
    return g.detach(), back(_augment_transpose(du.detach(), draws, prob.backend)), dy.detach()


def _relu_masks(net, theta, x, draws, backend, precision):
    """theta's ReLU pattern on images x augmented by draws (_augment): each ConvNet block's mask (normalised
    input > 0), from one forward (run it without gradients)."""
    masks = []

    def record(x, weight, bias):
        y = F.group_norm(x, x.shape[1], weight, bias, INSTANCE_NORM_EPS)
        masks.append(y > 0)
        return F.avg_pool2d(y * masks[-1], 2)
    _logits(net, theta, _augment(x, draws, backend), None, precision, record)
    return masks


def _held_loss(net, theta, u, y, weights, masks, precision):
    """The students' loss with each ConvNet block's ReLU pattern held at `masks` (_relu_masks of another point);
    masks None: the network as it is.

    The finite difference of the image gradient between theta_k +/- h v would otherwise also see every ReLU unit
    whose sign the perturbation flips: jumps of order 1/h that the exact derivative (almost everywhere) does not
    have, and which swamp it in the backbone phase (cosine 0.02 to 0.3 against the exact gradients at CIFAR
    shapes). With theta_k's pattern held, the network is smooth around theta_k and the difference converges to
    the exact mixed derivative."""
    block = None
    if masks is not None:
        # each block pools by 2, so the side of a block's input names its mask (no state to advance, which a
        # torch.func transform under torch.compile would refuse)
        by_side = {m.shape[-1]: m for m in masks}
        if len(by_side) != len(masks):
            raise AssertionError(f"ReLU masks of equal sides: {[tuple(m.shape) for m in masks]}")

        def block(x, weight, bias):  # relu(y) where the pattern says so, and relu's derivative
            y = F.group_norm(x, x.shape[1], weight, bias, INSTANCE_NORM_EPS)
            return F.avg_pool2d(y * by_side[y.shape[-1]], 2)
    return reference.soft_cross_entropy(_logits(net, theta, u, None, precision, block), y, weights)


def _fd_grads(net, theta, x, draws, backend, y, weights, masks, walk, precision):
    """The held loss's first-order gradients on images x augmented by draws: (d/dtheta, d/dx, d/dy), d/dtheta
    None unless walk. Traced by torch.compile, a torch.func function; eager, autograd (torch.func's eager wrappers
    kept more alive: a peak of 426 MB against 251 MB for a CIFAR-shaped iteration on a CPU)."""
    def loss(t, u, y):
        return _held_loss(net, t, u, y, weights, masks, precision)
    u = _augment(x, draws, backend)
    if torch.compiler.is_compiling():
        if walk:
            g, du, dy = torch.func.grad(loss, argnums=(0, 1, 2))(theta, u, y)
        else:
            g, (du, dy) = None, torch.func.grad(loss, argnums=(1, 2))(theta, u, y)
    else:
        leaf, ul, yl = theta.detach().requires_grad_(walk), u.detach().requires_grad_(), y.detach().requires_grad_()
        with torch.enable_grad():
            out = torch.autograd.grad(loss(leaf, ul, yl), (leaf, ul, yl) if walk else (ul, yl))
        g, du, dy = out if walk else (None, *out)
    return g, _augment_transpose(du, draws, backend), dy


def _mixed_fd(prob, theta, V, xb, yb, step, rows, h, walk):
    """Central differences of the image and label gradients with theta_k's ReLU pattern held (recorded by a
    gradient-free forward at theta_k). The walk's g_k is the mean of the theta-gradients at the two points: on
    the held pattern that is g_k + O(h^2), so a step costs one forward and two first-order gradients."""
    draws, x, back = prob.augmented(xb, step, rows)
    masks = None
    if prob.net.is_convnet:
        with torch.no_grad():
            masks = prob.run(_relu_masks, theta, x, draws, prob.backend)
    yb, hv = yb.detach(), h.unsqueeze(1) * V
    gp, xp, yp = prob.rescale(rows, *prob.run(_fd_grads, theta + hv, x, draws, prob.backend, yb, prob.weights,
                                              masks, walk))
    gm, xm, ym = prob.rescale(rows, *prob.run(_fd_grads, theta - hv, x, draws, prob.backend, yb, prob.weights,
                                              masks, walk))
    # student i's rows are block i of the piece; divide each by its own 2 h_i
    inv = torch.where(h > 0, 0.5 / h.clamp(min=torch.finfo(h.dtype).tiny), torch.zeros_like(h))
    inv = inv.repeat_interleave(yb.shape[0] // prob.k)
    dx = (xp - xm) * inv.view(-1, *([1] * (xp.dim() - 1)))
    return (0.5 * (gp + gm) if walk else None), back(dx), (yp - ym) * inv.unsqueeze(1)


def _mixed_compiled(prob, theta, V, xb, yb, step, rows, h, walk):
    """_mixed_exact (classifier-only too), by _exact_terms under torch.compile."""
    head = prob.head
    draws, x, back = prob.augmented(xb, step, rows)
    g, dx, dy = prob.rescale(rows, *prob.run(_exact_terms, theta, V, x, draws, prob.backend, yb.detach(),
                                             prob.weights, head))
    return _widen(g, theta, head), back(dx), dy


_MIXED = {"exact": _mixed_exact, "forward": _mixed_forward, "fd": _mixed_fd}


def iteration_gradients(net, images, labels, alpha, weighted_phases, dsa, classes=None, backend="native",
                        cudnn_benchmark=False, **options):
    """One distillation iteration's gradients: sum over phases of weight * (the mean over the phase's students).

    weighted_phases: (name, weight, [Phase, ...]) per Expert-Decoupling phase, a list of K students each.
    backend "reference" runs reference.two_pass_gradients student after student (the plain loop, `options`
    ignored); any other backend runs two_pass_gradients with `options` (second_pass, chunk, precision, ...).
    cudnn_benchmark: the fast path runs with torch.backends.cudnn.benchmark on (cuDNN times its convolution
    algorithms for each new shape and keeps the fastest: the student's shapes are fixed; a CUDA-only effect, whose
    pick may differ between runs), restored afterwards.
    Returns ({name: loss tensor}, dL/dimages, dL/dlabels, dL/dalpha); nothing is updated."""
    if cudnn_benchmark and backend != "reference" and not torch.backends.cudnn.benchmark:
        torch.backends.cudnn.benchmark = True
        try:
            return iteration_gradients(net, images, labels, alpha, weighted_phases, dsa, classes, backend, **options)
        finally:
            torch.backends.cudnn.benchmark = False
    losses = {}
    g_img, g_y, g_a = torch.zeros_like(images), torch.zeros_like(labels), torch.zeros_like(alpha)
    for name, weight, students in weighted_phases:
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
    return losses, g_img, g_y, g_a
