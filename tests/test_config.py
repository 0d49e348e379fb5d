"""Distillation settings: presets, YAML files, key=value overrides, and `ltdd distill` as a user runs it."""
import re
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import yaml

from ltdd_fast.config import PRESET_DIR, UnilevelConfig, list_presets, load_config, save_config
from ltdd_fast.data import load_dataset
from ltdd_fast.distill import DistillConfig, config_keys
from ltdd_fast.errors import ConfigError
from ltdd_fast.experts import ExpertConfig, train_experts
from ltdd_fast.synset import load_synset

LTDD = [str(Path(sys.executable).parent / "ltdd")]
PRESET = "cifar10-lt-if50-ipc10"


def ltdd(*args):
    return subprocess.run(LTDD + [str(a) for a in args], capture_output=True, text=True, timeout=300)


# ---- presets ----


@pytest.mark.parametrize("name", [n for n in list_presets() if not n.endswith("-unilevel")])
def test_every_preset_loads_and_validates(name):
    config = load_config(name)
    assert isinstance(config, DistillConfig)
    config.validate()
    assert isinstance(config.experts, str) and config.experts and isinstance(config.experts_stage2, str)
    assert config.method == "ltdd" and config.expert_epochs == 2
    # the experts' lr, except where a preset says why it starts the student elsewhere (Fashion-MNIST: measured)
    assert config.lr_teacher == (0.1 if config.dataset == "fashion-mnist" else 0.01)
    # the file name says what the preset holds
    m = re.fullmatch(r"(.+)-lt-if(\d+)-ipc(\d+)", name)
    assert m, name
    assert config.imbalance_factor == float(m[2]) and config.ipc == int(m[3])
    assert config.dataset == {"cifar10": "cifar10", "cifar100": "cifar100", "tiny": "tiny",
                              "imagenet": "imagenet-lt", "digits": "digits", "fashion-mnist": "fashion-mnist"}[m[1]]
    # every value was coerced to its field's type
    for f in fields(DistillConfig):
        value = getattr(config, f.name)
        if f.type is float:
            assert type(value) is float, (f.name, value)
        elif f.type is int:
            assert type(value) is int, (f.name, value)
    assert config.min_start_epoch < config.max_start_epoch
    if config.initial_max_start_epoch is not None:
        assert config.min_start_epoch < config.initial_max_start_epoch <= config.max_start_epoch
        assert config.window_growth_iterations > 0


@pytest.mark.parametrize("name", [n for n in list_presets() if n.endswith("-unilevel")])
def test_every_unilevel_preset_loads_and_validates(name):
    config = load_config(name)
    assert isinstance(config, UnilevelConfig) and config.method == "unilevel" and config.experts
    m = re.fullmatch(r"(.+)-lt-if(\d+)-ipc(\d+)-unilevel", name)
    assert m, name
    assert config.imbalance_factor == float(m[2]) and config.ipc == int(m[3])
    assert config.dataset == {"cifar10": "cifar10", "cifar100": "cifar100", "tiny": "tiny",
                              "imagenet": "imagenet-lt", "digits": "digits", "fashion-mnist": "fashion-mnist"}[m[1]]
    for f in fields(UnilevelConfig):
        value = getattr(config, f.name)
        if f.type is float:
            assert type(value) is float, (f.name, value)
        elif f.type is int:
            assert type(value) is int, (f.name, value)


def test_preset_grid_is_complete():
    names = set(list_presets())
    assert names == {p.stem for p in PRESET_DIR.glob("*.yaml")}
    for factor in (10, 50, 100, 200):
        for ipc in (10, 20, 50):
            assert f"cifar10-lt-if{factor}-ipc{ipc}" in names
    for prefix in ("cifar100-lt", "tiny-lt", "imagenet-lt"):
        assert any(n.startswith(prefix + "-") for n in names), prefix
    assert list_presets() == sorted(list_presets())


@pytest.mark.parametrize("name", [n for n in list_presets() if n.startswith("cifar10-lt-") and "unilevel" not in n])
def test_cifar10_presets_carry_published_values(name):
    c = load_config(name)
    assert c.syn_steps == 80 and c.syn_steps_classifier == 80
    assert c.batch_syn == 500
    assert isinstance(c.lr_lr, float) and c.lr_lr == 1e-5
    assert c.lr_y == 2
    assert 100 <= c.lr_img <= 1000
    assert c.model == "convnet3" and c.iterations == 10000
    assert c.min_start_epoch == 0 and 20 <= c.max_start_epoch <= 40


@pytest.mark.parametrize("prefix, values", [
    ("cifar100-lt", dict(syn_steps=40, syn_steps_classifier=20, batch_syn=1000, lr_img=1000.0, lr_lr=1e-5, lr_y=10.0,
                         min_start_epoch=20, max_start_epoch=70, lambda_backbone=1.0, lambda_classifier=0.1,
                         model="convnet3")),
    ("tiny-lt", dict(lr_img=100.0, lr_lr=1e-4, lr_y=10.0, min_start_epoch=10, max_start_epoch=50,
                     lambda_backbone=1.0, lambda_classifier=0.1, model="convnet4")),
    ("imagenet-lt", dict(syn_steps=25, syn_steps_classifier=25, batch_syn=100, lr_img=0.1, lr_lr=1e-7, lr_y=0.01,
                         min_start_epoch=10, max_start_epoch=50, iterations=500, resolution=64, model="convnet4")),
])
def test_other_presets_carry_published_values(prefix, values):
    names = [n for n in list_presets() if n.startswith(prefix + "-") and not n.endswith("-unilevel")]
    assert names
    for name in names:
        c = load_config(name)
        assert {k: getattr(c, k) for k in values} == values, name
        if prefix == "tiny-lt":
            assert c.syn_steps == {10: 25, 20: 20, 50: 10}[c.ipc]
            assert 500 <= c.batch_syn <= 1000


# ---- overrides ----


def test_overrides_are_coerced_to_the_field_types():
    c = load_config(PRESET, ["ipc=20", "lr_lr=1e-4", "lr_img=300", "dsa=false", "zca=null",
                             "initial_max_start_epoch=none", "learn_labels=yes", "iterations=1e3", "experts=123",
                             "data_dir="])
    assert c.ipc == 20 and type(c.ipc) is int
    assert c.lr_lr == 1e-4 and type(c.lr_lr) is float
    assert c.lr_img == 300.0 and type(c.lr_img) is float
    assert c.dsa is False and c.learn_labels is True
    assert c.zca is None and c.initial_max_start_epoch is None and c.data_dir is None
    assert c.iterations == 1000 and type(c.iterations) is int
    assert c.experts == "123"
    # what is not overridden keeps the preset's value; the last override of a key wins
    assert c.syn_steps == 80 and c.lambda_backbone == 0.5
    assert load_config(PRESET, ["ipc=20", "ipc=50"]).ipc == 50
    assert load_config(PRESET, ["zca=true"]).zca is True


@pytest.mark.parametrize("override, match", [
    ("ipcc=5", r"unknown key 'ipcc' in the command line for method ltdd; did you mean 'ipc'\?"),
    ("lr_imgg=5", r"did you mean 'lr_img'"),
    ("ipc", r"override 'ipc' must look like key=value"),
    ("=5", r"must look like key=value"),
    ("ipc=abc", r"ipc must be int, got 'abc' \(the command line\)"),
    ("ipc=2.5", r"ipc must be int"),
    ("ipc=true", r"ipc must be int"),
    ("lr_lr=fast", r"lr_lr must be float"),
    ("dsa=maybe", r"dsa must be bool"),
    ("initial_max_start_epoch=x", r"initial_max_start_epoch must be int or null"),
    ("ipc=null", r"ipc may not be null"),
    ("ipc=0", r"ipc must be at least 1"),
    ("method=mtt", r"method must be one of ltdd, plain_tm"),
    ("min_start_epoch=40", r"min_start_epoch < max_start_epoch"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(PRESET, [override])


def test_unparsable_override_value_is_a_config_error():
    with pytest.raises(ConfigError, match="not a YAML scalar"):
        load_config(PRESET, ["out=[x"])
    with pytest.raises(ConfigError, match="dataset must be str"):
        load_config(PRESET, ["dataset=a: b"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as info:
        load_config("cifar10-lt-if50-ipc11")
    message = str(info.value)
    assert "cifar10-lt-if50-ipc11" in message
    for name in list_presets():
        assert name in message


def test_yaml_file_and_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("dataset: digits\nexperts: e1\nexperts_stage2: e2\nipc: 7\nlr_lr: 1e-05\nzca: null\n"
                    "dsa: false\nimbalance_factor: 50\n")
    c = load_config(str(path), ["width=8"])
    assert (c.dataset, c.experts, c.experts_stage2, c.ipc, c.width) == ("digits", "e1", "e2", 7, 8)
    assert c.lr_lr == 1e-5 and type(c.lr_lr) is float
    assert c.imbalance_factor == 50.0 and type(c.imbalance_factor) is float
    assert c.zca is None and c.dsa is False
    # defaults fill the rest
    assert c.syn_steps == DistillConfig().syn_steps
    saved = tmp_path / "sub" / "saved.yaml"
    save_config(c, saved)
    assert load_config(str(saved)) == c
    assert set(yaml.safe_load(saved.read_text())) == set(config_keys())
    preset = load_config(PRESET)
    save_config(preset, saved)
    assert load_config(str(saved)) == preset


@pytest.mark.parametrize("text, match", [
    ("ipc: [1, 2\n", "is not valid YAML"),
    ("- ipc\n- 3\n", "must hold a mapping"),
    ("ipcs: 3\nexperts: e\nexperts_stage2: e\n", r"unknown key 'ipcs' in bad.yaml for method ltdd; did you mean 'ipc'"),
    ("ipc: ten\nexperts: e\nexperts_stage2: e\n", r"ipc must be int, got 'ten' \(bad.yaml\)"),
    ("ipc: 3\n", "experts"),
])
def test_bad_yaml_files(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(str(path))


# ---- ltdd distill ----


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    digits = load_dataset("digits", imbalance_factor=50, seed=0)
    train_experts(digits, ExpertConfig(stage=1, num_experts=2, width=8, batch_size=64, epochs=4), root / "e1",
                  progress=False)
    train_experts(digits, ExpertConfig(stage=2, num_experts=2, width=8, batch_size=64, epochs=2), root / "e2",
                  source_dir=root / "e1", progress=False)
    return root


def test_cli_distill_writes_synset_and_config(experts, tmp_path):
    out = tmp_path / "run"
    settings = dict(dataset="digits", imbalance_factor=50, width=8, ipc=3, experts=str(experts / "e1"),
                    experts_stage2=str(experts / "e2"), iterations=2, syn_steps=2, syn_steps_classifier=2,
                    batch_syn=10, max_start_epoch=2, expert_epochs=2, checkpoint_every=0, out=str(out))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(settings))
    result = ltdd("distill", "--config", path, "--quiet", "--no-evaluate", "lambda_classifier=0.3")
    assert result.returncode == 0, result.stderr
    assert "synthetic set:" in result.stdout and "2 iterations" in result.stdout
    assert (out / "synset.pt").is_file() and (out / "config.yaml").is_file()
    assert not (out / "eval.json").exists()
    saved = load_config(str(out / "config.yaml"))
    assert saved == load_config(str(path), ["lambda_classifier=0.3"])
    record = load_synset(out / "synset.pt")
    assert record["images"].shape == (30, 1, 8, 8) and record["meta"]["iterations"] == 2
    assert record["lr"] > 0
    # a rerun resumes at the end and writes the same set again
    again = ltdd("distill", "--config", out / "config.yaml", "--no-evaluate", "--quiet")
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert load_synset(out / "synset.pt")["lr"] == record["lr"]


def test_cli_distill_errors_are_one_line():
    result = ltdd("distill", "--config", "nope")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("ltdd distill: error:") and "'nope'" in lines[0] and PRESET in lines[0]
    result = ltdd("distill", "--config", PRESET, "ipcc=3")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "did you mean 'ipc'" in result.stderr
    result = ltdd("distill", "--config", PRESET, "--memory-budget", "lots")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "memory budget 'lots' is not a size" in result.stderr


def test_cli_distill_memory_budget_says_its_plan(experts, tmp_path):
    out = tmp_path / "run"
    result = ltdd("distill", "--config", "digits-lt-if50-ipc10", "--quiet", "--no-evaluate", "--memory-budget",
                  "20GB", f"experts={experts / 'e1'}", f"experts_stage2={experts / 'e2'}", "width=8", "iterations=1",
                  "syn_steps=2", "syn_steps_classifier=2", "max_start_epoch=2", f"out={out}")
    assert result.returncode == 0, result.stderr
    assert "memory plan for 20.00 GB: no chunking, precision full" in result.stderr
    assert load_config(str(out / "config.yaml")).memory_budget == "20GB"


def test_cli_list_presets():
    result = ltdd("distill", "--list-presets")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == list_presets()
