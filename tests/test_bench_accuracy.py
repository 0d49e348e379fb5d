"""`ltdd bench accuracy`: trajectories stored in another dtype, variants, paired runs, resuming."""
import json

import numpy as np
import pytest
import torch
import yaml

from ltdd_fast.bench import accuracy as ba
from ltdd_fast.errors import ConfigError, TrajectoryError
from ltdd_fast.experts import ExpertConfig, train_experts
from ltdd_fast.synset import load_synset
from ltdd_fast.trajectories import TrajectoryStore, convert_store


@pytest.fixture(scope="module")
def stage1(digits, tmp_path_factory):
    return train_experts(digits, ExpertConfig(stage=1, num_experts=2, width=8, batch_size=64, epochs=3),
                         tmp_path_factory.mktemp("stage1"), progress=False)


@pytest.fixture(scope="module")
def stage2(digits, stage1, tmp_path_factory):
    return train_experts(digits, ExpertConfig(stage=2, num_experts=2, width=8, batch_size=64, epochs=2),
                         tmp_path_factory.mktemp("stage2"), source_dir=stage1.root, progress=False)


@pytest.fixture
def config_file(stage1, stage2, tmp_path):
    settings = dict(dataset="digits", imbalance_factor=50, width=8, ipc=2, experts=str(stage1.root),
                    experts_stage2=str(stage2.root), iterations=2, syn_steps=2, syn_steps_classifier=2,
                    batch_syn=10, max_start_epoch=2, expert_epochs=1, checkpoint_every=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


# ---- trajectories in another dtype ----

def test_converted_store_holds_the_rounded_snapshots(stage1, tmp_path):
    half = convert_store(stage1.root, tmp_path / "half", "float16")
    assert half.manifest["dtype"] == "float16" and half.manifest["converted_from"] == str(stage1.root.resolve())
    assert half.completed() == stage1.completed()
    for i in stage1.completed():
        assert half.trajectory(i).dtype == np.float16
        for epoch in range(stage1.num_snapshots):
            want = stage1.snapshot(i, epoch).to(torch.float16).to(torch.float32)
            assert torch.equal(half.snapshot(i, epoch), want)
    # half precision really rounds: the copy is not the source
    assert not torch.equal(half.snapshot(0, 1), stage1.snapshot(0, 1))


def test_interrupted_conversion_continues_and_keeps_what_is_done(stage1, tmp_path):
    half = convert_store(stage1.root, tmp_path / "half", "float16")
    kept = (half.root / "expert_00000.npy").stat().st_mtime_ns
    (half.root / "expert_00001.npy").unlink()
    again = convert_store(stage1.root, tmp_path / "half", "float16")
    assert again.completed() == [0, 1]
    assert (half.root / "expert_00000.npy").stat().st_mtime_ns == kept
    assert torch.equal(again.snapshot(1, 2), stage1.snapshot(1, 2).half().float())


def test_conversion_refuses_a_directory_of_other_trajectories(stage1, stage2, tmp_path):
    convert_store(stage1.root, tmp_path / "half", "float16")
    with pytest.raises(TrajectoryError, match="already holds other trajectories"):
        convert_store(stage2.root, tmp_path / "half", "float16")
    with pytest.raises(TrajectoryError, match="unknown trajectory dtype 'int8'"):
        convert_store(stage1.root, tmp_path / "other", "int8")


# ---- variants ----

def test_variant_names_and_custom_variants():
    assert ba.parse_variant("bf16").overrides == ["precision=bf16"]
    assert ba.parse_variant("fp16-trajectories").trajectories == "float16"
    v = ba.parse_variant("mine:second_pass=fd, precision=bf16,trajectories=float16")
    assert (v.name, v.overrides, v.trajectories) == ("mine", ["second_pass=fd", "precision=bf16"], "float16")
    with pytest.raises(ConfigError, match="unknown variant 'bf32'.*full, bf16"):
        ba.parse_variant("bf32")
    with pytest.raises(ConfigError, match="trajectories must be one of float32, float16"):
        ba.parse_variant("x:trajectories=int8")
    with pytest.raises(ConfigError, match="must look like key=value"):
        ba.parse_variant("x:precision")


@pytest.mark.parametrize("variants, needle", [
    (["full", "x:seed=3"], "sets seed, which every variant shares"),
    (["full", "x:imbalance_factor=10"], "sets imbalance_factor, which every variant shares"),
    (["full", "full"], "variant names must differ"),
    (["full", "x:precision=fp8"], "precision must be one of"),
    (["full", "x:lr_imgs=1"], "did you mean 'lr_img'"),
])
def test_bad_variants_are_refused_before_anything_runs(config_file, tmp_path, variants, needle):
    with pytest.raises(ConfigError, match=needle):
        ba.bench_accuracy(config_file, variants=variants, seeds=[0], eval_epochs=1, eval_runs=1, out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


# ---- the bench ----

def test_runs_are_paired_by_seed_and_a_variant_changes_its_set(config_file, tmp_path):
    said = []
    out = tmp_path / "bench"
    result = ba.bench_accuracy(config_file, variants=["full", "same:second_pass=exact", "fp16-trajectories", "bf16"],
                               seeds=[0, 1], eval_epochs=2, eval_runs=1, out=out, say=said.append)
    rows = result["variants"]
    assert list(rows) == ["full", "same", "fp16-trajectories", "bf16"] and result["baseline"] == "full"
    # the same settings at the same seed give the same set and the same evaluation: a zero paired change
    assert rows["same"]["delta_mean"] == 0 and rows["same"]["delta_std"] == 0
    for seed in (0, 1):
        a, b = (load_synset(out / name / f"seed{seed}" / "synset.pt") for name in ("full", "same"))
        assert torch.equal(a["images"], b["images"])
    # the seeds differ from each other, and bf16 / rounded experts change what is distilled
    full0, full1 = (load_synset(out / "full" / f"seed{s}" / "synset.pt")["images"] for s in (0, 1))
    assert not torch.equal(full0, full1)
    for name in ("fp16-trajectories", "bf16"):
        assert not torch.equal(load_synset(out / name / "seed0" / "synset.pt")["images"], full0)
    # the fp16 variant distilled from a float16 copy of both stages
    assert rows["fp16-trajectories"]["trajectories"] == "float16" and rows["full"]["trajectories"] == "float32"
    for stage in ("stage1", "stage2"):
        assert TrajectoryStore(out / "trajectories-float16" / stage).manifest["dtype"] == "float16"
    # the change is the mean of the per-seed differences
    for name, row in rows.items():
        deltas = [r["overall"] - b["overall"] for r, b in zip(row["runs"], rows["full"]["runs"])]
        assert row["delta_mean"] == pytest.approx(sum(deltas) / 2)
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        assert all(0 <= r["overall"] <= 1 and r["distill_seconds"] > 0 for r in row["runs"])
    table = ba.format_accuracy(result)
    for name in rows:
        assert name in table
    assert sum("evaluating" in s for s in said) == 8


def test_a_rerun_continues_and_reevaluates_only_a_changed_set(config_file, tmp_path):
    out = tmp_path / "bench"
    kwargs = dict(variants=["full", "fd"], seeds=[0], eval_epochs=2, eval_runs=1, out=out)
    first = ba.bench_accuracy(config_file, **kwargs)
    said = []
    again = ba.bench_accuracy(config_file, say=said.append, **kwargs)
    assert said == [] and again == first
    # more iterations: each run continues from its checkpoint and its set is evaluated again
    longer = ba.bench_accuracy(config_file, ["iterations=3"], say=said.append, **kwargs)
    assert said == [f"{v} seed 0: {what}" for v in ("full", "fd")
                    for what in ("distilling from iteration 2 of 3", "evaluating (1 run(s) of 2 epochs)")]
    assert len(json.loads((out / "full" / "seed0" / "history.json").read_text())) == 3
    assert longer["config"]["iterations"] == 3
