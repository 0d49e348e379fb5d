"""The matching gradient on the fused operators equals the reference, and so does a Distiller step."""
import dataclasses
import warnings
import weakref

import pytest
import torch

from ltdd_fast import dam, matching, ops, phases, reference
from ltdd_fast.bench import e2e as bench_e2e
from ltdd_fast.augment import DSA
from ltdd_fast.distill import DistillConfig, Distiller
from ltdd_fast.errors import ConfigError
from ltdd_fast.experts import ExpertConfig, train_experts
from ltdd_fast.matching import second_pass as pass2, students as pieces
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
    phase = phases.Phase(
        theta_0=theta_0, theta_T=theta_T, batches=batches,
        mask=net.backbone_mask() if backbone_phase else None,
        frozen=None if backbone_phase else (0, off),
        class_weights=dam.dam_weights([50, 20, 5, 1]).double() if backbone_phase else None,
        aug=phases.sample_phase_aug(dsa, batches, (8, 8), g))
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


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_cudnn_benchmark_is_on_for_the_fast_path_only_and_restored(backend, monkeypatch):
    """iteration_gradients(cudnn_benchmark=True) runs the fast path with torch.backends.cudnn.benchmark on and
    restores it after, even when the iteration fails; the reference loop runs as it is; off by default."""
    net, images, labels, alpha, phase, dsa = _problem(1, True)
    seen, fail = [], [False]
    real = {"fast": matching.two_pass_gradients, "reference": reference.two_pass_gradients}

    def spy(which):
        def call(*args, **kwargs):
            seen.append((which, torch.backends.cudnn.benchmark))
            if fail[0]:
                raise RuntimeError("a failing iteration")
            return real[which](*args, **kwargs)
        return call
    monkeypatch.setattr("ltdd_fast.matching.gradients.two_pass_gradients", spy("fast"))  # where the iteration calls it
    monkeypatch.setattr(reference, "two_pass_gradients", spy("reference"))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    phases = [("backbone", 1.0, [phase])]
    which = "fast" if backend == "native" else "reference"
    for asked in (True, False):
        seen.clear()
        matching.iteration_gradients(net, images, labels, alpha, phases, dsa, backend=backend, cudnn_benchmark=asked)
        assert seen == [(which, asked and backend != "reference")]
        assert torch.backends.cudnn.benchmark is False
    fail[0] = True
    with pytest.raises(RuntimeError, match="a failing iteration"):
        matching.iteration_gradients(net, images, labels, alpha, phases, dsa, backend=backend, cudnn_benchmark=True)
    assert torch.backends.cudnn.benchmark is False


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


# ---- second-pass modes, several students, chunks, precision (issue 6) ----

def _second_phase(phase, seed):
    """Another student of the same phase kind: its own start point, end point, minibatches and augmentation."""
    _, _, _, _, other, _ = _problem(len(phase.batches), phase.mask is not None, seed=seed)
    return phases.Phase(theta_0=other.theta_0, theta_T=other.theta_T, batches=other.batches, mask=phase.mask,
                           frozen=phase.frozen, class_weights=phase.class_weights, aug=other.aug)


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("backbone_phase", [True, False])
@pytest.mark.parametrize("chunk", [None, 2])
def test_forward_over_reverse_equals_reference(backbone_phase, chunk):
    """second_pass="forward" (jvp of the first-order gradient, through DSA by its own backward) and chunked
    minibatches (5 images in pieces of 2, 2, 1) give the reference's gradients."""
    net, images, labels, alpha, phase, dsa = _problem(3, backbone_phase)
    want = reference.two_pass_gradients(net, images, labels, alpha, phase, dsa)
    got = matching.two_pass_gradients(net, images, labels, alpha, phase, dsa, backend="native",
                                      second_pass="forward", chunk=chunk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backbone_phase", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_finite_difference_second_pass_approximates_reference(backbone_phase, dtype):
    """fd is an approximation: the loss and lr gradient are exact, the image and label gradients close to the
    exact ones at the default step (fp64 and fp32), and far from them at a step so large that truncation
    error dominates (which shows the check can fail). The classifier phase is exact in every mode."""
    net, images, labels, alpha, phase, dsa = _problem(3, backbone_phase)
    images, labels, alpha = images.to(dtype), labels.to(dtype), alpha.to(dtype)
    want = reference.two_pass_gradients(net, images, labels, alpha, phase, dsa)
    got = matching.two_pass_gradients(net, images, labels, alpha, phase, dsa, backend="native", second_pass="fd")
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=0)
    torch.testing.assert_close(got[3], want[3], rtol=tol, atol=tol)
    close = 1e-8 if dtype == torch.float64 else 1e-5
    assert _cosine(got[1], want[1]) > 1 - close and _cosine(got[2], want[2]) > 1 - close
    rough = matching.two_pass_gradients(net, images, labels, alpha, phase, dsa, backend="native",
                                        second_pass="fd", fd_eps=3.0)
    if backbone_phase:
        assert _cosine(rough[1], want[1]) < 0.999
    else:  # a classifier-only student takes the exact classifier-only path whatever the mode
        torch.testing.assert_close(rough[1], want[1], rtol=tol, atol=tol * 1e-3)


def test_held_relu_pattern_is_the_network_at_its_recording_point():
    """fd's held ReLU pattern: at the point it was recorded the held loss is the network's own loss; elsewhere it
    keeps the recorded pattern (not relu's), so it is smooth in theta."""
    net, images, labels, alpha, phase, dsa = _problem(4, True)
    theta, x = phase.theta_0.unsqueeze(0), images[:4]
    u, y = x.unsqueeze(0), labels[:4]
    with torch.no_grad():
        masks = pass2.relu_masks(net, theta, x, (None,), "native", "full")
    assert len(masks) == 2 and all(m.dtype == torch.bool for m in masks)
    plain = dam.soft_cross_entropy(net.forward_students(theta, u).reshape(4, -1), y, None)
    torch.testing.assert_close(pass2.held_loss(net, theta, u, y, None, masks, "full"), plain, rtol=1e-12, atol=0)
    moved = theta + 0.3 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(1), dtype=theta.dtype)
    with torch.no_grad():
        elsewhere = pass2.relu_masks(net, moved, x, (None,), "native", "full")
    assert any(not torch.equal(a, b) for a, b in zip(masks, elsewhere))
    held = pass2.held_loss(net, moved, u, y, None, masks, "full")
    assert not torch.allclose(held, dam.soft_cross_entropy(net.forward_students(moved, u).reshape(4, -1), y, None))


@pytest.mark.parametrize("backbone_phase", [True, False])
@pytest.mark.parametrize("second_pass", ["exact", "forward"])
def test_two_students_give_the_mean_of_their_gradients(backbone_phase, second_pass):
    """K = 2 students advanced together through the grouped ConvNet, in chunks, equal the mean of two reference
    runs; one student given as a list is the single-phase path exactly."""
    net, images, labels, alpha, phase, dsa = _problem(3, backbone_phase)
    other = _second_phase(phase, seed=1)
    parts = [reference.two_pass_gradients(net, images, labels, alpha, p, dsa) for p in (phase, other)]
    got = matching.two_pass_gradients(net, images, labels, alpha, [phase, other], dsa, backend="native",
                                      second_pass=second_pass, chunk=3)
    for a, b, c in zip(got, *parts):
        torch.testing.assert_close(a, (b + c) / 2, rtol=1e-9, atol=1e-12)
    single = matching.two_pass_gradients(net, images, labels, alpha, phase, dsa, backend="native",
                                         second_pass=second_pass)
    listed = matching.two_pass_gradients(net, images, labels, alpha, [phase], dsa, backend="native",
                                         second_pass=second_pass)
    for a, b in zip(listed, single):
        assert torch.equal(a, b)


def test_grouped_students_forward_equals_one_by_one():
    net = functional_model("convnet3", 3, 10, (32, 32), width=16)
    g = torch.Generator().manual_seed(0)
    flats = torch.stack([net.init_flat(g) for _ in range(3)]).double()
    x = torch.randn(3, 5, 3, 32, 32, generator=g, dtype=torch.float64)
    want = torch.stack([net.forward(flats[i], x[i]) for i in range(3)])
    torch.testing.assert_close(net.forward_students(flats, x), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(net.forward_students(flats[:1], x[:1])[0], net.forward(flats[0], x[0]))
    with pytest.raises(ValueError, match="expected \\(K=3"):
        net.forward_students(flats, x[:2])


def test_bf16_student_is_close_to_full_precision():
    net, images, labels, alpha, phase, dsa = _problem(2, True)
    images, labels, alpha = images.float(), labels.float(), alpha.float()
    want = matching.two_pass_gradients(net, images, labels, alpha, phase, dsa, backend="native")
    got = matching.two_pass_gradients(net, images, labels, alpha, phase, dsa, backend="native", precision="bf16")
    assert got[1].dtype == torch.float32
    assert 0.9 < _cosine(got[1], want[1]) < 1 - 1e-7  # close, and not the same computation
    torch.testing.assert_close(got[0], want[0], rtol=0.05, atol=0)
    # fd in bf16 steps by bf16's own resolution (at float32's step the difference was rounding: cosine 0.6 to 0.7)
    fd = matching.two_pass_gradients(net, images, labels, alpha, phase, dsa, backend="native", precision="bf16",
                                     second_pass="fd")
    assert _cosine(fd[1], want[1]) > 0.99


@pytest.mark.parametrize("second_pass, backbone_phase, mode, compiled",
                         [("exact", True, "default", {"student_grad", "exact_terms"}),
                          ("fd", True, "reduce-overhead", {"student_grad", "relu_masks", "fd_grads"}),
                          # a classifier-only pass 2 is exact
                          ("fd", False, "default", {"student_grad", "exact_terms"})])
def test_compiled_student_equals_eager(second_pass, backbone_phase, mode, compiled, monkeypatch):
    """compile: both passes under torch.compile give the eager gradients to reassociation (float64), for two
    students in pieces of unequal size, and it is the compiled functions that ran (reduce-overhead: CUDA graphs
    on a GPU; here the same compiled code, its outputs copied out as under graphs)."""
    net, images, labels, alpha, phase, dsa = _problem(2, backbone_phase)
    students = [phase, _second_phase(phase, seed=1)]
    want = matching.two_pass_gradients(net, images, labels, alpha, students, dsa, backend="native",
                                       second_pass=second_pass, chunk=3)
    ran, compile_fn = set(), pieces.compiled

    def spy(fn, mode):
        inner = compile_fn(fn, mode)

        def call(*args):
            ran.add(fn.__name__)
            return inner(*args)
        return call
    monkeypatch.setattr(pieces, "compiled", spy)
    got = matching.two_pass_gradients(net, images, labels, alpha, students, dsa, backend="native",
                                      second_pass=second_pass, chunk=3, compile=mode)
    assert ran == compiled
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("second_pass", ["exact", "fd"])
@pytest.mark.parametrize("strategy, mode, fused", [("color_crop_cutout_flip_scale_rotate", "single", True),
                                                   ("flip_color", "multiple", False)])
def test_compiled_student_augments_inside_its_graphs(second_pass, strategy, mode, fused, monkeypatch):
    """compile with the fused chain: each student's augmentation (families differing between students in a step)
    and its transpose run inside the compiled functions, no ops.dsa call eagerly; draws out of the fused order
    run op by op outside the graphs and transpose by autograd. Both give the eager gradients."""
    net, images, labels, alpha, phase, _ = _problem(3, True)
    dsa, g = DSA(strategy, mode), torch.Generator().manual_seed(7)
    students = [dataclasses.replace(p, aug=phases.sample_phase_aug(dsa, p.batches, (8, 8), g))
                for p in (phase, _second_phase(phase, seed=1))]
    if fused:
        assert any(a.ops != b.ops for a, b in zip(students[0].aug, students[1].aug))
    want = matching.two_pass_gradients(net, images, labels, alpha, students, dsa, backend="native",
                                       second_pass=second_pass)
    eager, traced, fused_dsa = [], [], ops.dsa

    def spy(*args, **kwargs):
        (traced if torch.compiler.is_compiling() else eager).append(kwargs.get("transpose", False))
        return fused_dsa(*args, **kwargs)
    monkeypatch.setattr(ops, "dsa", spy)
    got = matching.two_pass_gradients(net, images, labels, alpha, students, dsa, backend="native",
                                      second_pass=second_pass, compile="default")
    assert eager == []
    assert set(traced) == ({False, True} if fused else set())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
@pytest.mark.parametrize("second_pass", ["exact", "fd"])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_compiled_student_with_cuda_graphs_equals_eager(second_pass, backend):
    """compile="reduce-overhead" (inductor and CUDA graphs, the fused DSA chain of either backend inside them) on
    a GPU: the eager gradients, to float32 rounding (and a ReLU unit or two rounded to the other side of its
    kink)."""
    if backend == "triton" and ops.backend_problem("triton", torch.device("cuda")):
        pytest.skip(ops.backend_problem("triton", torch.device("cuda")))
    net, images, labels, alpha, phase, dsa = _problem(3, True)
    students = [phase, _second_phase(phase, seed=1)]
    cuda = torch.device("cuda")
    images, labels, alpha = (t.float().to(cuda) for t in (images, labels, alpha))
    students = [phases.Phase(theta_0=p.theta_0.float().to(cuda), theta_T=p.theta_T.float().to(cuda),
                                batches=[b.to(cuda) for b in p.batches], mask=p.mask.to(cuda),
                                class_weights=p.class_weights.float().to(cuda), aug=[a.to(cuda) for a in p.aug])
                for p in students]
    want = matching.two_pass_gradients(net, images, labels, alpha, students, dsa, backend="native",
                                       second_pass=second_pass, chunk=3)
    for _ in range(2):  # the second call replays the recorded graphs
        got = matching.two_pass_gradients(net, images, labels, alpha, students, dsa, backend=backend,
                                          second_pass=second_pass, chunk=3, compile="reduce-overhead")
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=0)
        for a, b in zip(got[1:], want[1:]):
            assert _cosine(a, b) > 0.9999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("second_pass,compile", [("exact", None), ("fd", None), ("exact", "reduce-overhead")])
def test_fast_iteration_on_cuda_synchronises_the_host_at_most_once(second_pass, compile):
    """A whole iteration of the fast path, its phases drawn included (bench e2e's timed loop), lets the host run
    ahead of the GPU: the one synchronising call is param_distance's check of an empty mask (a backbone phase's
    loss read once). Each further sync drains the GPU's queue; the warnings name the lines that made them."""
    config = bench_e2e.resolve("cifar10-lt-ipc10", [f"{k}={v}" for k, v in bench_e2e.QUICK.items()])
    problem = bench_e2e.Problem(config, "cuda", backend="auto")
    options = bench_e2e.Options(second_pass=second_pass, compile=compile)
    for _ in range(2):  # warm-up: cuDNN's plans, pinned buffers; with compile the graphs are recorded
        problem.iteration(problem.phases(), options)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            problem.iteration(problem.phases(), options)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, syncs


def test_bad_options_are_refused():
    net, images, labels, alpha, phase, dsa = _problem(2, True)
    for kwargs, message in (({"second_pass": "sideways"}, "second_pass must be one of"),
                            ({"precision": "fp8"}, "precision must be one of"),
                            ({"chunk": 0}, "chunk must be a positive"),
                            ({"compile": "fast"}, "compile must be one of")):
        with pytest.raises(ConfigError, match=message):
            matching.two_pass_gradients(net, images, labels, alpha, phase, dsa, **kwargs)
    short = phases.Phase(theta_0=phase.theta_0, theta_T=phase.theta_T, batches=phase.batches[:1],
                            mask=phase.mask, class_weights=phase.class_weights, aug=phase.aug[:1])
    with pytest.raises(ConfigError, match="equal syn_steps"):
        matching.two_pass_gradients(net, images, labels, alpha, [phase, short], dsa)
    bn = functional_model("vgg11", 1, 4, (8, 8), width=4, norm="batchnorm")
    bn_phase = phases.Phase(theta_0=bn.init_flat().double(), theta_T=bn.init_flat().double(),
                               batches=phase.batches)
    with pytest.raises(ConfigError, match="batch statistics"):
        matching.two_pass_gradients(bn, images, labels, alpha, bn_phase, None, chunk=2)
