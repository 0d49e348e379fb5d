"""The matching gradient on the fused operators equals the reference, and so does a Distiller step."""
import weakref

import pytest
import torch

from ltdd_fast import matching, ops, reference
from ltdd_fast.augment import DSA
from ltdd_fast.distill import DistillConfig, Distiller
from ltdd_fast.experts import ExpertConfig, train_experts
from ltdd_fast.models.functional import functional_model

pytestmark = pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="ltdd_fast._C not built")


def _problem(steps, backbone_phase, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = functional_model("convnet2", 1, 4, (8, 8), width=4)
    images = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randn(12, 4, generator=g, dtype=torch.float64)
    theta_0 = net.init_flat(g).double()
    theta_T = theta_0 + 0.05 * torch.randn(theta_0.shape, generator=g, dtype=torch.float64)
    batches = [torch.randperm(12, generator=g)[:5] for _ in range(steps)]
    dsa = DSA(mode="multiple")
    off = net.classifier_offset
    phase = reference.Phase(
        theta_0=theta_0, theta_T=theta_T, batches=batches,
        mask=net.backbone_mask() if backbone_phase else None,
        frozen=None if backbone_phase else (0, off),
        class_weights=reference.dam_weights([50, 20, 5, 1]).double() if backbone_phase else None,
        aug=reference.sample_phase_aug(dsa, batches, (8, 8), g))
    return net, images, labels, torch.tensor(0.02, dtype=torch.float64), phase, dsa


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("backbone_phase", [True, False])
@pytest.mark.parametrize("store_thetas", [False, True])
def test_native_two_pass_equals_reference(steps, backbone_phase, store_thetas):
    """Pass 2 re-walking the trajectory from theta_0 (the default) and pass 2 on pass 1's stored vectors both
    give the reference's gradients."""
    net, images, labels, alpha, phase, dsa = _problem(steps, backbone_phase)
    want = reference.two_pass_gradients(net, images, labels, alpha, phase, dsa)
    got = matching.two_pass_gradients(net, images, labels, alpha, phase, dsa, backend="native",
                                      store_thetas=store_thetas)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert want[1].abs().sum() > 0 and want[2].abs().sum() > 0


def test_two_pass_memory_does_not_grow_with_steps(monkeypatch):
    """With the re-walk, pass 1 keeps no more than its current (theta, G) alive, whatever syn_steps is (the
    stored-trajectory form keeps every theta_k: 2 + N vectors)."""
    counts = {}
    for steps in (2, 8):
        net, images, labels, alpha, phase, dsa = _problem(steps, True)
        alive, peak = set(), [0]
        real_step = ops.student_sgd_step

        def tracking_step(theta, *args, **kwargs):
            out = real_step(theta, *args, **kwargs)
            for t in out:
                ref = weakref.ref(t, lambda r: alive.discard(r))
                alive.add(ref)
            peak[0] = max(peak[0], len(alive))
            return out
        monkeypatch.setattr(ops, "student_sgd_step", tracking_step)
        matching.two_pass_gradients(net, images, labels, alpha, phase, dsa, backend="native")
        monkeypatch.setattr(ops, "student_sgd_step", real_step)
        counts[steps] = peak[0]
    assert counts[8] == counts[2] <= 4


def distiller_step_matches_reference(digits, root, backend):
    """One Distiller step on `backend` and on the reference from the same start: the same images, labels, lr,
    losses and per-class gradient norms (shared with test_triton_ops)."""
    e1 = train_experts(digits, ExpertConfig(stage=1, num_experts=1, width=8, batch_size=64, epochs=4), root / "e1",
                       progress=False)
    e2 = train_experts(digits, ExpertConfig(stage=2, num_experts=1, width=8, batch_size=64, epochs=2), root / "e2",
                       source_dir=e1.root, progress=False)
    states = {}
    for b in ("reference", backend):
        config = DistillConfig(dataset="digits", imbalance_factor=50, width=8, experts=str(e1.root),
                               experts_stage2=str(e2.root), ipc=3, syn_steps=2, syn_steps_classifier=2, batch_syn=10,
                               max_start_epoch=2, checkpoint_every=0, backend=b, out=str(root / b))
        d = Distiller(config, dataset=digits, progress=False)
        assert d.net.block_backend == ("triton" if b == "triton" else "reference")
        losses = d.step()
        states[b] = (d.images.detach(), d.labels.detach(), d.alpha.detach(), losses, d.last_class_grad_norm)
    ref, fast = states["reference"], states[backend]
    for a, b in zip(fast[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert fast[3].keys() == ref[3].keys()
    for k in ref[3]:
        assert fast[3][k] == pytest.approx(ref[3][k], rel=1e-5)
    assert fast[4] == pytest.approx(ref[4], rel=1e-4) and len(ref[4]) == digits.num_classes


def test_distiller_step_native_equals_reference(digits, tmp_path_factory):
    distiller_step_matches_reference(digits, tmp_path_factory.mktemp("match"), "native")
