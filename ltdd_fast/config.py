"""Distillation settings: DistillConfig and its one validator, the YAML presets shipped with the package, files,
and key=value overrides. May import: errors, checks, files, ops (the backends' names), augment (DSA's default)."""
import difflib
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from . import ops
from .augment import DSA
from .checks import check_device, check_number, parse_bytes
from .errors import ConfigError, DataError, LTDDError
from .files import load_torch, write_atomic

PRESET_DIR = Path(__file__).parent / "presets"


METHODS = ("ltdd", "plain_tm", "unilevel")  # unilevel: UnilevelConfig, the others DistillConfig
INITS = ("correct", "real", "noise")
LOGS = ("tensorboard",)  # besides metrics.jsonl, which every run writes
BACKENDS = ops.BACKENDS  # auto, native, triton, reference
# the matching's speed and memory options (matching.two_pass_gradients)
SECOND_PASSES = ("exact", "forward", "fd")
PRECISIONS = ("full", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile modes; None: eager


def check_matching_options(style="config", **options):
    """One check of the matching's options, shared by DistillConfig.validate, matching.two_pass_gradients and the
    command line's bench flags: second_pass, precision, compile and chunk (any of them), each a ConfigError that
    names the option as it is written where it came from: style "config" (a settings file: batch_chunk, null),
    "argument" (a function's keyword: chunk, None) or "cli" (--second-pass, --compile none)."""
    def name(key):
        if style == "cli":
            return "--" + key.replace("_", "-")
        return "batch_chunk" if style == "config" and key == "chunk" else key
    none = {"config": "null", "argument": "None", "cli": "none"}[style]
    for key, choices in (("second_pass", SECOND_PASSES), ("precision", PRECISIONS)):
        if key in options and options[key] not in choices:
            raise ConfigError(f"{name(key)} must be one of {', '.join(choices)}, got {options[key]!r}")
    compile_mode = options.get("compile")
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        listed = f"{none}, {', '.join(COMPILE_MODES)}" if style == "cli" else f"{', '.join(COMPILE_MODES)} or {none}"
        raise ConfigError(f"{name('compile')} must be one of {listed}, got {compile_mode!r}")
    chunk = options.get("chunk")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        also = f" or {none}" if style == "config" else ""
        raise ConfigError(f"{name('chunk')} must be a positive number of images{also}, got {chunk}")


@dataclass
class DataSettings:
    """The data a distillation reads, the fields every method's settings begin with."""
    dataset: str = "digits"
    data_dir: str | None = None
    imbalance_factor: float = 1.0
    data_seed: int = 0
    zca: bool | None = None
    resolution: int | None = None


PATH_KEYS = ("out", "experts", "experts_stage2", "data_dir")


def comparable(config: dict) -> dict:
    """A config dict with its paths made absolute, so a run resumes whether out was given relative or absolute."""
    return {k: (str(Path(v).resolve()) if k in PATH_KEYS and isinstance(v, str) and v else v)
            for k, v in config.items()}


def load_resumable(path, config, free, what, required):
    """The checkpoint at `path` (tensors and plain containers only: a checkpoint from elsewhere must not run code),
    refused in one line unless it is whole and its settings equal `config`'s but for the names in `free` (settings
    that change neither the method nor its numbers beyond reassociation)."""
    try:
        state = load_torch(path, what, required=required)
        if not isinstance(state["config"], dict):
            raise DataError(f"{path} is not a complete {what}: its config is a {type(state['config']).__name__}")
    except DataError as exc:
        raise LTDDError(f"{exc}; move it away to start afresh") from None
    ours, theirs = comparable(asdict(config)), comparable(state["config"])
    changed = [k for k in ours if k not in free and ours[k] != theirs.get(k, getattr(type(config), k))]
    if changed:
        raise ConfigError(f"{path} belongs to a run with other settings ({changed[0]} was {theirs.get(changed[0])!r}, "
                          f"now {ours[changed[0]]!r}): use another out directory")
    return state


@dataclass
class DistillConfig(DataSettings):
    # what to distil
    method: str = "ltdd"
    ipc: int = 10
    model: str = "convnet"
    width: int = 128
    experts: str = ""                  # stage-1 trajectory directory
    experts_stage2: str = ""           # stage-2 trajectory directory (method ltdd)
    # matching (METHOD sections 6 and 8)
    iterations: int = 1000
    syn_steps: int = 20                # backbone phase (or the single plain_tm phase)
    syn_steps_classifier: int = 20
    expert_epochs: int = 2             # M
    min_start_epoch: int = 0
    max_start_epoch: int = 20          # start epochs are drawn from [min, max)
    initial_max_start_epoch: int | None = None   # DATM's growing window: t_max rises from this to max_start_epoch
    window_growth_iterations: int = 0
    batch_syn: int = 100
    lambda_backbone: float = 1.0
    lambda_classifier: float = 0.1
    dam_offset: float = 0.0            # f in w_c = (n_c + f) / (sum n + f)
    # synthetic set and its optimisers
    init: str = "correct"
    allow_duplicates: bool = True
    lr_teacher: float = 0.01           # initial alpha
    lr_img: float = 100.0
    lr_lr: float = 1e-5
    lr_y: float = 2.0
    momentum_img: float = 0.5
    momentum_lr: float = 0.5
    momentum_y: float = 0.9
    learn_labels: bool = True
    dsa: bool = True
    dsa_strategy: str = DSA.STRATEGY
    backend: str = "auto"              # fused operators: "native" (C++/CUDA), "triton"; "auto" picks per op and device; "reference": plain PyTorch
    # speed and memory (ltdd_fast/matching/): none of these changes the method, except students > 1 (a mean over K
    # trajectories per phase), precision bf16 and second_pass fd (approximations)
    students: int = 1                  # K students per phase, advanced together (K=1 is the published method)
    second_pass: str = "exact"         # d/dX (v . g_k): "exact" (reverse over reverse), "forward", "fd"
    batch_chunk: int | None = None     # split student minibatches into chunks of at most this many images
    precision: str = "full"            # "bf16": the student's network computes in bf16
    compile: str | None = None         # torch.compile each step's student terms: "default", "reduce-overhead" (+ CUDA graphs), "max-autotune"
    cudnn_benchmark: bool = False      # cuDNN picks each convolution's fastest algorithm by timing (CUDA; may differ run to run)
    memory_budget: str | None = None   # e.g. "24GB": choose batch_chunk and precision to fit (memory.py)
    # bookkeeping
    eval_every: int = 0                # 0: only at the end
    eval_epochs: int = 300
    eval_runs: int = 1
    checkpoint_every: int = 50
    log: str | None = None             # "tensorboard": also log each iteration there (metrics.jsonl is always written)
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/distill"

    def validate(self):
        checks = [
            (self.method in METHODS[:2], f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.init in INITS, f"init must be one of {', '.join(INITS)}, got {self.init!r}"),
            (self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"),
            (self.ipc >= 1, f"ipc must be at least 1, got {self.ipc}"),
            (self.imbalance_factor >= 1, f"imbalance_factor must be at least 1, got {self.imbalance_factor}"),
            (self.iterations >= 0, f"iterations must be non-negative, got {self.iterations}"),
            (self.syn_steps >= 1 and self.syn_steps_classifier >= 1, "syn_steps must be at least 1"),
            (self.batch_syn >= 1, f"batch_syn must be at least 1, got {self.batch_syn}"),
            (self.expert_epochs >= 1, f"expert_epochs must be at least 1, got {self.expert_epochs}"),
            (0 <= self.min_start_epoch < self.max_start_epoch,
             f"need 0 <= min_start_epoch < max_start_epoch, got {self.min_start_epoch}, {self.max_start_epoch}"),
            (self.students >= 1, f"students must be at least 1, got {self.students}"),
            (bool(self.experts), "experts (the stage-1 trajectory directory) is required"),
            (self.log in (None, *LOGS), f"log must be null or one of {', '.join(LOGS)}, got {self.log!r}"),
            (self.method != "ltdd" or bool(self.experts_stage2),
             "method ltdd needs experts_stage2 (the stage-2 trajectory directory)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_matching_options(second_pass=self.second_pass, precision=self.precision, compile=self.compile,
                               chunk=self.batch_chunk)
        ints = {"ipc": 1, "width": 1, "syn_steps": 1, "syn_steps_classifier": 1, "batch_syn": 1, "expert_epochs": 1,
                "iterations": 0, "min_start_epoch": 0, "max_start_epoch": 1, "window_growth_iterations": 0,
                "students": 1, "eval_every": 0, "eval_epochs": 1, "eval_runs": 1, "checkpoint_every": 0, "seed": 0,
                "data_seed": 0}
        for key, low in ints.items():
            check_number(key, getattr(self, key), low=low, integer=True)
        for key in ("batch_chunk", "initial_max_start_epoch", "resolution"):
            check_number(key, getattr(self, key), low=1, integer=True, allow_none=True)
        for key in ("lr_teacher", "lr_img", "lr_lr", "lr_y"):
            check_number(key, getattr(self, key), low=0, low_open=True)
        for key in ("lambda_backbone", "lambda_classifier", "dam_offset"):
            check_number(key, getattr(self, key), low=0)
        for key in ("momentum_img", "momentum_lr", "momentum_y"):
            check_number(key, getattr(self, key), low=0, high=1)
        check_number("imbalance_factor", self.imbalance_factor, low=1)
        check_device(self.device)
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)
        return self


@dataclass
class UnilevelConfig(DataSettings):
    """The uni-level distiller's settings (METHOD section 11; ltdd_fast/unilevel/). Ours where the paper is silent:
    Adam on the pixels at lr_img with a cosine decay, the pixels kept inside the real data's per-channel range,
    DSA's crop and flip on each iteration's views, lambda_class, lambda_ce, the initialisation's crops and pool,
    the label temperature and lr_eval."""
    # what to distil
    method: str = "unilevel"
    ipc: int = 10
    experts: str = ""                  # the debiased experts (ltdd experts --recipe debiased)
    # recovery (section 11, item 4)
    iterations: int = 500
    lr_img: float = 0.05               # Adam on the pixels, cosine decay to 0
    lambda_class: float = 1.0          # the class-by-class match beside the whole set's
    lambda_ce: float = 0.0             # the observer's cross-entropy on each image's class
    augment: str | None = "crop_flip"  # DSA ops drawn afresh each iteration (null: no augmentation)
    # initialisation (item 3)
    init: str = "multi_round"          # or "real": the first ipc real images of a random order, "noise"
    init_crops: int = 8
    init_min_scale: float = 0.5
    init_pool: int = 256
    # relabelling (item 5)
    label_temperature: float = 1.0
    lr_eval: float = 0.01              # the student lr the synthetic set records for evaluation
    # speed and memory
    backend: str = "auto"              # class_feature_stats' backend
    batch_chunk: int | None = None     # images per forward pass (None: the whole set at once)
    memory_budget: str | None = None   # e.g. "4GB": choose batch_chunk to fit
    # bookkeeping
    eval_model: str = "convnet"        # the network of the final evaluation
    eval_width: int = 128
    eval_epochs: int = 300
    eval_runs: int = 1
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/unilevel"

    def validate(self):
        if self.method != "unilevel":
            raise ConfigError(f"method must be unilevel for these settings, got {self.method!r}")
        if not self.experts:
            raise ConfigError("experts (the directory of `ltdd experts --recipe debiased`) is required")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.init not in UNILEVEL_INITS:
            raise ConfigError(f"init must be one of {', '.join(UNILEVEL_INITS)}, got {self.init!r}")
        for key, low in {"ipc": 1, "iterations": 0, "init_crops": 1, "init_pool": 1, "eval_width": 1,
                         "eval_epochs": 1, "eval_runs": 1, "checkpoint_every": 0, "seed": 0, "data_seed": 0}.items():
            check_number(key, getattr(self, key), low=low, integer=True)
        for key in ("batch_chunk", "resolution"):
            check_number(key, getattr(self, key), low=1, integer=True, allow_none=True)
        for key in ("lr_img", "label_temperature", "lr_eval"):
            check_number(key, getattr(self, key), low=0, low_open=True)
        for key in ("lambda_class", "lambda_ce"):
            check_number(key, getattr(self, key), low=0)
        check_number("init_min_scale", self.init_min_scale, low=0, low_open=True, high=1)
        check_number("imbalance_factor", self.imbalance_factor, low=1)
        if self.augment is not None:
            DSA(self.augment, mode="multiple")  # an unknown op is a ConfigError naming it
        check_device(self.device)
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)
        return self


UNILEVEL_INITS = ("multi_round", "real", "noise")
CONFIGS = {"unilevel": UnilevelConfig}  # by method; every other method: DistillConfig


def list_presets():
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _field_types(cls):
    out = {}
    for f in fields(cls):
        kinds = typing.get_args(f.type) if isinstance(f.type, types.UnionType) else (f.type,)
        out[f.name] = tuple(k for k in kinds if k is not type(None)), type(None) in kinds
    return out


def _coerce(key, value, source, cls):
    types_, nullable = _field_types(cls)[key]
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        if nullable:
            return None
        raise ConfigError(f"{key} may not be null ({source})")
    kind = types_[0]
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise ValueError
        if kind is int:
            as_float = float(value)  # YAML reads 1e4 as a string; accept whole numbers written that way
            if not as_float.is_integer() or isinstance(value, bool):
                raise ValueError
            return int(as_float)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {kind.__name__}{' or null' if nullable else ''}, got {value!r} "
                          f"({source})") from None


def _apply(values: dict, target: dict, source, cls):
    known = set(target)
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key!r} in {source} for method {target.get('method')}{hint}")
        target[key] = _coerce(key, value, source, cls)


def load_config(source: str, overrides=()):
    """A preset name or a YAML file, then `key=value` overrides, validated: a UnilevelConfig where the method
    (from the overrides, else the file) is unilevel, a DistillConfig otherwise."""
    path = Path(source)
    if not path.is_file():
        path = PRESET_DIR / f"{source}.yaml"
        if not path.is_file():
            raise ConfigError(f"no preset or file named {source!r}: expected a YAML file or one of "
                              f"{', '.join(list_presets())}")
    try:
        values = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a readable YAML file: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(exc).split())})") from None
    if values is None:
        raise ConfigError(f"{path} is empty: expected a mapping of key: value settings")
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value, got {type(values).__name__}")
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not a YAML scalar") from None
    method = parsed.get("method", values.get("method"))
    cls = CONFIGS.get(method, DistillConfig) if isinstance(method, str) else DistillConfig
    settings = asdict(cls())
    _apply(values, settings, path.name, cls)
    _apply(parsed, settings, "the command line", cls)
    return cls(**settings).validate()


def save_config(config, path):
    text = yaml.safe_dump(asdict(config), sort_keys=False).encode()
    write_atomic(path, lambda f: f.write(text))
