"""One phase's K students as the two passes see them: their minibatches split into pieces, their augmentation
(fused or op by op), the network call in full or bf16 precision, and torch.compile's cache of the student terms."""
import torch

from ..dam import soft_cross_entropy
from ..dsa_chain import AugParams
from ..errors import ConfigError
from .. import ops

# compilations a compiled function may keep (dynamo's default is 8): a run has two phases, up to two piece sizes,
# a gradient with and without respect to theta, and a test session several networks and dtypes
RECOMPILE_LIMIT = 64
_COMPILED = {}

def as_students(phase):
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


def rows_of(batch_size, chunk):
    """The row slices a minibatch is split into."""
    step = batch_size if not chunk else min(chunk, batch_size)
    return [slice(i, min(i + step, batch_size)) for i in range(0, batch_size, step)]


def _augrows_of(aug, rows, batch):
    """aug's draws for the rows of one piece of a minibatch of `batch` images (aug itself for the whole one)."""
    if aug is None or (rows.start == 0 and rows.stop == batch):
        return aug
    return AugParams(aug.ops, {k: t[rows] for k, t in aug.tensors.items()})


class Problem:
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
        return augment(x, draws, self.backend) if draws is not None else self._chain(x, step, rows)

    def _chain(self, x, step, rows):
        """inputs() op by op (DSA.apply), for draws with no fused form."""
        def augment(xi, aug):
            aug = _augrows_of(aug, rows, self.batch)
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
            return draws, x, unchanged
        xb = x.detach().requires_grad_()
        with torch.enable_grad():
            u = self._chain(xb, step, rows)  # some student's draws augment, so u has a graph back to xb
        return (None,) * self.k, u.detach().flatten(0, 1), lambda dx: torch.autograd.grad(u, xb, dx.view_as(u))[0]

    def logits(self, theta, x, classifier=None):
        return logits(self.net, theta, x, classifier, self.precision)

    def run(self, fn, *args):
        """fn(net, *args, precision), through torch.compile when this problem compiles. Under CUDA graphs
        ("reduce-overhead") each call starts a new iteration, whose replay overwrites the previous call's outputs
        (they live in the graphs' memory pool), so they are copied out."""
        if self.compile is None:
            return fn(self.net, *args, self.precision)
        out = compiled(fn, self.compile)(self.net, *args, self.precision)
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
        return self.scaled(soft_cross_entropy(self.logits(theta, u, classifier), yb, self.weights), rows)


def logits(net, theta, x, classifier, precision, block=None):
    """[K*n, classes] in the images' dtype. precision bf16: the network computes in bf16 (parameters and images
    cast on the way in, logits cast back; gradients flow through the casts). An explicit cast rather than
    autocast, which does not compose with forward mode's dual tensors."""
    if precision == "bf16":
        z = net.forward_students(theta.to(torch.bfloat16), x.to(torch.bfloat16),
                                 None if classifier is None else classifier.to(torch.bfloat16), block).to(x.dtype)
    else:
        z = net.forward_students(theta, x, classifier, block)
    return z.reshape(-1, z.shape[-1])


def loss_of(net, theta, head, weights, precision, block=None):
    """loss(t, u, y): the students' mean soft-label cross-entropy on augmented images u [K, n, ...] as a function
    of t = the parameters [K, P] (head None) or of t = the classifier slice, the backbone taken from theta."""
    def loss(t, u, y):
        z = logits(net, t, u, None, precision, block) if head is None else \
            logits(net, theta, u, t, precision, block)
        return soft_cross_entropy(z, y, weights)
    return loss


def variable(theta, head):
    return theta if head is None else theta[:, head:]


# The first-order and exact second-order student terms as pure functions (torch.func), for torch.compile: the
# network's blocks in plain PyTorch (inductor fuses them) and the loss by its plain formula.

def split_leaf(theta, head):
    """(the tensor to differentiate against, the network's parameters, its `classifier` argument): theta itself,
    or with head set only theta[:, head:] (the classifier), the backbone a constant."""
    if head is None:
        leaf = theta.detach().requires_grad_()
        return leaf, leaf, None
    leaf = theta[:, head:].detach().requires_grad_()
    return leaf, theta.detach(), leaf


def widen(g, theta, head):
    """A classifier-only gradient as a full-length one (zero on the backbone)."""
    if head is None:
        return g
    out = torch.zeros_like(theta)
    out[:, head:] = g
    return out


def unchanged(x):
    return x


def augment(x, draws, backend):
    """u [K, n, ...]: the K students' blocks of rows of x [K*n, ...], each through the fused DSA chain of its
    draws ((values, flags); None: as it is). Differentiable; traceable by torch.compile."""
    k = len(draws)
    n = x.shape[0] // k
    parts = [x[i * n:(i + 1) * n] if d is None else ops.dsa(x[i * n:(i + 1) * n], *d, backend=backend)
             for i, d in enumerate(draws)]
    return parts[0].unsqueeze(0) if k == 1 else torch.stack(parts)


def augment_transpose(du, draws, backend):
    """_augment's transpose: the image gradient [K*n, ...] of an output gradient du [K, n, ...]."""
    parts = [du[i] if d is None else ops.dsa(du[i], *d, transpose=True, backend=backend)
             for i, d in enumerate(draws)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def compiled(fn, mode):
    """fn under torch.compile (mode: one of COMPILE_MODES), made once per function and mode. Shapes
    are static (a CUDA graph needs them so); each new shape, dtype or network is one more compilation, so the
    recompile limit is raised to cover a run's phases, pieces and second passes."""
    key = (fn, mode)
    if key not in _COMPILED:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED[key] = torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False, fullgraph=True)
    return _COMPILED[key]


