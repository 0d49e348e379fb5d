"""`ltdd bench compare`: both distiller families, raw and calibrated, under both protocols (a --quick run)."""
import json

import pytest

from ltdd_fast.bench import fidelity as bench_fidelity
from ltdd_fast.bench.compare import METHODS, Comparison, make_compare_plan
from ltdd_fast.cli import main
from ltdd_fast.errors import ConfigError
from ltdd_fast.unilevel import Recovery


@pytest.fixture(scope="module")
def quick_compare(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return out, Comparison(make_compare_plan("digits", [10], [10], out, quick=True), progress=False).run()


def test_quick_compare_writes_every_row(quick_compare):
    out, results = quick_compare
    names = set(results["soft-ce"])
    assert names == {"random", "plain_tm", "plain_tm+calibrated", "ltdd", "ltdd+calibrated", "unilevel",
                     "unilevel+calibrated"}  # random real images have hard labels: nothing to calibrate
    for protocol in ("soft-ce", "ce+mse"):
        for name in names:
            row = results[protocol][name]["10"]["10"]
            assert 0 <= row["overall"] <= 1 and row["tail"] is not None and row["runs"] == 2
    for method in METHODS:
        sec = results["seconds"]["10"]["10"][method]
        assert sec["experts"] >= 0 and sec["synthesis"] >= 0
    assert results["seconds"]["10"]["10"]["unilevel"]["experts"] > 0
    assert set(results["tau"]["10"]["10"]) == {"plain_tm", "ltdd", "unilevel"}
    run = out / "digits-if10"
    for path in ("experts_debiased/observer.pt", "experts_debiased/teacher.pt", "experts_debiased/stats.pt",
                 "ipc10/unilevel/synset.pt", "ipc10/unilevel.png", "ipc10/compare_ltdd_soft-ce.json",
                 "ipc10/compare_unilevel_calibrated_ce+mse.json"):
        assert (run / path).is_file(), path
    assert json.loads((out / "compare.json").read_text())["ce+mse"] == results["ce+mse"]
    table = (out / "compare.txt").read_text()
    assert "unilevel+calibrated" in table and "ce+mse overall" in table


def test_compare_rerun_repeats_nothing(quick_compare, monkeypatch):
    out, first = quick_compare
    monkeypatch.setattr(bench_fidelity, "train_and_evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    monkeypatch.setattr(Recovery, "step", lambda self: pytest.fail("a finished recovery ran again"))
    teacher = out / "digits-if10" / "experts_debiased" / "teacher.pt"
    stamp = teacher.stat().st_mtime_ns
    again = Comparison(make_compare_plan("digits", [10], [10], out, quick=True), progress=False).run()
    for protocol in ("soft-ce", "ce+mse"):
        for name, by_factor in first[protocol].items():
            assert again[protocol][name]["10"]["10"]["overall"] == by_factor["10"]["10"]["overall"]
    assert teacher.stat().st_mtime_ns == stamp  # the finished experts were not trained again


def test_compare_refuses_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match="protocols must be among"):
        make_compare_plan("digits", [10], [10], tmp_path, protocols=("mse",))
    with pytest.raises(ConfigError, match="no preset fashion-mnist-lt-if10-ipc1-unilevel"):
        make_compare_plan("fashion-mnist", [10], [1], tmp_path)
    assert main(["bench", "compare", "--dataset", "digits", "--imbalance-factors", "10", "--ipc", "3", "--out",
                 str(tmp_path / "o"), "--quick"]) == 2
    assert "no preset digits-lt-if10-ipc3" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
