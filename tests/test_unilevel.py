"""The uni-level distiller (ltdd_fast/unilevel/), the ce+mse protocol and ADSA calibration (METHOD section 11)."""
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ltdd_fast.calibration import (calibrate_logits, calibrate_record, calibration_warning,
                                  class_confidence_variance, fit_tau)
from ltdd_fast.cli import main
from ltdd_fast.config import UnilevelConfig, load_config
from ltdd_fast.errors import ConfigError, DataError
from ltdd_fast.evaluate import EvalConfig, student_loss
from ltdd_fast.models import get_network
from ltdd_fast.synset import load_synset, save_synset, synset_classes
from ltdd_fast.unilevel import (DebiasConfig, Recovery, balanced_target, debias_loss, debias_schedule,
                                fair_statistics, initialise, multi_round_pick, rebalance_weights, train_debiased)
from ltdd_fast.unilevel.recovery import STATS_FILE
from ltdd_fast.unilevel.statistics import FeatureTap, bn_layers


@pytest.fixture(scope="module")
def debiased(tmp_path_factory, digits):
    """Tiny debiased experts on Digits-LT IF 50 (2 epochs, width 8)."""
    root = tmp_path_factory.mktemp("unilevel") / "experts"
    config = DebiasConfig(epochs=2, width=8, batch_size=64, proj_dim=16)
    train_debiased(digits, config, root, progress=False)
    return root


def small_config(experts, out, **kw):
    base = dict(dataset="digits", imbalance_factor=50, ipc=3, experts=str(experts), iterations=6, lr_img=0.05,
                checkpoint_every=3, eval_width=8, eval_epochs=2, out=str(out), init_crops=4, init_pool=16)
    base.update(kw)
    return UnilevelConfig(**base)


# ---- the debiased loss ------------------------------------------------------------------------------------

def test_debias_schedule_moves_from_plain_to_rebalanced():
    values = [debias_schedule(t, 4) for t in range(1, 5)]
    assert [a for a, _ in values] == [1 / 16, 4 / 16, 9 / 16, 1.0]
    assert all(abs(a + b - 1) < 1e-12 for a, b in values)
    with pytest.raises(ConfigError, match="epoch must be an int in 1..4"):
        debias_schedule(0, 4)


def test_rebalance_weights_follow_the_frequencies():
    w = rebalance_weights([100, 10, 1], q=1.0)
    r = torch.tensor([100, 10, 1], dtype=torch.float64) / 111
    want = r.pow(-1) / r.pow(-1).sum() * 3
    assert torch.allclose(w, want)
    assert torch.allclose(rebalance_weights([5, 5], q=2.0), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(rebalance_weights([100, 10, 1], q=0.0), torch.ones(3, dtype=torch.float64))
    assert w[2] > w[1] > w[0]


def test_debias_loss_is_the_weighted_mixture():
    logits, target = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    w = torch.tensor([0.5, 1.0, 1.5])
    nll = -(target * F.log_softmax(logits, 1))
    want = 0.3 * (nll * w).sum(1).mean() + 0.7 * nll.sum(1).mean()
    assert torch.allclose(debias_loss(logits, target, w, 0.3, 0.7), want)


def test_debiased_experts_resume_to_the_same_files(digits, tmp_path, monkeypatch):
    from ltdd_fast.unilevel import experts as module

    config = DebiasConfig(epochs=2, width=8, batch_size=64, proj_dim=16)
    whole = train_debiased(digits, config, tmp_path / "a", progress=False)
    calls = {"n": 0}
    real = module.append_line

    def stop_in_epoch_2(path, text):
        calls["n"] += 1
        if calls["n"] == 2:  # the observer's second epoch record: its checkpoint of epoch 1 is on disk
            raise KeyboardInterrupt
        return real(path, text)
    monkeypatch.setattr(module, "append_line", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_debiased(digits, config, tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "observer.ckpt").is_file()
    monkeypatch.setattr(module, "append_line", real)
    resumed = train_debiased(digits, config, tmp_path / "b", progress=False)
    for role in ("observer", "teacher"):
        assert resumed.sha256(role) == whole.sha256(role)
    assert not (tmp_path / "b" / "observer.ckpt").exists()


def test_debiased_experts_need_batch_norm():
    with pytest.raises(ConfigError, match="needs batch norm"):
        DebiasConfig(model="alexnet")


# ---- fair statistics --------------------------------------------------------------------------------------

def _direct_statistics(net, images, labels, k):
    """Per layer (class means, class variances) from one batch of each class, by plain tensor reductions."""
    net.eval()
    out = None
    with torch.no_grad(), FeatureTap(net) as tap:
        for c in range(k):
            net(images[labels == c].double())
            rows = [f.transpose(0, 1).reshape(f.shape[1], -1) for f in tap.inputs]
            if out is None:
                out = [([], []) for _ in rows]
            for (means, variances), r in zip(out, rows):
                means.append(r.mean(1))
                variances.append(r.var(1, unbiased=False))
    return [(torch.stack(m), torch.stack(v)) for m, v in out]


@pytest.mark.parametrize("batch_size", [7, 64, 1000])
def test_fair_statistics_equal_a_direct_computation_whatever_the_batches(batch_size):
    torch.manual_seed(0)
    net = get_network("convnet", 1, 3, (8, 8), width=4, norm="batchnorm").double()
    images, labels = torch.randn(40, 1, 8, 8, dtype=torch.float64), torch.tensor([0] * 25 + [1] * 10 + [2] * 5)
    order = torch.randperm(40)
    stats = fair_statistics(net, images[order], labels[order], 3, batch_size=batch_size, backend="reference")
    want = _direct_statistics(net, images, labels, 3)
    assert stats.layers == [name for name, _ in bn_layers(net)] and len(want) == 2
    for (m, v), cm, cv in zip(want, stats.class_mean, stats.class_var):
        assert torch.allclose(cm, m, atol=1e-10) and torch.allclose(cv, v, atol=1e-10)
    assert stats.class_count.tolist() == [25.0, 10.0, 5.0]


def test_balanced_target_weighs_classes_equally():
    class_mean = torch.tensor([[0.0], [10.0]])
    class_var = torch.tensor([[1.0], [1.0]])
    mean, var = balanced_target(class_mean, class_var)
    # whatever the counts behind them: the mixture of two equally weighted classes N(0, 1) and N(10, 1)
    assert mean.item() == 5.0 and abs(var.item() - (1 + 25)) < 1e-12


# ---- initialisation ---------------------------------------------------------------------------------------

def test_multi_round_pick_takes_each_view_once_in_rounds():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    # round 1: image 0 offers view 0 (0.9), image 1 offers view 1 (0.8); round 2: 0.5 (image 0) beats 0.7? no
    assert multi_round_pick(scores, 1) == [(0, 0)]
    assert multi_round_pick(scores, 3) == [(0, 0), (1, 1), (1, 2)]
    picks = multi_round_pick(scores, 6)
    assert len(set(picks)) == 6
    with pytest.raises(ConfigError, match="7 slots"):
        multi_round_pick(scores, 7)


def test_initialise_fills_a_one_image_class_with_distinct_crops():
    torch.manual_seed(0)
    teacher = get_network("convnet", 1, 2, (8, 8), width=4, norm="batchnorm").eval()
    images = torch.randn(6, 1, 8, 8)
    labels = torch.tensor([0, 0, 0, 0, 0, 1])
    out, classes, picks = initialise(teacher, images, labels, 2, ipc=5, crops=2,
                                     generator=torch.Generator().manual_seed(1))
    assert out.shape == (10, 1, 8, 8) and classes.tolist() == [0] * 5 + [1] * 5
    assert len(set(picks[1])) == 5 and {i for i, _ in picks[1]} == {5}
    tail = out[5:].flatten(1)
    assert all(not torch.equal(tail[i], tail[j]) for i in range(5) for j in range(i))
    assert len(set(picks[0])) == 5
    # the unaugmented image is one of the candidates (view 0)
    assert any(torch.equal(out[5 + n], images[5]) for n, (_, v) in enumerate(picks[1]) if v == 0)


# ---- recovery ---------------------------------------------------------------------------------------------

def test_recovery_lowers_the_statistics_loss(debiased, digits, tmp_path):
    rec = Recovery(small_config(debiased, tmp_path / "r", iterations=30, augment=None), dataset=digits,
                   progress=False)
    first = rec.step()["loss"]
    for _ in range(28):
        rec.step()
    assert rec.step()["loss"] < 0.8 * first
    assert (debiased / STATS_FILE).is_file()


def test_chunked_gradient_equals_the_whole_set(debiased, digits, tmp_path):
    whole = Recovery(small_config(debiased, tmp_path / "a", lambda_ce=0.5), dataset=digits, progress=False)
    chunked = Recovery(small_config(debiased, tmp_path / "b", lambda_ce=0.5, batch_chunk=7), dataset=digits,
                       progress=False)
    assert torch.equal(whole.images, chunked.images) and len(chunked._chunks()) == 5
    params = whole.augment.sample(whole.images.shape[0], (8, 8), torch.Generator().manual_seed(3))
    l1, p1, g1 = whole.gradient(params)
    l2, p2, g2 = chunked.gradient(params)
    assert abs(l1 - l2) < 1e-4 * abs(l1)
    assert torch.allclose(g1, g2, rtol=1e-3, atol=1e-7 * g1.abs().max().item())


def test_resume_is_bit_identical(debiased, digits, tmp_path):
    straight = Recovery(small_config(debiased, tmp_path / "a"), dataset=digits, progress=False)
    straight.run()
    first = Recovery(small_config(debiased, tmp_path / "b"), dataset=digits, progress=False)
    assert first.run(stop_after=3) is None
    again = Recovery(small_config(debiased, tmp_path / "b"), dataset=digits, progress=False)
    assert again.iteration == 3
    again.run()
    a, b = load_synset(tmp_path / "a" / "synset.pt"), load_synset(tmp_path / "b" / "synset.pt")
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert a["method"] == "unilevel" and a["classes"].tolist() == [c for c in range(10) for _ in range(3)]


def test_memory_budget_chooses_a_chunk(debiased, digits, tmp_path):
    rec = Recovery(small_config(debiased, tmp_path / "m", memory_budget="300KB"), dataset=digits, progress=False)
    assert 1 <= rec.chunk < 30
    with pytest.raises(ConfigError, match="memory_budget 1KB cannot hold"):
        Recovery(small_config(debiased, tmp_path / "n", memory_budget="1KB"), dataset=digits, progress=False)


def test_statistics_of_another_observer_are_refused(debiased, digits, tmp_path):
    import shutil

    copy = tmp_path / "experts"
    shutil.copytree(debiased, copy)
    Recovery(small_config(copy, tmp_path / "r", iterations=1), dataset=digits, progress=False)
    manifest = json.loads((copy / "manifest.json").read_text())
    stats = torch.load(copy / STATS_FILE, weights_only=True)
    stats["observer_sha256"] = "0" * 64
    torch.save(stats, copy / STATS_FILE)
    with pytest.raises(DataError, match="statistics of another observer"):
        Recovery(small_config(copy, tmp_path / "s", iterations=1), dataset=digits, progress=False)
    assert manifest["format"] == "ltdd-debiased-experts/1"


def test_trajectory_experts_are_refused(digits, tmp_path):
    from ltdd_fast.experts import ExpertConfig, train_experts

    train_experts(digits, ExpertConfig(num_experts=1, epochs=1, width=8), tmp_path / "traj", progress=False)
    with pytest.raises(DataError, match="not debiased ones"):
        Recovery(small_config(tmp_path / "traj", tmp_path / "r"), dataset=digits, progress=False)


def test_unilevel_config_from_a_preset_and_overrides():
    config = load_config("digits-lt-if10-ipc10-unilevel", ["experts=x", "ipc=4"])
    assert isinstance(config, UnilevelConfig) and config.ipc == 4 and config.augment is None
    # a trajectory preset turned to unilevel names the first key the method does not take
    with pytest.raises(ConfigError, match="unknown key 'model' in digits-lt-if10-ipc10.yaml for method unilevel"):
        load_config("digits-lt-if10-ipc10", ["method=unilevel"])
    with pytest.raises(ConfigError, match="unknown key 'syn_steps' in the command line for method unilevel"):
        load_config("digits-lt-if10-ipc10-unilevel", ["syn_steps=3"])
    with pytest.raises(ConfigError, match="init must be one of"):
        replace(UnilevelConfig(experts="x"), init="correct").validate()


# ---- protocols and calibration ----------------------------------------------------------------------------

def test_ce_mse_protocol_is_its_formula():
    out, soft = torch.randn(5, 4), torch.softmax(torch.randn(5, 4), 1)
    hard = torch.tensor([0, 1, 2, 3, 0])
    config = EvalConfig(protocol="ce+mse", ce_weight=0.7, mse_weight=2.0)
    want = 0.7 * F.cross_entropy(out, hard) + 2.0 * (torch.softmax(out, 1) - soft).pow(2).sum(1).mean()
    assert torch.allclose(student_loss(out, soft, True, config, hard), want)
    assert torch.allclose(student_loss(out, soft, True, EvalConfig()), -(soft * F.log_softmax(out, 1)).sum(1).mean())


def test_calibration_tau_minimises_the_variance():
    counts = [400, 100, 25, 5]
    log_prior = (torch.tensor(counts, dtype=torch.float64) / sum(counts)).log()
    torch.manual_seed(0)
    classes = torch.arange(4).repeat_interleave(6)
    # labels that are exactly fair after adjusting by tau = 0.6: the same confidence pattern for every class
    base = torch.full((24, 4), 0.0, dtype=torch.float64)
    base[torch.arange(24), classes] = 2.0
    logits = base + 0.6 * log_prior
    tau, value = fit_tau(logits, classes, counts)
    assert abs(tau - 0.6) < 1e-3 and value < 1e-10
    for other in (0.0, 0.5, 0.7, 1.0):
        assert class_confidence_variance(logits, classes, log_prior, other) > value
    assert torch.allclose(calibrate_logits(logits, counts, tau), base, atol=1e-3)
    with pytest.raises(DataError, match="hard labels"):
        fit_tau(classes, classes, counts)


def test_calibration_warns_when_it_flattens_wrong_labels(tmp_path, digits, capsys, monkeypatch):
    """Labels that name the smallest class for 4 other tail classes' images: the variance falls by taking the
    other classes' confidence down too, so fewer labels name their class after calibrating, and the summary and
    the CLI say so; a fair set, and a fit inside the search's range, get no warning."""
    counts, k = list(digits.class_counts), digits.num_classes
    classes = torch.arange(k).repeat_interleave(2)
    good = torch.zeros(2 * k, k)
    good[torch.arange(2 * k), classes] = 4.0
    record = lambda labels: {"method": "test", "labels": labels, "class_counts": counts}  # noqa: E731
    _, summary = calibrate_record(record(good), classes)
    assert summary["warning"] is None and summary["agree_before"] == summary["agree_after"] == 1.0
    wrong = good.clone()
    mislabelled = (classes >= k // 2) & (classes < k - 1)
    wrong[mislabelled] = 0.0
    wrong[mislabelled, k - 1] = 6.0
    out, summary = calibrate_record(record(wrong), classes)
    assert summary["agree_before"] == pytest.approx(0.6) and summary["agree_after"] < 0.6
    assert "fell from 60% to" in summary["warning"] and out["meta"]["calibration"]["warning"] == summary["warning"]
    assert "search's bound (+4)" in calibration_warning({"tau": 4.0, "agree_before": 1.0, "agree_after": 1.0})
    assert calibration_warning({"tau": 3.9, "agree_before": 0.5, "agree_after": 0.5}) is None
    monkeypatch.chdir(tmp_path)
    save_synset("wrong.pt", torch.zeros(2 * k, 1, 8, 8), wrong, 0.01, digits, method="test", classes=classes)
    assert main(["calibrate", "--synset", "wrong.pt", "--out", "cal.pt"]) == 0
    captured = capsys.readouterr()
    assert "labels naming their image's class 60% ->" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ltdd calibrate: warning: the labels naming"), err


def test_cli_unilevel_pipeline(debiased, digits, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["distill", "--config", "digits-lt-if10-ipc10-unilevel", f"experts={debiased}", "imbalance_factor=50",
                 "iterations=2", "ipc=2", "eval_epochs=2", "eval_width=8", "out=u", "init_pool=8", "--quiet"]) == 0
    assert "synthetic set: u/synset.pt" in capsys.readouterr().out
    assert main(["calibrate", "--synset", "u/synset.pt", "--out", "cal.pt", "--json", "cal.json"]) == 0
    summary = json.loads((tmp_path / "cal.json").read_text())
    assert summary["variance_after"] <= summary["variance_before"]
    record = load_synset("cal.pt")
    assert record["meta"]["calibration"]["tau"] == summary["tau"] and synset_classes(record).shape == (20,)
    for extra in (["--protocol", "ce+mse"], ["--calibrate"]):
        assert main(["eval", "--synset", "u/synset.pt", "--epochs", "2", "--num-runs", "1", "--width", "8",
                     "--quiet", *extra]) == 0
    capsys.readouterr()


def test_cli_refuses_bad_unilevel_input(debiased, digits, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images, labels = torch.zeros(10, 1, 8, 8), torch.arange(10)
    save_synset("hard.pt", images, labels, 0.01, digits, method="random")
    cases = [
        (["calibrate", "--synset", "hard.pt", "--out", "x.pt"], "has hard labels"),
        (["experts", "--recipe", "debiased", "--dataset", "digits", "--model", "alexnet", "--out", "e"],
         "needs batch norm"),
        (["experts", "--recipe", "debiased", "--dataset", "digits", "--stage", "2", "--out", "e"],
         "--stage does not apply to --recipe debiased"),
        (["eval", "--random-ipc", "2", "--dataset", "digits", "--calibrate"], "--calibrate"),
        (["distill", "--config", "digits-lt-if10-ipc10-unilevel", "experts=nowhere", "--quiet"],
         "no manifest.json"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "e").exists()


def test_bench_memory_of_the_recovery_stops_growing_with_a_chunk(debiased, tmp_path, capsys):
    from ltdd_fast.bench.recovery import bench_recovery_memory, format_recovery_memory

    result = bench_recovery_memory("digits-lt-if10-ipc10-unilevel", ipcs=(2, 8), chunk=5,
                                   overrides=[f"experts={debiased}", "imbalance_factor=50", "init_pool=8"])
    whole, chunked = result["whole"], result["chunked"]
    assert whole["8"] > 2 * whole["2"]             # one pass over the whole set: its activations grow with it
    assert chunked["8"] < 0.6 * whole["8"]         # a chunk of 5 images a pass bounds them
    assert "last/first" in format_recovery_memory(result)
    with pytest.raises(ConfigError, match="is a ltdd preset"):
        bench_recovery_memory("digits-lt-if10-ipc10", overrides=["experts=x", "experts_stage2=y"])
