"""Every stage under torchrun with 2 Gloo processes on this CPU, against the same command in one process: experts
expert by expert, evaluation report by report, distillation to reassociation; a rank that dies, a world size that
does not fit, ranks whose synthetic sets differ."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ltdd_fast import distributed
from ltdd_fast.cli import main
from ltdd_fast.errors import LTDDError

BIN = Path(sys.executable).parent
LTDD = str(BIN / "ltdd")
TORCHRUN = str(BIN / "torchrun")
DATA = ["--dataset", "digits", "--imbalance-factor", "10"]
CONFIG = """dataset: digits
imbalance_factor: 10
ipc: 2
width: 16
experts: {stage1}
experts_stage2: {stage2}
iterations: {iterations}
syn_steps: 2
syn_steps_classifier: 2
expert_epochs: 1
max_start_epoch: 1
batch_syn: 10
checkpoint_every: 2
"""


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", **extra)  # torchrun's own default per process; the baselines match it
    return env


def _single(*args):
    return subprocess.run([LTDD, *args], env=_env(), capture_output=True, text=True, timeout=300)


def _torchrun(*args, nproc=2, timeout=300):
    cmd = [TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(_port()),
           LTDD, *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(done):
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Stage-1 experts trained by 2 ranks and by one process, and stage-2 experts (one process) on the first."""
    root = tmp_path_factory.mktemp("experts")
    common = [*DATA, "--num-experts", "3", "--epochs", "2", "--width", "16"]
    _ok(_torchrun("experts", *common, "--out", str(root / "two"), "--quiet"))
    _ok(_single("experts", *common, "--out", str(root / "one"), "--quiet"))
    _ok(_single("experts", "--stage", "2", "--from", str(root / "one"), "--out", str(root / "stage2"),
                "--num-experts", "3", "--epochs", "2", "--quiet"))
    return root


def test_experts_over_two_ranks_equal_one_process_expert_by_expert(experts):
    one, two = experts / "one", experts / "two"
    for i in range(3):
        a, b = np.load(one / f"expert_{i:05d}.npy"), np.load(two / f"expert_{i:05d}.npy")
        assert np.array_equal(a, b), f"expert {i}"
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m1["experts"] == m2["experts"] and len(m2["experts"]) == 3


def test_experts_resume_with_another_world_size(experts, tmp_path):
    """3 experts by one process, then 5 by 2 ranks: the two new ones are those one process trains."""
    out = tmp_path / "grow"
    shutil.copytree(experts / "one", out)
    (out / ".ltdd.lock").unlink(missing_ok=True)
    _ok(_torchrun("experts", *DATA, "--num-experts", "5", "--epochs", "2", "--width", "16", "--out", str(out),
                  "--quiet"))
    ref = tmp_path / "ref"
    _ok(_single("experts", *DATA, "--num-experts", "5", "--epochs", "2", "--width", "16", "--out", str(ref),
                "--quiet"))
    for i in range(5):
        assert np.array_equal(np.load(out / f"expert_{i:05d}.npy"), np.load(ref / f"expert_{i:05d}.npy")), i


def test_evaluation_over_two_ranks_equals_one_process(tmp_path):
    args = ["eval", *DATA, "--random-ipc", "5", "--epochs", "2", "--num-runs", "3", "--width", "16"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _ok(_single(*args, "--two-stage", "--json", str(one), "--quiet"))
    _ok(_torchrun(*args, "--two-stage", "--json", str(two), "--quiet"))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2 and b["flat"]["world_size"] == 2
    for d in (a, b, a["flat"], b["flat"]):
        d.pop("world_size")
    for rule in a["by_combine"]:
        a["by_combine"][rule].pop("world_size")
        b["by_combine"][rule].pop("world_size")
    assert a == b


def _config(tmp_path, experts, iterations=3):
    path = tmp_path / f"config{iterations}.yaml"
    path.write_text(CONFIG.format(stage1=experts / "one", stage2=experts / "stage2", iterations=iterations))
    return str(path)


def _synset(out):
    return torch.load(Path(out) / "synset.pt", weights_only=True)


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("students", [1, 2])
def test_distillation_over_two_ranks_equals_one_process(experts, tmp_path, students):
    """students 1: the backbone and classifier phases on different ranks; 2: each phase's students spread."""
    config = _config(tmp_path, experts)
    _ok(_single("distill", "--config", config, f"out={tmp_path / 'one'}", f"students={students}", "--quiet",
                "--no-evaluate"))
    _ok(_torchrun("distill", "--config", config, f"out={tmp_path / 'two'}", f"students={students}", "--quiet",
                  "--no-evaluate"))
    a, b = _synset(tmp_path / "one"), _synset(tmp_path / "two")
    assert b["meta"]["world_size"] == 2 and a["meta"]["world_size"] == 1
    for key in ("images", "labels"):
        assert _relative(b[key], a[key]) < 1e-6, key
    assert abs(b["lr"] - a["lr"]) <= 1e-6 * abs(a["lr"])


def test_unilevel_over_two_ranks_equals_one_process(tmp_path):
    """The debiased observer and teacher train on different ranks, bit for bit as in one process; the recovery's
    chunks are dealt over the ranks (their statistics and image gradients summed), equal to reassociation."""
    data = [*DATA, "--epochs", "1", "--width", "8", "--batch-size", "64", "--quiet"]
    _ok(_single("experts", "--recipe", "debiased", *data, "--out", str(tmp_path / "e1")))
    _ok(_torchrun("experts", "--recipe", "debiased", *data, "--out", str(tmp_path / "e2")))
    one, two = (json.loads((tmp_path / e / "manifest.json").read_text())["models"] for e in ("e1", "e2"))
    assert {r: m["sha256"] for r, m in one.items()} == {r: m["sha256"] for r, m in two.items()}
    args = ["distill", "--config", "digits-lt-if10-ipc10-unilevel", f"experts={tmp_path / 'e1'}", "ipc=2",
            "iterations=3", "checkpoint_every=2", "init_pool=16"]
    _ok(_single(*args, f"out={tmp_path / 'one'}", "--quiet", "--no-evaluate"))
    _ok(_torchrun(*args, f"out={tmp_path / 'two'}", "--quiet", "--no-evaluate"))
    a, b = _synset(tmp_path / "one"), _synset(tmp_path / "two")
    assert b["meta"]["world_size"] == 2 and b["method"] == "unilevel"
    assert _relative(b["images"], a["images"]) < 1e-5 and _relative(b["labels"], a["labels"]) < 1e-5


def test_distillation_resumes_with_another_world_size(experts, tmp_path):
    """2 iterations on 2 ranks, then 2 more in one process from the checkpoint: one process's 4 iterations."""
    args = ["--config", _config(tmp_path, experts, iterations=2), "--quiet", "--no-evaluate"]
    _ok(_torchrun("distill", *args, f"out={tmp_path / 'mixed'}"))
    _ok(_single("distill", *args, f"out={tmp_path / 'mixed'}", "iterations=4"))
    _ok(_single("distill", *args, f"out={tmp_path / 'one'}", "iterations=4"))
    a, b = _synset(tmp_path / "mixed"), _synset(tmp_path / "one")
    assert a["meta"]["iterations"] == 4 and a["meta"]["world_size"] == 1
    for key in ("images", "labels"):
        assert _relative(a[key], b[key]) < 1e-6, key


def test_bench_e2e_reports_each_rank_and_the_scaling_against_one_process(tmp_path):
    out = tmp_path / "e2e.json"
    _ok(_torchrun("bench", "e2e", "--preset", "digits-lt-if50-ipc10", "--quick", "--device", "cpu",
                  "--iterations", "1", "--json", str(out)))
    row = json.loads(out.read_text())
    assert row["world_size"] == 2 and len(row["fast_it_s_per_rank"]) == 2
    assert row["single_process_threads"] == 2 and row["scaling"] > 0
    assert row["scaling_efficiency"] == pytest.approx(row["scaling"] / 2)
    assert row["grad_cosine"] > 0.999999  # the shared iteration is the whole iteration


SHARED_ITERATION = """
import sys
import torch
from ltdd_fast import distributed, matching
from ltdd_fast.bench import e2e

world = distributed.init("cpu")
config = e2e.resolve("digits-lt-if50-ipc10", [f"{k}={v}" for k, v in e2e.QUICK.items()])
lines = []
for students in (1, 2):
    problem = e2e.Problem(config, "cpu", students=students, backend="native", seed=students)
    phases = problem.phases()  # the same draws on both ranks
    args = (problem.net, problem.images.double(), problem.labels.double(), problem.alpha.double(), phases,
            problem.dsa)
    shared = matching.iteration_gradients(*args, classes=problem.classes, backend="native")
    with distributed.alone():
        whole = matching.iteration_gradients(*args, classes=problem.classes, backend="native")
    for name, a, b in zip(("images", "labels", "lr"), shared[1:], whole[1:]):
        error = float((a - b).norm() / b.norm())
        lines.append(f"{students} {name} {a.dtype} {error:.3e}")
with open(sys.argv[1] + f".rank{world.rank}", "w") as f:
    f.write("\\n".join(lines))
distributed.shutdown()
"""


def test_a_shared_iteration_equals_the_whole_one_in_float64(tmp_path):
    """Phase parallelism (1 student) and student parallelism (2), 2 ranks, float64: each rank's summed gradients
    against the same iteration computed whole, to 1e-6 relative error."""
    script = tmp_path / "shared.py"
    script.write_text(SHARED_ITERATION)
    cmd = [TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_port()),
           str(script), str(tmp_path / "out")]
    _ok(subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300))
    for rank in (0, 1):
        rows = [line.split() for line in (tmp_path / f"out.rank{rank}").read_text().splitlines()]
        assert len(rows) == 6
        for students, name, dtype, error in rows:
            assert dtype == "torch.float64" and float(error) < 1e-6, (rank, students, name, error)


def test_a_world_size_that_does_not_fit_is_refused_before_any_work(experts, tmp_path):
    done = _torchrun("distill", "--config", _config(tmp_path, experts), f"out={tmp_path / 'three'}", "--quiet",
                     nproc=3)
    assert done.returncode != 0
    assert "3 ranks but an iteration of method ltdd with students 1 has 2 matching problem(s)" in done.stderr
    assert not (tmp_path / "three" / "checkpoint.pt").exists()


def _rank_process(rank, port, args, tmp_path):
    env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               LTDD_TIMEOUT="30")
    log = open(tmp_path / f"rank{rank}.log", "w")
    return subprocess.Popen([LTDD, *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def test_a_killed_rank_stops_the_other_and_the_rerun_resumes_bit_identical(experts, tmp_path):
    config = _config(tmp_path, experts, iterations=40)
    args = ["distill", "--config", config, f"out={tmp_path / 'cut'}", "--quiet", "--no-evaluate"]
    port = _port()
    ranks = [_rank_process(r, port, args, tmp_path) for r in (0, 1)]
    checkpoint = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and ranks[0].poll() is None:
        time.sleep(0.05)
    ranks[1].send_signal(signal.SIGKILL)
    assert ranks[0].wait(timeout=120) == 2
    said = (tmp_path / "rank0.log").read_text()
    ours = [line for line in said.splitlines() if line.startswith("ltdd")]
    assert len(ours) == 1, said  # one line
    assert "(rank 0 of 2): error: rank 0 of 2: rank(s) 1 stopped answering while summing" in ours[0]
    assert "rerunning the same command resumes" in ours[0]
    kept = torch.load(checkpoint, weights_only=True)["iteration"]
    assert 2 <= kept < 40
    _ok(_torchrun(*args))
    _ok(_torchrun("distill", "--config", config, f"out={tmp_path / 'whole'}", "--quiet", "--no-evaluate"))
    a, b = _synset(tmp_path / "cut"), _synset(tmp_path / "whole")
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"]) and a["lr"] == b["lr"]


MISMATCH = """
import sys
import torch
from ltdd_fast import distributed
from ltdd_fast.config import load_config
from ltdd_fast.distill import Distiller
from ltdd_fast.errors import LTDDError

world = distributed.init("cpu")
distiller = Distiller(load_config(sys.argv[1], ["out=" + sys.argv[2]]), progress=False)
distiller.step()
if world.rank == 1:
    with torch.no_grad():
        distiller.images[0, 0, 0, 0] += 1e-3  # one pixel of one rank's set
try:
    distiller.save_checkpoint()
    said = "saved"
except LTDDError as exc:
    said = f"refused: {exc}"
with open(f"{sys.argv[2]}.rank{world.rank}", "w") as f:
    f.write(said)
distributed.shutdown()
"""


def test_ranks_whose_synthetic_sets_differ_are_stopped_before_the_checkpoint(experts, tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH)
    cmd = [TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_port()),
           str(script), _config(tmp_path, experts), str(tmp_path / "mm")]
    _ok(subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300))
    for rank in (0, 1):
        said = (tmp_path / f"mm.rank{rank}").read_text()
        assert said.startswith("refused: the synthetic set of rank(s) 1 differs from rank 0's at iteration 1"), said
    assert not (tmp_path / "mm" / "checkpoint.pt").exists()


def test_commands_that_do_not_run_under_torchrun_say_so(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["demo", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "ltdd demo does not run under torchrun (WORLD_SIZE 2): run it as one process" in err


def test_world_from_env_and_its_round_robin():
    assert distributed.from_env({}) == distributed.World()
    world = distributed.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.main, world.active) == (1, 2, False, True)
    assert world.mine(list(range(5))) == [1, 3]
    with pytest.raises(LTDDError, match="malformed"):
        distributed.from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(LTDDError, match="inconsistent"):
        distributed.from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(LTDDError, match="LTDD_TIMEOUT"):
        distributed.timeout_seconds({"LTDD_TIMEOUT": "-3"})
