"""Pass 2's mixed derivative d/dX (v . g_k), four ways: exact (reverse over reverse), forward (forward over
reverse), fd (central differences with the ReLU pattern held) and exact under torch.compile. Each takes one piece
of one step and returns (g_k for the walk, d/dimages, d/dlabels)."""
import torch

from ..dam import soft_cross_entropy
from ..ops.norm_pool import instance_norm, reference as norm_relu_pool
from .students import augment, augment_transpose, logits, loss_of, split_leaf, variable, widen

# fd: the perturbation h v has norm fd_eps * max(1, ||theta_k||): truncation error shrinks as h^2, rounding error
# grows as machine epsilon / h. (A ConvNet holds its ReLU pattern fixed, see held_loss; another network's ReLU
# units that the perturbation flips add jumps of order 1/h, so keep h small there.)
# Keyed by the dtype the network computes in: with precision="bf16" a perturbation of 1e-3 sits below bf16's
# resolution (2^-8) and the difference is rounding (cosine 0.58 to 0.69 against the exact gradients on the test
# ConvNet); 3e-2 gave 0.997 there, against 0.998 for bf16's exact second pass.
FD_EPS = {torch.float64: 1e-5, torch.float32: 1e-3, torch.bfloat16: 3e-2}


def student_grad(net, theta, x, draws, backend, y, weights, head, precision):
    """Pass 1: d loss / d theta (head: d loss / d classifier slice) on images x augmented by draws (_augment)."""
    return torch.func.grad(loss_of(net, theta, head, weights, precision, norm_relu_pool))(
        variable(theta, head), augment(x, draws, backend), y)


def exact_terms(net, theta, V, x, draws, backend, y, weights, head, precision):
    """Pass 2, exact: (g, d/dx (v . g), d/dy (v . g)) with g = d loss / d theta (head: the classifier slice's
    gradient, and v's slice) on images x augmented by draws, reverse over reverse: d/du (v . g) for the
    augmented images u, then the augmentation's transpose."""
    loss = loss_of(net, theta, head, weights, precision, norm_relu_pool)
    t, v = variable(theta, head), variable(V, head)

    def v_dot_g(u, y):
        g = torch.func.grad(loss)(t, u, y)
        return (v * g).sum(), g
    (du, dy), g = torch.func.grad(v_dot_g, argnums=(0, 1), has_aux=True)(augment(x, draws, backend), y)
    return g, augment_transpose(du, draws, backend), dy


def fd_steps(theta, V, eps):
    """Per-student step h_i with ||h_i v_i|| = eps * max(1, ||theta_i||) (h_i = 0 where v_i = 0)."""
    vnorm = V.norm(dim=1)
    scale = eps * theta.norm(dim=1).clamp(min=1)
    return torch.where(vnorm > 0, scale / vnorm.clamp(min=torch.finfo(V.dtype).tiny), torch.zeros_like(vnorm))


def mixed_exact(prob, theta, V, xb, yb, step, rows, h, walk):
    """Reverse over reverse. For a student that moves only its classifier (prob.head) v is zero on the backbone,
    so v . g_k needs g_k's classifier part alone, whose graph to the images is the features' first-order
    backward."""
    head = prob.head
    xb, yb = xb.requires_grad_(), yb.requires_grad_()
    leaf, flats, classifier = split_leaf(theta, head)
    with torch.enable_grad():
        loss = prob.plain_loss(flats, prob.inputs(xb, step, rows), yb, rows, classifier)
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
        dx, dy = torch.autograd.grad((variable(V, head) * g).sum(), (xb, yb), allow_unused=True)
    return widen(g.detach(), theta, head), dx, dy


def mixed_forward(prob, theta, V, xb, yb, step, rows, h, walk):
    # d/dX (v . g) = A^T d/du (v . g) with u = A(X): the jvp runs on the network only (some augmentation ops,
    # grid_sample's backward among them, have no forward-mode derivative)
    draws, x, back = prob.augmented(xb, step, rows)
    u = augment(x, draws, prob.backend)
    grads = torch.func.grad(lambda t, x, y: prob.plain_loss(t, x, y, rows), argnums=(0, 1, 2))
    with torch.enable_grad():
        (g, _, _), (_, du, dy) = torch.func.jvp(lambda t: grads(t, u, yb.detach()), (theta.detach(),), (V,))
    return g.detach(), back(augment_transpose(du.detach(), draws, prob.backend)), dy.detach()


def relu_masks(net, theta, x, draws, backend, precision):
    """theta's ReLU pattern on images x augmented by draws (_augment): each ConvNet block's mask (normalised
    input > 0), from one forward (run it without gradients)."""
    masks = []

    def record(x, weight, bias):
        y = instance_norm(x, weight, bias)
        masks.append(y > 0)
        return torch.nn.functional.avg_pool2d(y * masks[-1], 2)
    logits(net, theta, augment(x, draws, backend), None, precision, record)
    return masks


def held_loss(net, theta, u, y, weights, masks, precision):
    """The students' loss with each ConvNet block's ReLU pattern held at `masks` (relu_masks of another point);
    masks None: the network as it is.

    The finite difference of the image gradient between theta_k +/- h v would otherwise also see every ReLU unit
    whose sign the perturbation flips: jumps of order 1/h that the exact derivative (almost everywhere) does not
    have, and which swamp it in the backbone phase (cosine 0.02 to 0.3 against the exact gradients at CIFAR
    shapes). With theta_k's pattern held, the network is smooth around theta_k and the difference converges to
    the exact mixed derivative."""
    if masks is None:
        block = None
    else:
        # each block pools by 2, so the side of a block's input names its mask (no state to advance, which a
        # torch.func transform under torch.compile would refuse)
        by_side = {m.shape[-1]: m for m in masks}
        if len(by_side) != len(masks):
            raise AssertionError(f"ReLU masks of equal sides: {[tuple(m.shape) for m in masks]}")

        def block(x, weight, bias):  # relu(y) where the pattern says so, and relu's derivative
            y = instance_norm(x, weight, bias)
            return torch.nn.functional.avg_pool2d(y * by_side[y.shape[-1]], 2)
    return soft_cross_entropy(logits(net, theta, u, None, precision, block), y, weights)


def fd_grads(net, theta, x, draws, backend, y, weights, masks, walk, precision):
    """The held loss's first-order gradients on images x augmented by draws: (d/dtheta, d/dx, d/dy), d/dtheta
    None unless walk. Traced by torch.compile, a torch.func function; eager, autograd (torch.func's eager wrappers
    kept more alive: a peak of 426 MB against 251 MB for a CIFAR-shaped iteration on a CPU)."""
    def loss(t, u, y):
        return held_loss(net, t, u, y, weights, masks, precision)
    u = augment(x, draws, backend)
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
    return g, augment_transpose(du, draws, backend), dy


def mixed_fd(prob, theta, V, xb, yb, step, rows, h, walk):
    """Central differences of the image and label gradients with theta_k's ReLU pattern held (recorded by a
    gradient-free forward at theta_k). The walk's g_k is the mean of the theta-gradients at the two points: on
    the held pattern that is g_k + O(h^2), so a step costs one forward and two first-order gradients."""
    draws, x, back = prob.augmented(xb, step, rows)
    masks = None
    if prob.net.is_convnet:
        with torch.no_grad():
            masks = prob.run(relu_masks, theta, x, draws, prob.backend)
    yb, hv = yb.detach(), h.unsqueeze(1) * V
    gp, xp, yp = prob.rescale(rows, *prob.run(fd_grads, theta + hv, x, draws, prob.backend, yb, prob.weights,
                                              masks, walk))
    gm, xm, ym = prob.rescale(rows, *prob.run(fd_grads, theta - hv, x, draws, prob.backend, yb, prob.weights,
                                              masks, walk))
    # student i's rows are block i of the piece; divide each by its own 2 h_i
    inv = torch.where(h > 0, 0.5 / h.clamp(min=torch.finfo(h.dtype).tiny), torch.zeros_like(h))
    inv = inv.repeat_interleave(yb.shape[0] // prob.k)
    dx = (xp - xm) * inv.view(-1, *([1] * (xp.dim() - 1)))
    return (0.5 * (gp + gm) if walk else None), back(dx), (yp - ym) * inv.unsqueeze(1)


def mixed_compiled(prob, theta, V, xb, yb, step, rows, h, walk):
    """mixed_exact (classifier-only too), by exact_terms under torch.compile."""
    head = prob.head
    draws, x, back = prob.augmented(xb, step, rows)
    g, dx, dy = prob.rescale(rows, *prob.run(exact_terms, theta, V, x, draws, prob.backend, yb.detach(),
                                             prob.weights, head))
    return widen(g, theta, head), back(dx), dy


MIXED = {"exact": mixed_exact, "forward": mixed_forward, "fd": mixed_fd}


