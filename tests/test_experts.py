"""Expert training (stages 1 and 2) and the trajectory store: layout, resume, refusal of bad files."""
import json

import numpy as np
import pytest
import torch

from ltdd_fast.data import load_dataset
from ltdd_fast.errors import ConfigError, TrajectoryError
from ltdd_fast.experts import ExpertConfig, _epoch_order, _sharpness_aware_grads, train_experts
from ltdd_fast.models.functional import functional_model
from ltdd_fast.trajectories import TrajectoryStore

SMALL = dict(width=16, batch_size=64, epochs=3)


@pytest.fixture(scope="module")
def stage1(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    return train_experts(digits, ExpertConfig(stage=1, num_experts=2, **SMALL), out, progress=False)


def _net(dataset, width=16):
    return functional_model("convnet", dataset.channel, dataset.num_classes, dataset.im_size, width=width)


def test_stage1_layout_and_manifest(digits, stage1):
    net = _net(digits)
    m = stage1.manifest
    assert stage1.completed() == [0, 1]
    assert m["num_params"] == net.num_params and m["classifier_offset"] == net.classifier_offset
    assert m["class_counts"] == digits.class_counts and m["imbalance_factor"] == 50.0
    assert m["stage"] == 1 and m["epochs"] == 3 and m["weight_decay"] == 5e-3 and m["balanced"] is False
    traj = stage1.trajectory(0)
    assert isinstance(traj, np.memmap) and traj.shape == (4, net.num_params)
    # snapshot 0 is the initialisation drawn from the expert's seed; training moves every later one
    init = net.init_flat(torch.Generator().manual_seed(0))
    torch.testing.assert_close(stage1.snapshot(0, 0), init, atol=0, rtol=0)
    steps = [(stage1.snapshot(0, e + 1) - stage1.snapshot(0, e)).norm().item() for e in range(3)]
    assert all(s > 0 for s in steps)
    assert not torch.equal(stage1.snapshot(0, 3), stage1.snapshot(1, 3))
    assert set(m["experts"]) == {"0", "1"} and all(0 <= e["test_acc"] <= 1 for e in m["experts"].values())


def test_resume_continues_at_first_unfinished_expert(digits, stage1, tmp_path):
    config = ExpertConfig(stage=1, num_experts=1, **SMALL)
    train_experts(digits, config, tmp_path, progress=False)
    first = (tmp_path / "expert_00000.npy").read_bytes()
    # an interrupted second expert leaves a partial file behind; the rerun replaces it
    (tmp_path / "expert_00001.partial.npy").write_bytes(b"garbage")
    store = train_experts(digits, ExpertConfig(stage=1, num_experts=2, **SMALL), tmp_path, progress=False)
    assert store.completed() == [0, 1]
    assert (tmp_path / "expert_00000.npy").read_bytes() == first
    assert not (tmp_path / "expert_00001.partial.npy").exists()
    # same seed, same device: the resumed run equals the uninterrupted one bit for bit
    np.testing.assert_array_equal(store.trajectory(1), stage1.trajectory(1))


def test_rerun_with_other_settings_is_refused(digits, tmp_path):
    train_experts(digits, ExpertConfig(stage=1, num_experts=1, **SMALL), tmp_path, progress=False)
    with pytest.raises(TrajectoryError, match="lr is 0.01 there, 0.02 now"):
        train_experts(digits, ExpertConfig(stage=1, num_experts=1, lr=0.02, **SMALL), tmp_path, progress=False)
    assert TrajectoryStore(tmp_path).completed() == [0]


def test_float16_trajectories(digits, stage1, tmp_path):
    store = train_experts(digits, ExpertConfig(stage=1, num_experts=1, dtype="float16", **SMALL), tmp_path,
                          progress=False)
    assert store.trajectory(0).dtype == np.float16
    snap = store.snapshot(0, 3)
    assert snap.dtype == torch.float32
    torch.testing.assert_close(snap, stage1.snapshot(0, 3), atol=2e-3, rtol=2e-3)


def test_truncated_and_mismatched_trajectories_are_refused(digits, stage1, tmp_path):
    for f in stage1.root.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    path = tmp_path / "expert_00000.npy"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(TrajectoryError, match="truncated or corrupt"):
        TrajectoryStore(tmp_path).trajectory(0)
    with pytest.raises(TrajectoryError, match="expert 5 is missing"):
        TrajectoryStore(tmp_path).trajectory(5)
    other = load_dataset("digits", imbalance_factor=10, seed=0)
    with pytest.raises(TrajectoryError, match="imbalance_factor is 50.0 there, expected 10.0"):
        stage1.check_compatible(other, _net(other))
    with pytest.raises(TrajectoryError, match="num_params"):
        stage1.check_compatible(digits, _net(digits, width=8))
    stage1.check_compatible(digits, _net(digits))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(TrajectoryError, match="not a readable trajectory manifest"):
        TrajectoryStore(tmp_path)
    with pytest.raises(TrajectoryError, match="expected manifest.json"):
        TrajectoryStore(tmp_path / "nothing")


def test_stage2_trains_only_the_classifier(digits, stage1, tmp_path):
    config = ExpertConfig(stage=2, num_experts=2, max_norm=0.1, width=16, batch_size=64, epochs=2)
    store = train_experts(digits, config, tmp_path, source_dir=stage1.root, progress=False)
    m = store.manifest
    assert m["weight_decay"] == 0.0 and m["balanced"] is True and m["source"] == str(stage1.root.resolve())
    off = m["classifier_offset"]
    for i in range(2):
        start = stage1.snapshot(i, 3)
        torch.testing.assert_close(store.snapshot(i, 0), start, atol=0, rtol=0)
        for e in (1, 2):
            snap = store.snapshot(i, e)
            torch.testing.assert_close(snap[:off], start[:off], atol=0, rtol=0)
            assert not torch.equal(snap[off:], start[off:])
            rows = snap[off:m["num_params"] - digits.num_classes].view(digits.num_classes, -1)  # weight, not bias
            assert rows.norm(dim=1).max().item() <= 0.1 + 1e-6


def test_stage2_needs_enough_stage1_experts(digits, stage1, tmp_path):
    with pytest.raises(ConfigError, match="only 2 complete stage-1 experts"):
        train_experts(digits, ExpertConfig(stage=2, num_experts=3, **SMALL), tmp_path, source_dir=stage1.root)
    with pytest.raises(ConfigError, match="--from"):
        train_experts(digits, ExpertConfig(stage=2, num_experts=1, **SMALL), tmp_path)
    with pytest.raises(TrajectoryError, match="expected stage 1"):
        s2 = train_experts(digits, ExpertConfig(stage=2, num_experts=1, **SMALL), tmp_path / "s2",
                           source_dir=stage1.root, progress=False)
        train_experts(digits, ExpertConfig(stage=2, num_experts=1, **SMALL), tmp_path / "s3", source_dir=s2.root)


def test_class_balanced_order_draws_classes_equally():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    order = _epoch_order(labels, True, 3, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels[order], minlength=3).float() / order.numel()
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.05)
    plain = _epoch_order(labels, False, 3, torch.Generator().manual_seed(0))
    assert sorted(plain.tolist()) == list(range(1000))


def test_sharpness_aware_gradients_on_a_quadratic():
    p = torch.tensor([3.0, 4.0], requires_grad=True)
    loss = lambda: 0.5 * (p * p).sum()  # noqa: E731 - gradient is p itself
    (sam,) = _sharpness_aware_grads([p], loss, rho=0.5, gsam_alpha=0.0)
    torch.testing.assert_close(sam, torch.tensor([3.3, 4.4]))  # p + rho * p/|p|
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 4.0]))  # the perturbation is undone
    # g and the perturbed gradient are parallel here, so GSAM's orthogonal correction vanishes
    (gsam,) = _sharpness_aware_grads([p], loss, rho=0.5, gsam_alpha=0.3)
    torch.testing.assert_close(gsam, sam)


def test_sam_expert_trains(digits, tmp_path):
    store = train_experts(digits, ExpertConfig(stage=1, num_experts=1, sam="gsam", **SMALL), tmp_path,
                          progress=False)
    assert np.isfinite(store.trajectory(0)).all()
    assert json.loads((tmp_path / "manifest.json").read_text())["sam"] == "gsam"


@pytest.mark.parametrize("bad, match", [
    (dict(stage=3), "stage must be 1 or 2"), (dict(num_experts=0), "num_experts"), (dict(epochs=0), "epochs"),
    (dict(lr=-1.0), "lr must be positive"), (dict(model="mlp"), "unknown model 'mlp'"),
    (dict(sam="adam"), "unknown sam"), (dict(dtype="int8"), "trajectory dtype"),
])
def test_bad_expert_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        ExpertConfig(**bad)
