"""ltdd bench fidelity: the comparison's plan, its JSON and files, its resumption, and the head/tail split."""
import json

import pytest

from ltdd_fast.bench import fidelity as bench_fidelity
from ltdd_fast.bench.fidelity import METHODS, SYNTHETIC, Fidelity, format_fidelity, make_plan, verdicts
from ltdd_fast.cli import main
from ltdd_fast.distill import Distiller
from ltdd_fast.errors import ConfigError
from ltdd_fast.evaluate import head_tail_classes, rank_split
from ltdd_fast.hierarchy import group_by_rank
from ltdd_fast.synset import load_synset
from test_idx import write_idx_set

ROW_KEYS = {"overall", "overall_std", "many", "medium", "few", "head", "tail", "tail_std", "seconds"}


def test_head_tail_by_rank():
    counts = [50, 600, 20, 20, 400, 5]
    assert head_tail_classes(counts, 2) == ([1, 4], [3, 5])  # a tie: the lower index counts as larger
    runs = [[0.1, 1.0, 0.0, 0.5, 0.8, 0.25], [0.3, 0.6, 0.0, 0.1, 0.4, 0.75]]
    split = rank_split(runs, counts, 2)
    assert split["head"] == pytest.approx((0.9 + 0.5) / 2) and split["head_std"] == pytest.approx(0.2)
    assert split["tail"] == pytest.approx((0.375 + 0.425) / 2) and split["tail_std"] == pytest.approx(0.025)
    g = group_by_rank(counts, 2)
    assert g.names == ["head", "medium", "tail"] and g.groups == [[1, 4], [0, 2], [3, 5]]
    assert group_by_rank([3, 2, 1, 0], 2).names == ["head", "tail"]
    with pytest.raises(ConfigError, match="k must be an int in 1..3"):
        head_tail_classes(counts, 4)


def test_plan_refuses_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="no preset fashion-mnist-lt-if100-ipc20 .*fashion-mnist-lt-if100-ipc10"):
        make_plan("fashion-mnist", [100], [10, 20], tmp_path)
    with pytest.raises(ConfigError, match="no recipe for data set 'cifar10'"):
        make_plan("cifar10", [100], [10], tmp_path)
    with pytest.raises(ConfigError, match="imbalance factors must be whole numbers >= 1"):
        make_plan("fashion-mnist", [0], [10], tmp_path)
    with pytest.raises(ConfigError, match="without repeats"):
        make_plan("fashion-mnist", [10, 10], [10], tmp_path)
    assert not any(tmp_path.iterdir())
    plan = make_plan("fashion-mnist", [10, 50, 100, 200], [1, 10, 50], tmp_path)
    assert len(plan.presets) == 12 and plan.presets[200, 50].lambda_backbone == 0.1
    assert {c.width for c in plan.presets.values()} == {plan.recipe.eval_width}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    plan = make_plan("digits", [10], [10], out, quick=True)
    return out, Fidelity(plan, progress=False).run()


def test_quick_run_writes_every_method_and_file(quick_run):
    out, results = quick_run
    for method in METHODS:
        row = results[method]["10"]["10"]
        assert ROW_KEYS <= set(row) and 0 <= row["overall"] <= 1 and row["seconds"] >= 0
    for method in ("random", "plain_tm", "ltdd"):
        row = results["two_stage"][method]["10"]["10"]
        assert ROW_KEYS <= set(row) and row["runs"] == 1
    assert results["ltdd"]["10"]["10"]["runs"] == 2 and results["whole"]["10"]["10"]["runs"] == 1
    run = out / "digits-if10"
    for path in ("experts1/manifest.json", "experts2/manifest.json", "experts_plain/manifest.json",
                 "ipc10/ltdd/synset.pt", "ipc10/plain_tm/synset.pt", "ipc10/random.png", "ipc10/ltdd.png",
                 "ipc10/plain_tm.png", "eval_whole.json", "stage_seconds.json"):
        assert (run / path).is_file(), path
    for path in ("table.txt", "results.json", "per_class_accuracy.png"):
        assert (out / path).is_file(), path
    assert json.loads((out / "results.json").read_text())["ltdd"] == results["ltdd"]
    stages = results["stage_seconds"]["10"]
    assert {"experts1", "experts2", "experts_plain", "eval_whole", "ipc10_distill_ltdd", "ipc10_eval_ltdd"} <= set(stages)
    # a method's row counts the experts it needed and its own distillation
    assert results["ltdd"]["10"]["10"]["seconds"] >= stages["experts1"] + stages["experts2"] + stages["ipc10_distill_ltdd"]
    table = (out / "table.txt").read_text()
    assert "IF 10, IPC 10" in table and "ltdd two-stage" in table
    assert "ltdd beats random on tail" in table or "ltdd does not beat random on tail" in table
    assert any(v["against"] == "random" and v["on"] == "tail" for v in results["verdicts"])


def test_rerun_repeats_nothing(quick_run, monkeypatch):
    out, first = quick_run
    calls = []
    monkeypatch.setattr(Distiller, "step", lambda self: pytest.fail("a finished distillation ran again"))
    monkeypatch.setattr(bench_fidelity, "train_and_evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    real_train = bench_fidelity.train_experts

    def count_experts(dataset, config, out_dir, **kw):
        store = real_train(dataset, config, out_dir, **kw)
        calls.append(len(store))
        return store

    monkeypatch.setattr(bench_fidelity, "train_experts", count_experts)
    again = Fidelity(make_plan("digits", [10], [10], out, quick=True), progress=False).run()
    for method in METHODS:
        a, b = first[method]["10"]["10"], again[method]["10"]["10"]
        assert a["overall"] == b["overall"] and a["tail"] == b["tail"]
    assert calls == [1, 1, 1]


def test_a_missing_evaluation_is_redone_alone(quick_run, monkeypatch):
    out, first = quick_run
    (out / "digits-if10" / "ipc10" / "eval_plain_tm.json").unlink()
    evaluated = []
    real = bench_fidelity.train_and_evaluate

    def spy(images, labels, dataset, config, name="", **kw):
        evaluated.append(name)
        return real(images, labels, dataset, config, name=name, **kw)

    monkeypatch.setattr(bench_fidelity, "train_and_evaluate", spy)
    again = Fidelity(make_plan("digits", [10], [10], out, quick=True), progress=False).run()
    assert evaluated == ["plain_tm IF 10 IPC 10"]
    assert again["plain_tm"]["10"]["10"]["overall"] == first["plain_tm"]["10"]["10"]["overall"]


def test_verdicts_use_twice_the_larger_std():
    row = lambda o, s, t, ts: {"overall": o, "overall_std": s, "tail": t, "tail_std": ts}  # noqa: E731
    results = {"ltdd": {"50": {"10": row(0.80, 0.01, 0.6, 0.05)}},
               "plain_tm": {"50": {"10": row(0.70, 0.04, 0.55, 0.01)}},
               "random": {"50": {"10": row(0.79, 0.001, 0.4, 0.02)}},
               "whole": {"50": {"10": row(0.85, 0.0, 0.7, 0.0)}}}
    got = {(v["against"], v["on"]): v for v in verdicts(results)}
    assert got["plain_tm", "overall"]["beats"] and got["plain_tm", "overall"]["two_std"] == pytest.approx(0.08)
    assert not got["plain_tm", "tail"]["beats"]          # +5 points, but 2 std is 10
    assert not got["random", "overall"]["beats"]         # +1 point against 2 std of 2
    assert got["random", "tail"]["beats"]
    assert got["whole", "overall"]["margin"] == pytest.approx(-0.05) and not got["whole", "overall"]["beats"]


def test_cli_on_fashion_mnist_idx_files(tmp_path, capsys):
    data = tmp_path / "data"
    write_idx_set(data, n_per_class=(30, 3), gz=True)
    out, js = tmp_path / "out", tmp_path / "r.json"
    assert main(["bench", "fidelity", "--dataset", "fashion-mnist", "--data-dir", str(data), "--imbalance-factors",
                 "10", "--ipc", "1", "--out", str(out), "--json", str(js), "--quick", "--quiet",
                 "--no-two-stage"]) == 0
    results = json.loads(js.read_text())
    assert set(METHODS) <= set(results) and set(results["ltdd"]["10"]["1"]) >= ROW_KEYS
    # --no-two-stage: flat networks only (the digits run above has the two-stage rows)
    assert results["settings"]["two_stage"] is False and results["two_stage"] == {m: {} for m in SYNTHETIC}
    assert "two-stage" not in (out / "table.txt").read_text().split("rank groups.")[1]
    assert results["settings"]["presets"]["10/1"]["dataset"] == "fashion-mnist"
    assert "IF 10, IPC 1" in capsys.readouterr().out
    record = load_synset(out / "fashion-mnist-if10" / "ipc1" / "ltdd" / "synset.pt")
    assert record["meta"]["ipc"] == 1 and record["images"].shape == (10, 1, 28, 28)
    assert format_fidelity(results).splitlines()[0].startswith("fashion-mnist-LT")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "fidelity", "--dataset", "fashion-mnist", "--imbalance-factors", "100", "--ipc", "20",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no preset fashion-mnist-lt-if100-ipc20" in err
    assert main(["bench", "fidelity", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--imbalance-factors",
                 "10", "--ipc", "1", "--out", str(tmp_path / "o"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-images-idx3-ubyte[.gz] not found" in err
    assert main(["bench", "fidelity", "--dataset", "digits", "--imbalance-factors", "10", "--ipc", "10",
                 "--out", str(tmp_path / "o"), "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
