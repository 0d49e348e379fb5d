"""Safe to run, safe to share (files.py): readers that never run code, locks, atomic and disk-full-safe
writes, crash windows of the expert writer, resume, and settings refused before any work."""
import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ltdd_fast.cli import main
from ltdd_fast.config import load_config
from ltdd_fast.distill import DistillConfig, Distiller
from ltdd_fast.errors import ConfigError, LTDDError, TrajectoryError
from ltdd_fast.experts import ExpertConfig, train_experts
from ltdd_fast.files import (
    DiskFullError, RunLock, read_json, read_log, save_torch_atomic, write_atomic, write_json_atomic,
)
from ltdd_fast.synset import load_synset
from ltdd_fast.trajectories import TrajectoryStore, TrajectoryWriter

LTDD = str(Path(sys.executable).with_name("ltdd"))


class RunsCode:
    """Unpickling this calls a function: what a crafted file would use to run a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def stage1(digits, tmp_path_factory):
    return train_experts(digits, ExpertConfig(stage=1, num_experts=2, width=8, batch_size=64, epochs=3),
                         tmp_path_factory.mktemp("stage1"), progress=False)


def _config(stage1, out, **overrides):
    settings = dict(dataset="digits", imbalance_factor=50, width=8, ipc=2, method="plain_tm",
                    experts=str(stage1.root), iterations=3, syn_steps=2, batch_syn=10, max_start_epoch=2,
                    expert_epochs=1, checkpoint_every=0, eval_every=0, out=str(out))
    settings.update(overrides)
    return DistillConfig(**settings)


def _one_line(exc):
    text = str(exc)
    assert "\n" not in text and text, text
    return text


# ---- 1. no file runs code; a malformed file is one line --------------------------------------------------

def _torch_file_with_code(path, marker):
    torch.save({"format": "ltdd-synset/1", "images": torch.zeros(1), "payload": RunsCode(marker)}, path)


READERS = {
    "synset": lambda p: load_synset(p),
    "checkpoint": None,  # needs the experts: see test_every_reader_refuses_crafted_and_malformed_files
    "manifest": lambda p: TrajectoryStore(p.parent),
    "yaml config": lambda p: load_config(str(p)),
    "json record": lambda p: read_json(p, "stored result"),
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("content", ["code", "garbage", "empty", "not-utf8", "wrong-type"])
def test_every_reader_refuses_crafted_and_malformed_files(reader, content, tmp_path, digits, stage1):
    marker = tmp_path / "ran"
    names = {"synset": "synset.pt", "checkpoint": "checkpoint.pt", "manifest": "manifest.json",
             "yaml config": "config.yaml", "json record": "record.json"}
    path = tmp_path / "run" / names[reader]
    path.parent.mkdir()
    torch_file = reader in ("synset", "checkpoint")
    if content == "code":
        if torch_file:
            _torch_file_with_code(path, marker)
        elif reader == "yaml config":
            path.write_text(f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
                            f"['{marker}']]\n")
        else:  # JSON cannot carry code; a pickle in its place is only bytes to the reader
            path.write_bytes(pickle.dumps(RunsCode(str(marker))))
    elif content == "garbage":
        path.write_bytes(b"\x00\x01 not what it should be {[")
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "not-utf8":
        path.write_bytes(b"\xff\xfe\xfa ipc: 3\n")
    else:
        if torch_file:
            torch.save([1, 2, 3], path)
        else:
            path.write_text("[1, 2, 3]\n")
    if reader == "checkpoint":
        def read(p):
            return Distiller(_config(stage1, p.parent), dataset=digits, progress=False)
    else:
        read = READERS[reader]
    with pytest.raises(LTDDError) as err:
        read(path)
    assert not marker.exists()
    message = _one_line(err.value)
    assert path.name in message or str(path.parent) in message, message
    assert "Traceback" not in message


def test_trajectory_array_with_pickled_objects_is_refused(stage1, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    manifest = dict(stage1.manifest)
    manifest["experts"] = {}
    write_json_atomic(run / "manifest.json", manifest)
    marker = tmp_path / "ran"
    np.save(run / "expert_00000.npy", np.array([RunsCode(str(marker))], dtype=object), allow_pickle=True)
    store = TrajectoryStore(run)
    with pytest.raises(TrajectoryError, match="expert_00000.npy is truncated or corrupt") as err:
        store.snapshot(0, 0)
    assert not marker.exists()
    _one_line(err.value)


@pytest.mark.parametrize("key, value, match", [
    ("epochs", "3", "epochs is '3', expected a positive integer"),
    ("width", None, "width is None, expected a positive integer"),
    ("num_experts", None, "num_experts is None, expected a positive integer"),
    ("experts", [], "experts is \\[\\], expected a JSON object"),
    ("dtype", "int8", "dtype 'int8'"),
])
def test_manifest_fields_of_the_wrong_type(stage1, tmp_path, key, value, match):
    run = tmp_path / "run"
    run.mkdir()
    manifest = dict(stage1.manifest)
    if value is None:
        manifest.pop(key)
    else:
        manifest[key] = value
    write_json_atomic(run / "manifest.json", manifest)
    with pytest.raises(TrajectoryError, match=match) as err:
        TrajectoryStore(run)
    _one_line(err.value)


def test_checkpoint_lacking_keys_is_one_line(digits, stage1, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"iteration": 3, "images": torch.zeros(1)}, out / "checkpoint.pt")
    with pytest.raises(LTDDError, match="not a complete distillation checkpoint: it lacks labels") as err:
        Distiller(_config(stage1, out), dataset=digits, progress=False)
    _one_line(err.value)


# ---- 3, 4. settings refused before the first expensive step ---------------------------------------------

@pytest.mark.parametrize("override, match", [
    (dict(lr_teacher=-1.0), "lr_teacher must be positive"),
    (dict(lr_img=float("nan")), "lr_img must be a finite number"),
    (dict(lambda_backbone=float("inf")), "lambda_backbone must be a finite number"),
    (dict(eval_epochs=0), "eval_epochs must be at least 1"),
    (dict(eval_runs=0), "eval_runs must be at least 1"),
    (dict(momentum_img=1.5), "momentum_img must be at most 1"),
    (dict(device="foo"), "'foo' is not a device"),
    (dict(log="wandb"), "log must be null or one of tensorboard"),
])
def test_distill_settings_refused_by_validate(stage1, tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        _config(stage1, tmp_path / "out", **override).validate()


def test_ipc_larger_than_the_largest_class_is_refused(digits, stage1, tmp_path):
    with pytest.raises(ConfigError, match="ipc 100000 exceeds the largest class of digits"):
        Distiller(_config(stage1, tmp_path / "out", ipc=100000), dataset=digits, progress=False)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


@pytest.mark.parametrize("override, match", [
    (dict(width=0), "width must be at least 1"), (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(momentum=-0.1), "momentum must be non-negative"), (dict(device="cuda:7x"), "is not a device"),
])
def test_expert_settings_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        ExpertConfig(**override)


def test_a_huge_expert_is_refused_before_allocating(digits, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="lower --width"):
        train_experts(digits, ExpertConfig(width=100000, epochs=1, num_experts=1), tmp_path / "e", progress=False)
    assert time.perf_counter() - start < 5
    assert not list((tmp_path).glob("e/expert_*"))


# ---- 5. the expert writer's crash windows, damaged experts, resume -----------------------------------------

class Killed(BaseException):
    """Stands for SIGKILL at a chosen moment (BaseException: nothing catches it on the way out)."""


def test_kill_between_manifest_record_and_rename(digits, tmp_path, monkeypatch):
    """The record is written before the file is renamed complete: a kill between them leaves a partial expert
    that the rerun trains again, and every complete expert keeps its record."""
    out = tmp_path / "e"
    config = ExpertConfig(num_experts=2, width=8, batch_size=64, epochs=1)
    original = TrajectoryWriter.finish
    seen = []

    def finish_then_die_before_rename(self, commit=None):
        def commit_and_check(digest):
            assert not self.final.exists()  # not yet visible as complete when its record is written
            commit(digest)
            seen.append(self.final)
            if len(seen) == 1:
                raise Killed
        return original(self, commit_and_check)

    monkeypatch.setattr(TrajectoryWriter, "finish", finish_then_die_before_rename)
    with pytest.raises(Killed):
        train_experts(digits, config, out, progress=False)
    assert TrajectoryStore(out).completed() == []
    monkeypatch.setattr(TrajectoryWriter, "finish", original)
    store = train_experts(digits, config, out, progress=False)
    assert store.completed() == [0, 1]
    for i in ("0", "1"):
        assert set(store.manifest["experts"][i]) >= {"test_acc", "train_loss", "sha256"}
    # the log has each epoch of each complete expert once: the killed attempt's records went
    epochs = [(r["expert"], r["epoch"]) for r in read_log(out / "metrics.jsonl") if "train_loss" in r]
    assert epochs == [(0, 1), (1, 1)]
    result = subprocess.run([LTDD, "experts", "--dataset", "digits", "--imbalance-factor", "50", "--num-experts", "2",
                             "--width", "8", "--batch-size", "64", "--epochs", "1", "--out", str(out), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "2 stage-1 experts" in result.stdout and "mean test accuracy" in result.stdout


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "nan"])
def test_a_damaged_complete_expert_is_found_on_rerun(digits, tmp_path, damage):
    out = tmp_path / "e"
    config = ExpertConfig(num_experts=1, width=8, batch_size=64, epochs=1)
    train_experts(digits, config, out, progress=False)
    path = out / "expert_00000.npy"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "bitflip":
        data[-5] ^= 0x10
    else:
        array = np.load(path)
        array[:] = np.nan
        np.save(path, array)
        data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data))
    with pytest.raises(TrajectoryError, match="expert_00000.npy is (truncated|damaged)") as err:
        train_experts(digits, config, out, progress=False)
    _one_line(err.value)


def test_nan_trajectory_without_a_checksum_is_refused_when_read(stage1, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    manifest = dict(stage1.manifest, experts={})
    write_json_atomic(run / "manifest.json", manifest)
    array = np.full((manifest["epochs"] + 1, manifest["num_params"]), np.nan, np.float32)
    np.save(run / "expert_00000.npy", array)
    with pytest.raises(TrajectoryError, match="non-finite values at epoch 0"):
        TrajectoryStore(run).snapshot(0, 0)


def test_resume_with_the_out_directory_given_relative(digits, stage1, tmp_path, monkeypatch):
    out = tmp_path / "out"
    Distiller(_config(stage1, out.resolve(), checkpoint_every=1), dataset=digits, progress=False).run(stop_after=2)
    monkeypatch.chdir(tmp_path)
    resumed = Distiller(_config(stage1, "out", checkpoint_every=1), dataset=digits, progress=False)
    assert resumed.iteration == 2


def test_metrics_log_survives_a_kill_and_resume_has_no_duplicates(digits, stage1, tmp_path):
    out = tmp_path / "out"
    config = _config(stage1, out, iterations=5, checkpoint_every=2)
    Distiller(config, dataset=digits, progress=False).run(stop_after=3)  # checkpoint at 2, logged 1..3
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "cut by a ki')  # a kill in the middle of a line
    Distiller(config, dataset=digits, progress=False).run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5]
    assert {"alpha", "class_grad_norm", "seconds"} <= set(records[-1])
    assert any(key.startswith("loss_") for key in records[-1])
    history = read_json(out / "history.json", kind=list)
    assert [r["iteration"] for r in history] == [1, 2, 3, 4, 5]
    assert main(["plot", str(out), "--png", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 5000


def test_plot_of_an_expert_log_and_of_nothing(digits, stage1, tmp_path, capsys):
    assert main(["plot", str(stage1.root)]) == 0
    assert "experts curves" in capsys.readouterr().out and (stage1.root / "metrics.png").is_file()
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "metrics.jsonl not found" in err


def test_stage2_reuses_the_recorded_data_dir(tmp_path):
    from test_idx import write_idx_set

    data = tmp_path / "fm"
    write_idx_set(data, n_per_class=(20, 3))
    s1 = tmp_path / "s1"
    common = ["--num-experts", "1", "--width", "4", "--batch-size", "64", "--quiet"]
    first = subprocess.run([LTDD, "experts", "--dataset", "fashion-mnist", "--data-dir", str(data),
                            "--imbalance-factor", "5", "--epochs", "1", "--out", str(s1), *common],
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert read_json(s1 / "manifest.json")["data_dir"] == str(data.resolve())
    second = subprocess.run([LTDD, "experts", "--stage", "2", "--from", str(s1), "--epochs", "1",
                             "--out", str(tmp_path / "s2"), *common], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    data.rename(tmp_path / "moved")
    third = subprocess.run([LTDD, "experts", "--stage", "2", "--from", str(s1), "--epochs", "1",
                            "--out", str(tmp_path / "s3"), *common], capture_output=True, text=True)
    assert third.returncode == 2 and len(third.stderr.strip().splitlines()) == 1, third.stderr
    assert str(data.resolve()) in third.stderr and "manifest.json" in third.stderr and "--data-dir" in third.stderr


# ---- 6. locking --------------------------------------------------------------------------------------------

def _hold(directory):
    """A child process that takes the run lock on directory and waits."""
    code = ("import sys, time; from ltdd_fast.files import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_held_directory_is_refused_and_a_killed_holder_releases_it(tmp_path):
    child = _hold(tmp_path / "run")
    try:
        with pytest.raises(LTDDError, match=f"in use by process {child.pid}") as err:
            RunLock(tmp_path / "run").acquire()
        _one_line(err.value)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with RunLock(tmp_path / "run"):  # no clean-up needed after a kill
        pass


def test_second_distill_and_experts_on_a_held_directory_are_refused_at_once(stage1, tmp_path):
    out = tmp_path / "out"
    child = _hold(out)
    try:
        start = time.perf_counter()
        distill = subprocess.run([LTDD, "distill", "--config", "digits-lt-if50-ipc10", f"experts={stage1.root}",
                                  f"out={out}", "method=plain_tm", "--quiet"], capture_output=True, text=True)
        experts = subprocess.run([LTDD, "experts", "--dataset", "digits", "--out", str(out), "--quiet"],
                                 capture_output=True, text=True)
        for result in (distill, experts):
            assert result.returncode == 2, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert f"in use by process {child.pid}" in result.stderr
        assert time.perf_counter() - start < 60
        assert not (out / "checkpoint.pt").exists() and not (out / "manifest.json").exists()
    finally:
        child.kill()
        child.wait()


# ---- 7. atomic writes and a full disk -----------------------------------------------------------------------

def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    write_json_atomic(path, {"a": 1})

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(DiskFullError, match="disk full writing .*record.json") as err:
        write_atomic(path, fail)
    _one_line(err.value)
    assert read_json(path) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (skipped where this process may not mount one)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()[:100]}")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_disk_full_on_a_small_tmpfs(small_disk, digits):
    path = small_disk / "record.json"
    write_json_atomic(path, {"kept": True})
    with pytest.raises(DiskFullError, match="disk full writing"):
        save_torch_atomic(small_disk / "big.pt", {"x": torch.zeros(1 << 20)})  # 4 MB
    with pytest.raises(DiskFullError, match="disk full writing"):
        write_json_atomic(path, {"x": list(range(1 << 19))})
    assert read_json(path) == {"kept": True}
    with pytest.raises(DiskFullError, match="expert_00000.partial.npy"):
        TrajectoryWriter(small_disk, 0, 10, 100_000, "float32")  # 4 MB, allocated before it is mapped
    assert sorted(p.name for p in small_disk.iterdir()) == ["record.json"]
    result = subprocess.run([LTDD, "experts", "--dataset", "digits", "--epochs", "2", "--num-experts", "1",
                             "--width", "256", "--out", str(small_disk / "e"), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "free" in result.stderr and "Traceback" not in result.stderr


# ---- 2. command-line input answered before work ------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["experts", "--dataset", "digits", "--out", "FILE"], "--out FILE cannot be a directory"),
    (["eval", "--dataset", "digits", "--random-ipc", "1", "--json", "DIR"], "is a directory"),
    (["eval", "--dataset", "digits", "--random-ipc", "1", "--json", "FILE/x.json"], "which is a file"),
    (["groups", "--dataset", "digits", "--random-ipc", "1", "--png", "x.xyz"], "expected one of .png"),
    (["experts", "--dataset", "digits", "--out", "o", "--device", "cuda:0"], "--device"),
    (["experts", "--dataset", "digits", "--out", "o", "--width", "0"], "--width"),
    (["bench", "ops", "--repeats", "-1"], "--repeats"),
    (["eval", "--dataset", "digits", "--random-ipc", "1", "--weight-decay", "nan"], "--weight-decay"),
    (["demo", "--out", "FILE"], "cannot be a directory"),
])
def test_command_line_mistakes_are_one_line_before_any_work(args, needle, tmp_path):
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "DIR").mkdir()
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    start = time.perf_counter()
    result = subprocess.run([LTDD, *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle.replace("\\", "") in lines[0], result.stderr
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("batch, match", [
    ({b"labels": ["cat"] * 20}, "'labels' must be a list of integer class indices"),
    ({b"labels": [], b"data": np.zeros((0, 3072), np.uint8)}, "holds no images"),
])
def test_cifar_batches_with_string_labels_or_no_images(tmp_path, batch, match):
    from test_data import _dump, write_cifar10

    from ltdd_fast.data import read_cifar

    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    _dump(path, {b"data": np.zeros((20, 3072), np.uint8), **batch})
    with pytest.raises(LTDDError, match=match) as err:
        read_cifar(str(tmp_path), 10)
    _one_line(err.value)


def test_tensorboard_log_or_a_one_line_refusal(digits, stage1, tmp_path):
    import importlib.util

    config = _config(stage1, tmp_path / "out", log="tensorboard", iterations=2)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="log=tensorboard needs the tensorboard package"):
            Distiller(config, dataset=digits, progress=False)
        return
    Distiller(config, dataset=digits, progress=False).run()
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_damaged_expert_is_found_when_the_distiller_opens_the_store(digits, tmp_path):
    experts = tmp_path / "e"
    train_experts(digits, ExpertConfig(num_experts=2, width=8, batch_size=64, epochs=3), experts, progress=False)
    path = experts / "expert_00001.npy"
    path.write_bytes(path.read_bytes()[:-100])
    start = time.perf_counter()
    with pytest.raises(TrajectoryError, match="expert_00001.npy is truncated"):
        Distiller(_config(TrajectoryStore(experts), tmp_path / "out"), dataset=digits, progress=False)
    assert time.perf_counter() - start < 10


def test_memory_budget_refusal_is_the_only_line_on_stderr(stage1, tmp_path):
    """The CPU profiler behind the planner prints on file descriptor 2: none of it may come before the refusal."""
    result = subprocess.run([LTDD, "distill", "--config", "digits-lt-if50-ipc10", f"experts={stage1.root}",
                             "method=plain_tm", "width=8", "max_start_epoch=2", "expert_epochs=1",
                             f"out={tmp_path / 'out'}", "--memory-budget", "1KB", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "nothing fits a memory budget" in result.stderr, result.stderr
