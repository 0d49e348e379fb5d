"""The `ltdd` command as a user runs it: subcommands, the experts -> eval pipeline, one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltdd_fast.data import load_dataset
from ltdd_fast.evaluate import random_real
from ltdd_fast.synset import save_synset

LTDD = [str(Path(sys.executable).parent / "ltdd")]
FAST_EVAL = ["--epochs", "5", "--num-runs", "2", "--quiet"]


def ltdd(*args, cwd=None):
    return subprocess.run(LTDD + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_subcommands():
    result = ltdd("--help")
    assert result.returncode == 0
    for command in ("experts", "eval", "demo"):
        assert command in result.stdout


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    one = ltdd("experts", "--dataset", "digits", "--imbalance-factor", 50, "--stage", 1, "--num-experts", 2,
               "--epochs", 2, "--width", 16, "--out", root / "e1", "--quiet")
    assert one.returncode == 0, one.stderr
    two = ltdd("experts", "--stage", 2, "--from", root / "e1", "--num-experts", 2, "--epochs", 1,
               "--out", root / "e2", "--quiet")
    assert two.returncode == 0, two.stderr
    return root


def test_experts_pipeline(experts):
    m1 = json.loads((experts / "e1" / "manifest.json").read_text())
    m2 = json.loads((experts / "e2" / "manifest.json").read_text())
    assert m1["stage"] == 1 and m1["num_experts"] == 2 and m1["epochs"] == 2 and m1["width"] == 16
    # stage 2 took the data set, model and width from the stage-1 manifest
    assert m2["stage"] == 2 and m2["dataset"] == "digits" and m2["imbalance_factor"] == 50.0
    assert m2["width"] == 16 and m2["num_params"] == m1["num_params"]
    assert sorted(p.name for p in (experts / "e2").glob("expert_*.npy")) == ["expert_00000.npy", "expert_00001.npy"]


def test_eval_random_baseline_json(tmp_path):
    out = tmp_path / "r.json"
    result = ltdd("eval", "--dataset", "digits", "--imbalance-factor", 50, "--random-ipc", 10, "--json", out,
                  "--width", 32, *FAST_EVAL)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    for key in ("overall_mean", "overall_std", "per_class", "many", "medium", "few"):
        assert key in report
    assert len(report["per_class"]) == 10 and len(report["run_accuracies"]) == 2
    assert 0.1 < report["overall_mean"] <= 1.0


def test_eval_synset_roundtrip_and_mismatch(tmp_path):
    dataset = load_dataset("digits", imbalance_factor=50, seed=0)
    images, labels = random_real(dataset, 5, seed=1)
    soft = torch.nn.functional.one_hot(labels, 10).float() * 5
    path = save_synset(tmp_path / "s.pt", images, soft, 0.02, dataset, method="test")
    out = tmp_path / "s.json"
    result = ltdd("eval", "--synset", path, "--json", out, *FAST_EVAL)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["overall_mean"] > 0.1
    # the set was made for 8x8 images: evaluating it on resized data is refused
    assert_one_line_error(ltdd("eval", "--synset", path, "--resolution", 16, *FAST_EVAL), "image size")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert_one_line_error(ltdd("eval", "--synset", tmp_path / "junk.pt", *FAST_EVAL), "not a readable synthetic-set")


@pytest.mark.parametrize("args, needles", [
    (["experts", "--dataset", "cifar10", "--data-dir", "/nonexistent", "--out", "x"], ["/nonexistent"]),
    (["experts", "--dataset", "digits", "--imbalance-factor", 0.5, "--out", "x"], ["imbalance"]),
    (["experts", "--dataset", "kmnist", "--out", "x"], ["kmnist"]),
    (["experts", "--dataset", "fashion-mnist", "--data-dir", ".", "--out", "x"],
     ["train-images-idx3-ubyte[.gz] not found", "dataset-fashion-mnist"]),
    (["eval", "--dataset", "digits", "--random-ipc", 2, "--width", 0], ["--width", "at least 1"]),
    (["experts", "--dataset", "digits", "--model", "mlp", "--out", "x"], ["mlp"]),
    (["experts", "--stage", 2, "--out", "x"], ["--from"]),
    (["eval", "--dataset", "digits", "--random-ipc", 0], ["--random-ipc"]),
    (["eval", "--dataset", "digits"], ["one of the arguments"]),
    (["eval", "--dataset", "digits", "--synset", "/nonexistent.pt"], ["/nonexistent.pt"]),
    (["experts", "--stage", 2, "--from", "/nonexistent", "--out", "x"], ["/nonexistent"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_bad_input_is_one_line_exit_2(args, needles, tmp_path):
    assert_one_line_error(ltdd(*args, cwd=tmp_path), *needles)
    assert not (tmp_path / "x").exists()


def test_truncated_trajectory_is_refused_and_kept(experts, tmp_path):
    copy = tmp_path / "e1"
    copy.mkdir()
    for f in (experts / "e1").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    broken = copy / "expert_00001.npy"
    broken.write_bytes(broken.read_bytes()[:200])
    result = ltdd("experts", "--stage", 2, "--from", copy, "--num-experts", 2, "--epochs", 1, "--out",
                  tmp_path / "e2", "--quiet")
    assert_one_line_error(result, "expert_00001.npy", "truncated")
    # expert 0 was finished before the broken file was reached, and stays
    assert (tmp_path / "e2" / "expert_00000.npy").is_file()


def test_demo_quick_writes_the_table(tmp_path):
    out = tmp_path / "demo.json"
    result = ltdd("demo", "--quick", "--quiet", "--out", tmp_path / "demo", "--json", out)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    for method in ("random", "whole"):
        assert set(results[method]) == {"10", "50"}
        for row in results[method].values():
            assert set(row) == {"overall", "many", "medium", "few"}
            assert 0 <= row["overall"] <= 1
    assert "random" in result.stdout and (tmp_path / "demo" / "table.txt").is_file()


def test_bench_ops_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    result = ltdd("bench", "ops", "--device", "cpu", "--backend", "native", "--quick", "--repeats", "1",
                  "--json", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == {"student_sgd_step", "param_distance", "soft_ce_stats", "class_grad_stats",
                                       "scatter_add_rows_", "dsa", "class_feature_stats"}
    for r in rows:
        assert set(r) >= {"op", "size", "reference_s", "fast_s", "speedup"}
        assert r["fast_s"] > 0 and r["speedup"] == pytest.approx(r["reference_s"] / r["fast_s"])
    assert_one_line_error(ltdd("bench", "ops", "--backend", "native", "--op", "norm_relu_pool"),
                          "the native backend has")


def test_bench_ops_triton_quick_json(tmp_path):
    """The Triton rows on a CPU run in Triton's interpreter (on a GPU, on it): each op is checked against its
    reference."""
    pytest.importorskip("triton")
    kernels = pytest.importorskip("ltdd_fast.kernels")
    if not kernels.AVAILABLE:
        pytest.skip(f"Triton unavailable: {kernels.IMPORT_ERROR}")
    device = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"
    out = tmp_path / "bench.json"
    result = ltdd("bench", "ops", "--device", device, "--backend", "triton", "--quick", "--json", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == {"student_sgd_step", "param_distance", "soft_ce_stats", "class_grad_stats",
                                       "norm_relu_pool", "dsa", "class_feature_stats"}
    interpreted = device == "cpu"  # on a GPU the rows are timed on it and say nothing of an interpreter
    for r in rows:
        assert set(r) >= {"op", "size", "reference_s", "fast_s", "speedup"}
        assert r.get("interpreted", False) is interpreted
    assert ("interpreter" in result.stdout) is interpreted


def test_bench_e2e_and_memory_quick_json(tmp_path):
    """Both commands on a narrow ConvNet-3 at CIFAR shapes: the keys the issue names, gradients checked."""
    out = tmp_path / "e2e.json"
    result = ltdd("bench", "e2e", "--preset", "cifar10-lt-ipc10", "--quick", "--set", "width=16",
                  "--iterations", "1", "--students", "2", "--chunk", "5", "--profile", "5", "--cudnn-benchmark",
                  "--json", out)
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())
    # --profile: the 5 operators with the most self time in one fast iteration, costliest first
    prof = row["profile"]
    assert len(prof) == 5 and row["profile_time"] == "cpu" and "costliest operators" in result.stdout
    assert all(p["calls"] >= 1 and p["self_ms"] > 0 and p["name"] in result.stdout for p in prof)
    assert [p["self_ms"] for p in prof] == sorted((p["self_ms"] for p in prof), reverse=True)
    assert 0 < sum(p["share"] for p in prof) <= 1 + 1e-9
    assert set(row) >= {"reference_it_s", "fast_it_s", "speedup", "reference_peak_bytes", "fast_peak_bytes",
                        "grad_cosine"}
    assert row["grad_cosine"] > 0.9999 and row["students"] == 2 and row["chunk"] == 5
    assert row["compile"] is None and row["fast_first_iteration_s"] > 0 and row["cudnn_benchmark"] is True
    assert "cuDNN benchmark" in result.stdout
    assert row["speedup"] == pytest.approx(row["fast_it_s"] / row["reference_it_s"])
    assert "speedup" in result.stdout
    out = tmp_path / "memory.json"
    result = ltdd("bench", "memory", "--preset", "cifar10-lt-ipc10", "--quick", "--set", "width=16",
                  "--syn-steps", "3", "6", "--json", out)
    assert result.returncode == 0, result.stderr
    mem = json.loads(out.read_text())
    for path in ("fast", "reference"):
        assert set(mem[path]) == {"3", "6"} and all(v > 0 for v in mem[path].values())
        assert set(mem["tensor_peak"][path]) == {"3", "6"}
    # the reference keeps every theta_k: its tensor peak grows with syn_steps, the fast path's does not (from 3
    # steps on: at 2 the re-walk runs only once, so one vector fewer is ever alive)
    assert mem["tensor_peak"]["reference"]["6"] > mem["tensor_peak"]["reference"]["3"]
    assert mem["tensor_peak"]["fast"]["6"] <= 1.01 * mem["tensor_peak"]["fast"]["3"]
    assert_one_line_error(ltdd("bench", "e2e", "--preset", "mnist-lt"), "no bench preset 'mnist-lt'")
    assert_one_line_error(ltdd("bench", "e2e", "--preset", "cifar10-lt-ipc10", "--profile", "-1"),
                          "--profile", "at least 0")
    assert_one_line_error(ltdd("bench", "e2e", "--preset", "cifar10-lt-ipc10", "--second-pass", "twice"),
                          "--second-pass must be one of")
    assert_one_line_error(ltdd("bench", "e2e", "--preset", "cifar10-lt-ipc10", "--compile", "fast"),
                          "--compile must be one of none, default, reduce-overhead, max-autotune")


def test_bench_accuracy_quick_json(experts, tmp_path):
    """Two variants, one seed, from the module's experts: the table, the JSON, and a bad variant's one line."""
    settings = [f"experts={experts / 'e1'}", f"experts_stage2={experts / 'e2'}", "width=16", "iterations=1",
                "syn_steps=2", "syn_steps_classifier=2", "batch_syn=10", "max_start_epoch=1", "expert_epochs=1",
                "ipc=2"]
    out = tmp_path / "accuracy.json"
    result = ltdd("bench", "accuracy", "--config", "digits-lt-if50-ipc10", *settings, "--variant", "full",
                  "--variant", "fp16-trajectories", "--seeds", 0, "--eval-epochs", 2, "--eval-runs", 1,
                  "--out", tmp_path / "runs", "--json", out, "--quiet")
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())
    assert row["baseline"] == "full" and set(row["variants"]) == {"full", "fp16-trajectories"}
    assert row["variants"]["fp16-trajectories"]["trajectories"] == "float16"
    assert all(name in result.stdout for name in row["variants"]) and "paired with full" in result.stdout
    assert_one_line_error(ltdd("bench", "accuracy", "--config", "digits-lt-if50-ipc10", *settings,
                               "--variant", "half", "--out", tmp_path / "bad"), "unknown variant 'half'")
    assert not (tmp_path / "bad").exists()


def test_bench_accuracy_help_names_every_variant():
    from ltdd_fast.bench.accuracy import DEFAULT_VARIANTS, VARIANTS

    help_text = " ".join(ltdd("bench", "accuracy", "--help").stdout.split())
    for name in VARIANTS:
        assert name in help_text
    assert f"default: {' '.join(DEFAULT_VARIANTS)}" in help_text
