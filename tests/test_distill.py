"""The Distiller: initialisation (METHOD 5), the phases of one iteration (6-8), step, resume, refusals."""
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ltdd_fast import dam, reference
from ltdd_fast.data import load_dataset
from ltdd_fast.distill import DistillConfig, Distiller
from ltdd_fast.errors import ConfigError, LTDDError, TrajectoryError
from ltdd_fast.experts import ExpertConfig, train_experts
from ltdd_fast.synset import load_synset


@pytest.fixture(scope="module")
def stage1(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    return train_experts(digits, ExpertConfig(stage=1, num_experts=2, width=8, batch_size=64, epochs=4), out,
                         progress=False)


@pytest.fixture(scope="module")
def stage2(digits, stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")
    return train_experts(digits, ExpertConfig(stage=2, num_experts=2, width=8, batch_size=64, epochs=2), out,
                         source_dir=stage1.root, progress=False)


@pytest.fixture
def make_config(stage1, stage2, tmp_path):
    def make(**overrides):
        settings = dict(dataset="digits", imbalance_factor=50, width=8, ipc=3, experts=str(stage1.root),
                        experts_stage2=str(stage2.root), iterations=4, syn_steps=2, syn_steps_classifier=2,
                        batch_syn=10, max_start_epoch=2, expert_epochs=2, checkpoint_every=0, eval_every=0,
                        out=str(tmp_path / "out"))
        settings.update(overrides)
        return DistillConfig(**settings)
    return make


class Recording(Distiller):
    """Records every iteration's phases so a test can recompute their gradients."""

    def phases(self):
        out = super().phases()
        self.recorded = getattr(self, "recorded", []) + [out]
        return out


def _label_experts(d):
    store = d.stage2 if d.stage2 is not None else d.stage1
    return [store.snapshot(i, store.num_snapshots - 1) for i in store.completed()[:5]]


def _class_images(ds, c):
    return ds.images_train[ds.labels_train == c]


# ---- initialisation (METHOD section 5) ----


def test_tail_class_repeats_its_real_images(digits, make_config):
    assert digits.class_counts[9] == 2 and digits.class_counts[8] == 3
    for init in ("correct", "real"):
        d = Distiller(make_config(ipc=10, init=init), dataset=digits, progress=False)
        assert d.images.shape == (10 * digits.num_classes, *digits.images_train.shape[1:])
        assert torch.equal(d.syn_classes, torch.arange(10).repeat_interleave(10))
        real = _class_images(digits, 9)
        syn = d.images.detach()[d.syn_classes == 9]
        match = [[torch.equal(s, r) for r in real] for s in syn]
        assert all(sum(m) == 1 for m in match), f"init {init}: a synthetic image is not one of the real ones"
        which = [m.index(True) for m in match]
        # neither real image is classified correctly by these weak experts, so "correct" keeps both as well
        assert sorted(set(which)) == [0, 1], which
        # repeated in turn: images alternate between the two real ones
        assert which == [which[0], which[1]] * 5 and which[0] != which[1]
        # class 8 (3 images): three distinct images, each repeated in turn
        syn8, real8 = d.images.detach()[d.syn_classes == 8], _class_images(digits, 8)
        which8 = [next(j for j, r in enumerate(real8) if torch.equal(s, r)) for s in syn8]
        assert sorted(set(which8)) == [0, 1, 2] and which8 == (which8[:3] * 4)[:10]
        assert float(d.alpha.detach()) == pytest.approx(0.01) and d.alpha.requires_grad
        assert d.images.requires_grad and d.labels.requires_grad


def test_soft_labels_are_mean_logits_of_correct_experts(digits, make_config):
    d = Distiller(make_config(ipc=10), dataset=digits, progress=False)
    experts = _label_experts(d)
    assert len(experts) == 2
    images, labels = d.images.detach(), d.labels.detach()
    assert labels.shape == (images.shape[0], digits.num_classes)
    with torch.no_grad():
        logits = torch.stack([d.net.forward(theta, images) for theta in experts])  # [E, n, C]
    correct = logits.argmax(-1) == d.syn_classes
    w = correct.float()
    w = torch.where(w.sum(0, keepdim=True) > 0, w, torch.ones_like(w))
    expected = (logits * w.unsqueeze(-1)).sum(0) / w.sum(0).unsqueeze(-1)
    torch.testing.assert_close(labels, expected, atol=1e-5, rtol=1e-5)
    some = correct.any(0)
    assert some.sum() >= 10, "fixture: the experts should get some head-class images right"
    assert torch.equal(labels[some].argmax(-1), d.syn_classes[some])
    # with init "correct", every image of a class that has correctly classified images is one of them
    for c in d.syn_classes[some].unique().tolist():
        assert some[d.syn_classes == c].all(), f"class {c} was initialised with a misclassified image"


def test_no_duplicates_refused_in_constructor(digits, make_config, tmp_path):
    config = make_config(ipc=3, allow_duplicates=False, out=str(tmp_path / "nodup"))
    with pytest.raises(ConfigError, match=r"class 9 \(.*\) can supply only 2 initial images for ipc 3"):
        Distiller(config, dataset=digits, progress=False)
    assert not (tmp_path / "nodup").exists()
    with pytest.raises(ConfigError, match=r"class 6 \(.*\) can supply only 9 initial images for ipc 10"):
        Distiller(make_config(ipc=10, init="real", allow_duplicates=False), dataset=digits, progress=False)
    # class 8 has exactly 3 images: ipc 2 needs no duplicate anywhere
    d = Distiller(make_config(ipc=2, allow_duplicates=False), dataset=digits, progress=False)
    syn9 = d.images.detach()[d.syn_classes == 9]
    assert not torch.equal(syn9[0], syn9[1])


def test_noise_init_is_not_real(digits, make_config):
    d = Distiller(make_config(ipc=4, init="noise"), dataset=digits, progress=False)
    syn = d.images.detach().flatten(1)
    real = digits.images_train.flatten(1)
    assert torch.cdist(syn, real).min() > 1e-3
    assert torch.isfinite(syn).all() and syn.std() > 0.5
    assert len({tuple(s.tolist()) for s in syn}) == syn.shape[0]  # no two alike either


# ---- phases (METHOD sections 7 and 8) ----


def _find_snapshot(store, theta, epochs):
    return [(i, e) for i in store.completed() for e in epochs if torch.equal(store.snapshot(i, e), theta)]


def test_ltdd_phases(digits, stage1, stage2, make_config):
    d = Distiller(make_config(dam_offset=0.0), dataset=digits, progress=False)
    for _ in range(3):
        phases = d.phases()
        assert [(n, w) for n, w, _ in phases] == [("backbone", 1.0), ("classifier", 0.1)]
        (_, _, [bb]), (_, _, [cl]) = phases  # one student each (students=1)
        assert torch.equal(bb.mask, d.net.backbone_mask())
        assert bb.mask.dtype == torch.bool and 0 < int(bb.mask.sum()) == d.net.classifier_offset < d.net.num_params
        torch.testing.assert_close(bb.class_weights, dam.dam_weights(digits.class_counts), atol=0, rtol=0)
        counts = torch.tensor(digits.class_counts, dtype=torch.float32)
        torch.testing.assert_close(bb.class_weights, counts / counts.sum())
        assert bb.frozen is None
        # theta_0 = tau[t], theta_T = tau[t + M] of one stage-1 expert, t in [0, max_start_epoch)
        found = _find_snapshot(stage1, bb.theta_0, range(2))
        assert len(found) == 1
        i, t = found[0]
        assert torch.equal(bb.theta_T, stage1.snapshot(i, t + 2))
        assert len(bb.batches) == 2 and all(b.numel() == 10 and b.unique().numel() == 10 for b in bb.batches)
        assert len(bb.aug) == 2 and all(a is not None for a in bb.aug)

        assert cl.frozen == (0, d.net.classifier_offset) and cl.mask is None and cl.class_weights is None
        found = _find_snapshot(stage2, cl.theta_0, [0])
        assert len(found) == 1 and found[0][1] == 0
        assert torch.equal(cl.theta_T, stage2.snapshot(found[0][0], 2))
        assert len(cl.batches) == 2 and len(cl.aug) == 2
    # the DAM offset f enters the weights
    d = Distiller(make_config(dam_offset=5.0), dataset=digits, progress=False)
    weights = d.phases()[0][2][0].class_weights
    torch.testing.assert_close(weights, dam.dam_weights(digits.class_counts, 5.0), atol=0, rtol=0)
    assert not torch.allclose(weights, dam.dam_weights(digits.class_counts))


def test_plain_tm_has_one_unweighted_phase(digits, stage1, make_config):
    d = Distiller(make_config(method="plain_tm", experts_stage2="", syn_steps=3), dataset=digits, progress=False)
    assert d.stage2 is None
    phases = d.phases()
    assert len(phases) == 1
    name, weight, [phase] = phases[0]
    assert (name, weight) == ("matching", 1.0)
    assert phase.mask is None and phase.class_weights is None and phase.frozen is None
    assert len(phase.batches) == 3
    assert len(_find_snapshot(stage1, phase.theta_0, range(2))) == 1


def test_batches_cycle_without_replacement(digits, make_config):
    d = Distiller(make_config(ipc=3, batch_syn=10), dataset=digits, progress=False)  # 30 images: 3 batches each
    seen = torch.cat(d._batches(6))
    assert sorted(seen[:30].tolist()) == list(range(30)) and sorted(seen[30:].tolist()) == list(range(30))


# ---- one iteration ----


def test_step_matches_reference_gradients(digits, make_config):
    config = make_config(ipc=4)
    d = Recording(config, dataset=digits, progress=False)
    for _ in range(2):  # the second step also exercises the momentum buffers
        x0, y0, a0 = d.images.detach().clone(), d.labels.detach().clone(), d.alpha.detach().clone()
        losses = d.step()
        assert set(losses) == {"backbone", "classifier"} and all(math.isfinite(v) for v in losses.values())
        assert not torch.equal(d.images.detach(), x0)
        assert not torch.equal(d.labels.detach(), y0)
        assert not torch.equal(d.alpha.detach(), a0)
        g_x, g_y, g_a = torch.zeros_like(x0), torch.zeros_like(y0), torch.zeros_like(a0)
        for name, weight, [phase] in d.recorded[-1]:
            loss, gx, gy, ga = reference.two_pass_gradients(d.net, x0, y0, a0, phase, d.dsa)
            assert loss.item() == pytest.approx(losses[name], rel=1e-6)
            assert gx.abs().sum() > 0 and gy.abs().sum() > 0
            g_x += weight * gx
            g_y += weight * gy
            g_a += weight * ga
        torch.testing.assert_close(d.images.grad, g_x, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(d.labels.grad, g_y, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(d.alpha.grad, g_a, atol=1e-9, rtol=1e-5)
    assert d.iteration == 2
    # first step of SGD with momentum: the buffer is the gradient itself
    d = Recording(config, dataset=digits, progress=False)
    x0, y0, a0 = d.images.detach().clone(), d.labels.detach().clone(), d.alpha.detach().clone()
    d.step()
    torch.testing.assert_close(d.images.detach(), x0 - config.lr_img * d.images.grad)
    torch.testing.assert_close(d.labels.detach(), y0 - config.lr_y * d.labels.grad)
    torch.testing.assert_close(d.alpha.detach(), a0 - config.lr_lr * d.alpha.grad)


@pytest.mark.parametrize("second_pass", ["exact", "forward"])
def test_students_step_is_the_mean_over_students(digits, make_config, second_pass):
    """students=2: each phase draws two experts/start epochs with their own minibatches, and the step's gradient
    is the weighted sum over phases of the mean over the two students' reference gradients."""
    d = Recording(make_config(ipc=4, students=2, second_pass=second_pass, batch_chunk=3), dataset=digits,
                  progress=False)
    x0, y0, a0 = d.images.detach().clone(), d.labels.detach().clone(), d.alpha.detach().clone()
    losses = d.step()
    g_x = torch.zeros_like(x0)
    for name, weight, students in d.recorded[-1]:
        assert len(students) == 2 and not torch.equal(students[0].batches[0], students[1].batches[0])
        parts = [reference.two_pass_gradients(d.net, x0, y0, a0, p, d.dsa) for p in students]
        assert losses[name] == pytest.approx((parts[0][0] + parts[1][0]).item() / 2, rel=1e-5)
        g_x += weight * (parts[0][1] + parts[1][1]) / 2
    torch.testing.assert_close(d.images.grad, g_x, atol=1e-7, rtol=1e-4)


def test_compiled_step_equals_the_eager_step(digits, make_config):
    """compile=default: one Distiller step (both Expert-Decoupling phases, exact second pass) moves the images,
    labels and lr as the eager step does; a bad compile mode is refused by name."""
    eager = Distiller(make_config(ipc=2), dataset=digits, progress=False)
    compiled = Distiller(make_config(ipc=2, compile="default", out=eager.config.out + "-compiled"), dataset=digits,
                         progress=False)
    assert eager.step() == pytest.approx(compiled.step(), rel=1e-5)
    for a, b in ((eager.images, compiled.images), (eager.labels, compiled.labels), (eager.alpha, compiled.alpha)):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="compile must be one of default, reduce-overhead, max-autotune or null"):
        make_config(compile="fastest").validate()


def test_memory_budget_plans_the_run(digits, make_config, capsys):
    d = Distiller(make_config(ipc=4, batch_syn=40, memory_budget="100GB"), dataset=digits)
    assert d.plan is not None and d.batch_chunk == 40 and d.precision == "full"
    assert "memory plan for 100.00 GB: no chunking" in capsys.readouterr().err
    budget = d.plan.predicted_bytes - 1  # just under what the whole minibatch needs: chunks
    d = Distiller(make_config(ipc=4, batch_syn=40, memory_budget=str(budget), out=d.config.out + "-2"),
                  dataset=digits, progress=False)
    assert d.batch_chunk < 40 and d.plan.predicted_bytes <= budget
    d.step()
    with pytest.raises(ConfigError, match="nothing fits a memory budget of 10.0 kB"):
        Distiller(make_config(ipc=4, memory_budget="10kB", out=d.config.out + "-3"), dataset=digits, progress=False)
    with pytest.raises(ConfigError, match="memory budget 'plenty' is not a size"):
        make_config(memory_budget="plenty").validate()


def test_non_finite_matching_loss_stops_the_step_and_names_the_phase(digits, make_config):
    d = Distiller(make_config(ipc=2), dataset=digits, progress=False)
    with torch.no_grad():
        d.images.fill_(float("nan"))
    labels = d.labels.detach().clone()
    with pytest.raises(LTDDError, match=r"the backbone phase's matching loss became nan at iteration 0: lower lr_img"):
        d.step()
    assert torch.equal(d.labels.detach(), labels)  # no optimiser step was taken


def test_single_phase_gradient_equals_reference(digits, make_config):
    d = Recording(make_config(method="plain_tm", experts_stage2="", ipc=4), dataset=digits, progress=False)
    x0, y0, a0 = d.images.detach().clone(), d.labels.detach().clone(), d.alpha.detach().clone()
    losses = d.step()
    [(name, weight, [phase])] = d.recorded[0]
    loss, gx, gy, ga = reference.two_pass_gradients(d.net, x0, y0, a0, phase, d.dsa)
    assert losses == {"matching": pytest.approx(loss.item(), rel=1e-6)}
    torch.testing.assert_close(d.images.grad, gx, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(d.labels.grad, gy, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(d.alpha.grad, ga, atol=1e-9, rtol=1e-5)
    # the unrolled graph with detached parameters has the same gradient (METHOD section 6)
    x, y, a = x0.clone().requires_grad_(), y0.clone().requires_grad_(), a0.clone().requires_grad_()
    unrolled = reference.unrolled_matching_loss(d.net, x, y, a, phase, d.dsa, detach_params=True)
    ux, uy, ua = torch.autograd.grad(unrolled, (x, y, a))
    torch.testing.assert_close(gx, ux, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ga, ua, atol=1e-6, rtol=1e-4)


def test_fixed_labels_stay(digits, make_config):
    d = Distiller(make_config(learn_labels=False), dataset=digits, progress=False)
    y0 = d.labels.detach().clone()
    d.step()
    assert torch.equal(d.labels.detach(), y0) and not d.labels.requires_grad


# ---- checkpoints and resume ----


def test_interrupted_run_resumes_bit_identically(digits, make_config, tmp_path):
    config = make_config(ipc=3, iterations=4, checkpoint_every=2, out=str(tmp_path / "a"))
    first = Distiller(config, dataset=digits, progress=False)
    assert first.run(stop_after=2) is None
    assert first.iteration == 2 and (tmp_path / "a" / "checkpoint.pt").is_file()
    assert not (tmp_path / "a" / "synset.pt").exists()
    del first

    resumed = Distiller(config, dataset=digits, progress=False)
    assert resumed.iteration == 2
    path = resumed.run()
    assert resumed.iteration == 4 and path == tmp_path / "a" / "synset.pt"

    whole = Distiller(replace(config, out=str(tmp_path / "b")), dataset=digits, progress=False)
    whole.run()
    assert torch.equal(resumed.images.detach(), whole.images.detach())
    assert torch.equal(resumed.labels.detach(), whole.labels.detach())
    assert torch.equal(resumed.alpha.detach(), whole.alpha.detach())
    assert [h["iteration"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["loss_backbone"] for h in resumed.history] == [h["loss_backbone"] for h in whole.history]

    record = load_synset(path)
    assert record["lr"] == float(resumed.alpha.detach()) and record["lr"] != 0.01
    assert torch.equal(record["images"], resumed.images.detach())
    assert torch.equal(record["labels"], resumed.labels.detach())
    assert record["dataset"] == "digits" and record["method"] == "ltdd" and record["imbalance_factor"] == 50.0
    assert record["meta"]["iterations"] == 4 and record["meta"]["ipc"] == 3

    # more iterations are allowed on resume; other settings are not
    longer = Distiller(replace(config, iterations=6), dataset=digits, progress=False)
    assert longer.iteration == 4
    with pytest.raises(ConfigError, match="ipc was 3, now 4"):
        Distiller(replace(config, ipc=4), dataset=digits, progress=False)
    with pytest.raises(ConfigError, match="lr_img"):
        Distiller(replace(config, lr_img=5.0), dataset=digits, progress=False)


def test_damaged_checkpoint_is_refused(digits, make_config, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LTDDError, match=r"checkpoint.pt is not a readable distillation checkpoint \(damaged, or not a "
                                        r"torch file\); move it away"):
        Distiller(make_config(out=str(tmp_path / "out")), dataset=digits, progress=False)


class _RunsCode:
    """Unpickling this calls a function: what a crafted checkpoint would use to run a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(digits, make_config, tmp_path):
    config = make_config(ipc=2, iterations=1, out=str(tmp_path / "out"))
    Distiller(config, dataset=digits, progress=False).run()
    path, marker = tmp_path / "out" / "checkpoint.pt", tmp_path / "ran"
    state = torch.load(path, weights_only=True)  # a real checkpoint loads as tensors and plain values
    state["history"].append(_RunsCode(str(marker)))
    torch.save(state, path)
    with pytest.raises(LTDDError, match=r"checkpoint.pt is not a readable distillation checkpoint: it holds objects "
                                        r"other than tensors and plain values, and loading those could run code") as err:
        Distiller(config, dataset=digits, progress=False)
    assert not marker.exists() and "\n" not in str(err.value)


# ---- refusals of experts that do not fit ----


def test_experts_of_other_data_are_refused(digits, stage1, stage2, make_config, tmp_path):
    other = load_dataset("digits", imbalance_factor=10, seed=0)
    with pytest.raises(TrajectoryError, match="imbalance_factor is 50.0 there, expected 10.0"):
        Distiller(make_config(imbalance_factor=10), dataset=other, progress=False)
    with pytest.raises(TrajectoryError, match="num_params"):
        Distiller(make_config(width=16), dataset=digits, progress=False)
    with pytest.raises(LTDDError, match="stage-2 trajectories, expected stage 1"):
        Distiller(make_config(experts=str(stage2.root)), dataset=digits, progress=False)
    with pytest.raises(LTDDError, match="stage-1 trajectories, expected stage 2"):
        Distiller(make_config(experts_stage2=str(stage1.root)), dataset=digits, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text((stage1.root / "manifest.json").read_text())
    with pytest.raises(LTDDError, match="no complete expert"):
        Distiller(make_config(experts=str(empty)), dataset=digits, progress=False)


def test_start_window_beyond_trajectories_is_refused(digits, make_config):
    with pytest.raises(ConfigError, match="max_start_epoch 4 - 1 \\+ expert_epochs 2 exceeds the 4 epochs"):
        Distiller(make_config(max_start_epoch=4, expert_epochs=2), dataset=digits, progress=False)
    # the last start epoch is max_start_epoch - 1: 2 + 2 = 4 epochs fit exactly
    Distiller(make_config(max_start_epoch=3, expert_epochs=2), dataset=digits, progress=False)
    with pytest.raises(ConfigError, match="expert_epochs 3 exceeds the 2 epochs of the stage-2"):
        Distiller(make_config(max_start_epoch=1, expert_epochs=3), dataset=digits, progress=False)
    with pytest.raises(ConfigError, match="min_start_epoch < max_start_epoch"):
        make_config(min_start_epoch=2, max_start_epoch=2).validate()
    with pytest.raises(ConfigError, match="needs experts_stage2"):
        make_config(experts_stage2="").validate()


def test_growing_start_window(digits, make_config):
    config = make_config(initial_max_start_epoch=1, max_start_epoch=3, window_growth_iterations=4, expert_epochs=1,
                         lambda_classifier=0.0)
    d = Recording(config, dataset=digits, progress=False)
    bounds, starts = [], []
    for _ in range(6):
        bounds.append(d._max_start_epoch())
        d.step()
        theta_0 = d.recorded[-1][0][2][0].theta_0
        [(_, t)] = _find_snapshot(d.stage1, theta_0, range(4))
        starts.append(t)
    assert bounds == [1, 1, 2, 2, 3, 3]
    assert all(0 <= t < b for t, b in zip(starts, bounds)), (starts, bounds)
    assert starts[:2] == [0, 0]
    # without initial_max_start_epoch the window is fixed
    fixed = Distiller(replace(config, initial_max_start_epoch=None), dataset=digits, progress=False)
    assert fixed._max_start_epoch() == 3
    fixed.iteration = 100
    assert fixed._max_start_epoch() == 3
