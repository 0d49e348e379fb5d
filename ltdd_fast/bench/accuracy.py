"""`ltdd bench accuracy`: what a speed or memory option costs in distilled accuracy.

The same data set is distilled from the same experts once per variant (a set of distill settings, and the
dtype the expert trajectories are stored in) and distillation seed, and every synthetic set is then evaluated
under one protocol (`Distiller.evaluate`: the same epochs and runs, evaluation seeds from the distillation seed).
Runs at one seed share their initial images and their expert, start-epoch and minibatch draws, so a variant's
cost is its paired difference to the baseline (the first variant) seed by seed; the baseline's own spread over
seeds says how large a difference noise makes.

Every run keeps its directory under `out` (checkpoint, synthetic set, bench_eval.json), so an interrupted bench
continues where it stopped and a finished run is not repeated. Converted trajectories are written once, under
`out/trajectories-DTYPE/`.
"""
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..config import load_config
from ..data import load_dataset
from ..distill import Distiller
from ..errors import ConfigError, DataError
from ..files import read_json, write_json_atomic
from ..trajectories import DTYPES, TrajectoryStore, convert_store


@dataclass
class Variant:
    name: str
    overrides: list = field(default_factory=list)  # key=value distill settings
    trajectories: str | None = None                # store the experts in this dtype first (None: as they are)


VARIANTS = {
    "full": Variant("full"),
    "bf16": Variant("bf16", ["precision=bf16"]),
    "fp16-trajectories": Variant("fp16-trajectories", trajectories="float16"),
    "bf16+fp16-trajectories": Variant("bf16+fp16-trajectories", ["precision=bf16"], "float16"),
    "fd": Variant("fd", ["second_pass=fd"]),
}
DEFAULT_VARIANTS = ("full", "bf16", "fp16-trajectories", "fd")


def parse_variant(text) -> Variant:
    """A name from VARIANTS, or NAME:key=value,... (distill settings; trajectories=float16 converts the experts)."""
    name, sep, spec = text.partition(":")
    if not sep:
        if text not in VARIANTS:
            raise ConfigError(f"unknown variant {text!r}: expected one of {', '.join(VARIANTS)} or "
                              f"NAME:key=value,... (e.g. compiled:compile=default)")
        return VARIANTS[text]
    if not name or "/" in name or not spec:
        raise ConfigError(f"variant {text!r} must look like NAME:key=value,... with a name usable as a directory")
    overrides, dtype = [], None
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if key.strip() == "trajectories":
            if value not in DTYPES:
                raise ConfigError(f"variant {name}: trajectories must be one of {', '.join(DTYPES)}, got {value!r}")
            dtype = value
        elif not eq:
            raise ConfigError(f"variant {name}: {item!r} must look like key=value")
        else:
            overrides.append(item.strip())
    return Variant(name, overrides, dtype)


# settings every variant shares: one data set and its experts, the bench's seeds, directories and evaluation
FIXED = ("dataset", "data_dir", "imbalance_factor", "data_seed", "zca", "resolution", "experts", "experts_stage2",
         "seed", "out", "eval_every", "eval_epochs", "eval_runs")


def _configs(source, overrides, variants, seeds, out):
    """Every (variant, seed) run's DistillConfig, validated before anything runs."""
    for v in variants:
        for item in v.overrides:
            if item.partition("=")[0].strip() in FIXED:
                raise ConfigError(f"variant {v.name} sets {item.partition('=')[0].strip()}, which every variant "
                                  f"shares (set it before the variants, for all of them)")
    base = load_config(source, overrides)
    if len({v.name for v in variants}) != len(variants):
        raise ConfigError(f"variant names must differ, got {', '.join(v.name for v in variants)}")
    configs = {}
    for v in variants:
        cfg = load_config(source, list(overrides) + v.overrides)
        for seed in seeds:
            configs[v.name, seed] = replace(cfg, seed=seed, out=str(Path(out) / v.name / f"seed{seed}"),
                                            eval_every=0)
    return base, configs


def _experts(base, variant, out, say):
    """The variant's (experts, experts_stage2, dtype): the base ones, or copies stored in the variant's dtype."""
    if variant.trajectories is None:
        return base.experts, base.experts_stage2, TrajectoryStore(base.experts).manifest["dtype"]
    roots = []
    for stage, root in (("stage1", base.experts), ("stage2", base.experts_stage2)):
        if not root:
            roots.append(root)
            continue
        dest = Path(out) / f"trajectories-{variant.trajectories}" / stage
        say(f"{variant.name}: {root} as {variant.trajectories} in {dest}")
        roots.append(str(convert_store(root, dest, variant.trajectories).root))
    return (*roots, variant.trajectories)


def _run(cfg, dataset, eval_epochs, eval_runs, progress, say, label):
    """Distil (or continue) one run and evaluate its set, reusing its bench_eval.json if made of this set."""
    out = Path(cfg.out)
    eval_path = out / "bench_eval.json"
    distiller = Distiller(cfg, dataset=dataset, progress=progress)
    if distiller.iteration < cfg.iterations:
        say(f"{label}: distilling from iteration {distiller.iteration} of {cfg.iterations}")
    distiller.run()
    # what the saved evaluation must have been made with: this protocol, on the set as it stands now
    protocol = {"eval_epochs": eval_epochs, "eval_runs": eval_runs, "iterations": distiller.iteration}
    if eval_path.is_file():
        try:
            saved = read_json(eval_path, "saved evaluation")
        except DataError:
            saved = {}  # damaged: evaluated again below
        if saved.get("protocol") == protocol:
            return saved
    say(f"{label}: evaluating ({eval_runs} run(s) of {eval_epochs} epochs)")
    report = distiller.evaluate(epochs=eval_epochs, runs=eval_runs)
    result = {"protocol": protocol, "overall": report.overall_mean, "overall_std": report.overall_std,
              "many": report.many, "medium": report.medium, "few": report.few,
              "distill_seconds": sum(h["seconds"] for h in distiller.history),
              "alpha": float(distiller.alpha.detach())}
    write_json_atomic(eval_path, result)
    return result


def _spread(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _paired(runs, base_runs, key):
    """Mean and sample std over seeds of run[key] - baseline run[key] (None where a side has no such classes)."""
    deltas = [r[key] - b[key] for r, b in zip(runs, base_runs) if r[key] is not None and b[key] is not None]
    return (statistics.fmean(deltas), _spread(deltas)) if deltas else (None, None)


def bench_accuracy(source, overrides=(), variants=DEFAULT_VARIANTS, seeds=(0, 1, 2), eval_epochs=300, eval_runs=3,
                   out="runs/bench-accuracy", progress=False, say=None):
    """Distil and evaluate every variant at every seed; the result dict that format_accuracy prints.

    source: a distill preset or YAML file, overrides its key=value settings (as `ltdd distill`); variants: names
    from VARIANTS or Variant objects, the first one the baseline.
    """
    say = say or (lambda text: None)
    variants = [v if isinstance(v, Variant) else parse_variant(v) for v in variants]
    seeds = list(seeds)
    if not variants or not seeds:
        raise ConfigError("need at least one variant and one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must differ, got {seeds}")
    if eval_epochs < 1 or eval_runs < 1:
        raise ConfigError(f"eval_epochs and eval_runs must be at least 1, got {eval_epochs} and {eval_runs}")
    base, configs = _configs(source, overrides, variants, seeds, out)
    dataset = load_dataset(base.dataset, data_dir=base.data_dir, imbalance_factor=base.imbalance_factor,
                           seed=base.data_seed, zca=base.zca, resolution=base.resolution)
    result = {"config": asdict(base), "baseline": variants[0].name, "seeds": seeds, "eval_epochs": eval_epochs,
              "eval_runs": eval_runs, "variants": {}}
    for v in variants:
        experts, experts_stage2, dtype = _experts(base, v, out, say)
        runs = []
        for seed in seeds:
            cfg = replace(configs[v.name, seed], experts=experts, experts_stage2=experts_stage2)
            runs.append({"seed": seed, **_run(cfg, dataset, eval_epochs, eval_runs, progress, say,
                                              f"{v.name} seed {seed}")})
        row = {"overrides": v.overrides, "trajectories": dtype, "runs": runs,
               "overall_mean": statistics.fmean(r["overall"] for r in runs),
               "overall_seed_std": _spread([r["overall"] for r in runs]),
               "distill_seconds_mean": statistics.fmean(r["distill_seconds"] for r in runs)}
        few = [r["few"] for r in runs if r["few"] is not None]
        row["few_mean"] = statistics.fmean(few) if few else None
        base_runs = result["variants"].get(variants[0].name, row)["runs"]
        row["delta_mean"], row["delta_std"] = _paired(runs, base_runs, "overall")
        row["few_delta_mean"], row["few_delta_std"] = _paired(runs, base_runs, "few")
        result["variants"][v.name] = row
    return result


def _pct(x, signed=False):
    return "-" if x is None else f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def format_accuracy(result):
    """One row per variant: accuracy (mean over seeds ± their std), the paired change against the baseline."""
    base = result["baseline"]
    cfg = result["config"]
    lines = [f"{cfg['dataset']} IF {cfg['imbalance_factor']:g}, ipc {cfg['ipc']}, {cfg['iterations']} iterations; "
             f"seeds {', '.join(map(str, result['seeds']))}; each set evaluated by {result['eval_runs']} network(s) "
             f"of {result['eval_epochs']} epochs",
             f"accuracy: mean over seeds ± their std; change: paired with {base} at the same seed, mean ± std",
             f"{'variant':<24} {'trajectories':>12} {'overall %':>15} {'change':>15} {'few %':>7} {'few change':>10} "
             f"{'distill s':>9}"]
    for name, row in result["variants"].items():
        overall = f"{_pct(row['overall_mean'])} ± {_pct(row['overall_seed_std'])}"
        change = "-" if name == base else f"{_pct(row['delta_mean'], True)} ± {_pct(row['delta_std'])}"
        lines.append(f"{name:<24} {row['trajectories']:>12} {overall:>15} {change:>15} {_pct(row['few_mean']):>7} "
                     f"{'-' if name == base else _pct(row['few_delta_mean'], True):>10} "
                     f"{row['distill_seconds_mean']:>9.1f}")
    return "\n".join(lines)
