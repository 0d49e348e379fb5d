"""The reference matching loss: DAM loss, and the constant-memory gradient against explicit unrolls (fp64)."""
import pytest
import torch
import torch.nn.functional as F

from ltdd_fast import dam, phases, reference as R
from ltdd_fast.ops.distance import distance
from ltdd_fast.augment import DSA
from ltdd_fast.models.functional import functional_model

C, M, B, IM = 3, 12, 4, (8, 8)


def _net():
    return functional_model("convnet2", 1, C, IM, width=4)


def _setup(steps=1, aug=False, mode="none", seed=0, batches=None):
    """A tiny problem: fp64 synthetic set, expert endpoints near a real init, one Phase of the given kind."""
    g = torch.Generator().manual_seed(seed)
    net = _net()
    theta_0 = net.init_flat(g).double()
    theta_T = theta_0 + 0.05 * torch.randn(net.num_params, generator=g, dtype=torch.float64)
    images = torch.randn(M, 1, *IM, generator=g, dtype=torch.float64)
    labels = 3 * torch.randn(M, C, generator=g, dtype=torch.float64)
    alpha = torch.tensor(0.05, dtype=torch.float64)
    if batches is None:
        perm = torch.randperm(M, generator=g)
        batches = [perm[(k * B) % M : (k * B) % M + B] for k in range(steps)]
    dsa = DSA(mode="multiple") if aug else None
    kw = {}
    if mode == "backbone":
        kw = dict(mask=net.backbone_mask(), class_weights=dam.dam_weights([50, 10, 2]).double())
    elif mode == "classifier":
        kw = dict(mask=torch.ones(net.num_params, dtype=torch.bool), frozen=(0, net.classifier_offset))
    elif mode == "dam":
        kw = dict(class_weights=dam.dam_weights([50, 10, 2], f=3.0))
    phase = phases.Phase(theta_0, theta_T, batches, aug=phases.sample_phase_aug(dsa, batches, IM, g), **kw)
    return net, images, labels, alpha, phase, dsa


def _unrolled_grads(net, images, labels, alpha, phase, dsa, detach_params):
    x, y, a = (t.clone().requires_grad_() for t in (images, labels, alpha))
    L = R.unrolled_matching_loss(net, x, y, a, phase, dsa, detach_params=detach_params)
    return (L.detach(), *torch.autograd.grad(L, (x, y, a)))


def _close(got, want, rtol=1e-8):
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12)


def test_dam_weights():
    w = dam.dam_weights([6, 3, 1])
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([0.6, 0.3, 0.1]))
    torch.testing.assert_close(dam.dam_weights(torch.tensor([6, 3, 1]), f=2.0), torch.tensor([8 / 12, 5 / 12, 3 / 12]))


def test_soft_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    onehot = F.one_hot(y, 4).double() * 1e3  # softmax of this is one-hot to ~1e-434
    torch.testing.assert_close(dam.soft_cross_entropy(logits, onehot), F.cross_entropy(logits, y))
    # hand-computed weighted example: one row, uniform targets over two classes
    z = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    w = torch.tensor([0.25, 2.0], dtype=torch.float64)
    ln2 = torch.tensor(2.0, dtype=torch.float64).log()
    torch.testing.assert_close(dam.soft_cross_entropy(z, t, w), 0.5 * ln2 * (0.25 + 2.0))
    # each class's term scales by its own weight
    target = 2 * logits.flip(1)
    terms = -F.softmax(target, 1) * F.log_softmax(logits, 1)
    w4 = torch.tensor([1.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(dam.soft_cross_entropy(logits, target, w4), (terms * w4).sum(1).mean())


def test_param_distance():
    t0, tT, t = (torch.tensor(v, dtype=torch.float64) for v in ([0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]))
    torch.testing.assert_close(distance(t, t0, tT), torch.tensor(5 / 14, dtype=torch.float64))
    mask = torch.tensor([True, True, False])
    torch.testing.assert_close(distance(t, t0, tT, mask), torch.tensor(1 / 5, dtype=torch.float64))


@pytest.mark.parametrize("aug", [False, True])
@pytest.mark.parametrize("mode", ["none", "backbone", "classifier", "dam"])
def test_two_pass_equals_full_unroll_one_step(aug, mode):
    """With syn_steps = 1 there are no earlier steps to drop: TESLA == MTT exactly."""
    net, images, labels, alpha, phase, dsa = _setup(1, aug, mode)
    got = R.two_pass_gradients(net, images, labels, alpha, phase, dsa)
    _close(got, _unrolled_grads(net, images, labels, alpha, phase, dsa, detach_params=False))
    assert got[1].abs().sum() > 0 and got[2].abs().sum() > 0 and got[3] != 0


@pytest.mark.parametrize("mode", ["none", "backbone", "classifier"])
def test_two_pass_equals_detached_unroll_three_steps(mode):
    net, images, labels, alpha, phase, dsa = _setup(3, True, mode)
    got = R.two_pass_gradients(net, images, labels, alpha, phase, dsa)
    _close(got, _unrolled_grads(net, images, labels, alpha, phase, dsa, detach_params=True))
    # the full unroll keeps the paths through earlier steps' parameters: same L, different gradients
    full = _unrolled_grads(net, images, labels, alpha, phase, dsa, detach_params=False)
    torch.testing.assert_close(full[0], got[0], rtol=1e-10, atol=0)
    for a, b in zip(got[1:], full[1:]):
        assert (a - b).abs().max() > 1e-6 * b.abs().max()


def test_loss_matches_explicit_loop():
    net, images, labels, alpha, phase, dsa = _setup(3, True, "backbone")
    theta = phase.theta_0
    for idx, aug in zip(phase.batches, phase.aug):
        x = dsa.apply(images[idx], aug)
        th = theta.clone().requires_grad_()
        loss = dam.soft_cross_entropy(net.forward(th, x), labels[idx], phase.class_weights)
        theta = theta - alpha * torch.autograd.grad(loss, th)[0]
    L = R.two_pass_gradients(net, images, labels, alpha, phase, dsa)[0]
    torch.testing.assert_close(L, distance(theta, phase.theta_0, phase.theta_T, phase.mask), rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["none", "backbone"])
def test_lr_gradient_finite_difference(mode):
    net, images, labels, alpha, phase, dsa = _setup(3, True, mode)
    g_alpha = R.two_pass_gradients(net, images, labels, alpha, phase, dsa)[3]
    # the closed form holds G fixed (theta_k treated as constants), so differentiate L(alpha) with G fixed
    _, G = R.unroll_student(net, images, labels, alpha, phase, dsa)
    h = 1e-6

    def L(a):
        return distance(phase.theta_0 - a * G, phase.theta_0, phase.theta_T, phase.mask)

    torch.testing.assert_close(g_alpha, (L(alpha + h) - L(alpha - h)) / (2 * h), rtol=1e-7, atol=0)
    # with one step G does not depend on alpha at all, so this is the finite difference of the real loss
    net, images, labels, alpha, phase, dsa = _setup(1, True, mode)
    g_alpha = R.two_pass_gradients(net, images, labels, alpha, phase, dsa)[3]
    fd = [R.two_pass_gradients(net, images, labels, alpha + s, phase, dsa)[0] for s in (h, -h)]
    torch.testing.assert_close(g_alpha, (fd[0] - fd[1]) / (2 * h), rtol=1e-7, atol=0)


def test_frozen_slice_never_moves_and_backbone_mask_ignores_classifier():
    net, images, labels, alpha, phase, dsa = _setup(3, True, "classifier")
    thetas, G = R.unroll_student(net, images, labels, alpha, phase, dsa)
    off = net.classifier_offset
    assert torch.equal(thetas[-1][:off], phase.theta_0[:off]) and (G[:off] == 0).all()
    assert (thetas[-1][off:] != phase.theta_0[off:]).any()

    net, images, labels, alpha, phase, dsa = _setup(3, True, "backbone")
    L = R.two_pass_gradients(net, images, labels, alpha, phase, dsa)[0]
    phase.theta_T = phase.theta_T.clone()
    phase.theta_T[off:] += 1.0
    got = R.two_pass_gradients(net, images, labels, alpha, phase, dsa)
    torch.testing.assert_close(got[0], L, rtol=1e-14, atol=0)
    # the dropped classifier slice sees no matching pressure: v is zero there, so the gradients are unchanged too
    phase.theta_T[off:] -= 1.0
    _close(got, R.two_pass_gradients(net, images, labels, alpha, phase, dsa), rtol=1e-12)


def test_repeated_indices_accumulate():
    """A batch [i, i, j, k] equals the same batch on a set holding an explicit copy of image i."""
    net, images, labels, alpha, phase, dsa = _setup(aug=True, batches=[torch.tensor([2, 2, 5, 7])])
    got = R.two_pass_gradients(net, images, labels, alpha, phase, dsa)
    images2, labels2 = torch.cat([images, images[2:3]]), torch.cat([labels, labels[2:3]])
    phase.batches = [torch.tensor([2, M, 5, 7])]
    want = R.two_pass_gradients(net, images2, labels2, alpha, phase, dsa)
    torch.testing.assert_close(got[0], want[0], rtol=1e-14, atol=0)
    # fold the copy's gradient back onto row 2 and compare
    for a, b in zip(got[1:3], want[1:3]):
        folded = b[:M].clone()
        folded[2] += b[M]
        torch.testing.assert_close(a, folded, rtol=1e-10, atol=1e-14)
        assert a[2].abs().sum() > 0
    torch.testing.assert_close(got[3], want[3], rtol=1e-12, atol=0)


# ---- a phase's draws reach the device in one copy per dtype ----


class _Copies(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the copies that move a tensor to another device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and \
                torch.is_tensor(out) and out.device != args[-1 if func is torch.ops.aten.copy_.default else 0].device:
            self.count += 1
        return out


def test_move_at_once_copies_once_per_dtype_and_keeps_order_and_shapes():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randperm(9, generator=g)[:4], torch.rand(4, 2, generator=g), torch.rand(4, generator=g) < 0.5,
               torch.randint(0, 5, (4, 2), generator=g), torch.rand(3, generator=g), torch.zeros(0)]
    with _Copies() as copies:
        moved = phases.move_at_once(tensors, "meta")
    assert copies.count == 3  # int64, float32, bool: not one per tensor
    assert [(t.device.type, t.dtype, t.shape) for t in moved] == [("meta", t.dtype, t.shape) for t in tensors]


def test_move_at_once_leaves_tensors_already_there():
    tensors = [torch.arange(3), torch.ones(2)]
    assert all(a is b for a, b in zip(phases.move_at_once(tensors, "cpu"), tensors))
    mixed = phases.move_at_once([torch.ones(2, device="meta"), torch.arange(3)], "meta")
    assert [t.device.type for t in mixed] == ["meta", "meta"]


def test_sample_phase_aug_moves_every_step_draws_at_once_and_draws_what_sample_draws():
    dsa = DSA()  # single mode: one family a step, color (3 ops) among them
    batches = [torch.arange(4, device="meta")] * 40
    with _Copies() as copies:
        augs = phases.sample_phase_aug(dsa, batches, IM, torch.Generator().manual_seed(3))
    dtypes = {a.tensors[op].dtype for a in augs for op in a.ops}
    assert copies.count == len(dtypes) and len(dtypes) == 3  # float, int64 (crop, cutout), bool (flip)
    assert all(t.device.type == "meta" for a in augs for t in a.tensors.values())
    # the draws are DSA.sample's, step after step on one generator (here on the CPU, where nothing moves; that
    # a move keeps the values is checked on a GPU, below)
    g = torch.Generator().manual_seed(3)
    here = phases.sample_phase_aug(dsa, [torch.arange(4)] * 40, IM, torch.Generator().manual_seed(3))
    for aug in here:
        again = dsa.sample(4, IM, g)
        assert aug.ops == again.ops and all(torch.equal(aug.tensors[k], again.tensors[k]) for k in aug.ops)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_move_at_once_to_cuda_keeps_values_without_a_stream_sync():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randperm(50, generator=g)[:10] for _ in range(20)] + [torch.rand(10, 2, generator=g)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        moved = phases.move_at_once(tensors, "cuda")  # pinned, non-blocking: no copy waits for the stream
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(m.is_cuda and torch.equal(m.cpu(), t) for m, t in zip(moved, tensors))
    assert all(a is b for a, b in zip(phases.move_at_once(moved, "cuda"), moved))  # on cuda:0 is on "cuda"
