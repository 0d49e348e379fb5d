"""`ltdd bench fidelity`: this method against plain trajectory matching, random real images and the whole
long-tailed set, at several imbalance factors and IPCs, every set evaluated under one protocol.

For each imbalance factor: experts (weight-balanced stage 1 and its stage 2 for this method, ordinary stage-1
experts for plain matching), then for each IPC a distillation with each method from the preset
`<dataset>-lt-if<factor>-ipc<ipc>`, then the evaluation of every set: flat networks (`eval_runs` seeds) and the
two-stage classifier (rank groups: the 3 largest classes, the middle, the 3 smallest; `two_stage_runs` seeds).
The whole long-tailed set is trained once per factor, with its own epoch count (it has thousands of images where
the synthetic sets have tens).

Every stage keeps its output under `out/<dataset>-if<factor>/`: the trajectory stores, each distillation's
directory (checkpoint and synthetic set), and one JSON per evaluation, which records the settings it was made
with and its wall time. A rerun continues where the last one stopped and repeats nothing that is done.

The recipe (experts, evaluation) is ours, sized for a 2-core CPU; the presets say which distillation settings
are ours. Beside the many/medium/few split (more than 100, fewer than 20 training images) every row has head and
tail by rank (the 3 largest and 3 smallest classes), since with thousands of images per class the few-shot group
is empty.
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..config import PRESET_DIR, load_config, save_config
from ..data import load_dataset
from ..distill import Distiller
from ..errors import ConfigError, DataError
from ..evaluate import EvalConfig, EvalReport, random_real, rank_split, train_and_evaluate
from ..experts import ExpertConfig, train_experts
from ..files import RunLock, read_json, write_json_atomic
from ..hierarchy import group_by_rank, train_two_stage
from ..plots import per_class_panels, save_grid

METHODS = ("random", "whole", "plain_tm", "ltdd")
SYNTHETIC = ("random", "plain_tm", "ltdd")   # the sets of IPC images per class (two-stage runs on these)
HEAD_TAIL = 3                                # classes in the head and in the tail by rank


@dataclass(frozen=True)
class Recipe:
    """What a comparison trains besides the distillation (the presets hold that): experts and evaluation."""
    num_experts: int
    stage1_epochs: int
    stage2_epochs: int
    expert_batch: int
    eval_width: int        # the evaluation networks' width
    eval_epochs: int       # per network trained on a set of IPC images per class
    eval_runs: int
    two_stage_runs: int
    whole_epochs: int      # per network trained on the whole long-tailed set
    whole_runs: int
    iterations: int | None = None   # None: the preset's


RECIPES = {
    # Fashion-MNIST: 28x28 as published (the presets' measured choice: ConvNet-3 of width 32 everywhere; at width 32
    # an expert epoch takes 5 s at IF 100, a 300-epoch evaluation of 100 images 10 s). Batch 64: on this CPU it
    # trains better per second than 256 (after 4 epochs at IF 100: 56% against 44% test accuracy, in less time).
    "fashion-mnist": Recipe(num_experts=5, stage1_epochs=15, stage2_epochs=5, expert_batch=64, eval_width=32,
                            eval_epochs=300, eval_runs=5, two_stage_runs=3, whole_epochs=10, whole_runs=3),
    # Digits: the demo's recipe
    "digits": Recipe(num_experts=5, stage1_epochs=80, stage2_epochs=10, expert_batch=32, eval_width=128,
                     eval_epochs=300, eval_runs=5, two_stage_runs=3, whole_epochs=300, whole_runs=5),
}
RECIPES["mnist"] = RECIPES["fashion-mnist"]
# --quick: every stage runs, at a size that only shows the pipeline works (under 3 minutes on 2 cores)
QUICK = Recipe(num_experts=1, stage1_epochs=3, stage2_epochs=2, expert_batch=256, eval_width=16, eval_epochs=4,
               eval_runs=2, two_stage_runs=1, whole_epochs=1, whole_runs=1, iterations=2)
QUICK_DISTILL = ("syn_steps=2", "syn_steps_classifier=2", "batch_syn=10", "max_start_epoch=1", "width=16")
QUICK_TRAIN_LIMIT = 3000   # --quick trains on at most this many images of the long-tailed set (a seeded subset)


def preset_name(dataset: str, factor: int, ipc: int) -> str:
    return f"{dataset}-lt-if{factor}-ipc{ipc}"


def _int_list(values, what):
    out = []
    for v in values:
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ConfigError(f"{what} must be whole numbers >= 1, got {v!r}")
        out.append(int(v))
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"{what} must be a non-empty list without repeats, got {list(values)!r}")
    return out


@dataclass
class Plan:
    dataset: str
    data_dir: str | None
    factors: list
    ipcs: list
    out: Path
    recipe: Recipe
    quick: bool
    device: str
    seed: int
    presets: dict   # (factor, ipc) -> DistillConfig
    two_stage: bool = True  # also train the two-stage classifiers on every set


def make_plan(dataset, factors, ipcs, out, data_dir=None, quick=False, device="cpu", seed=0, two_stage=True) -> Plan:
    """Check every setting and find every preset before any work; a missing preset names those there are."""
    factors, ipcs = _int_list(factors, "imbalance factors"), _int_list(ipcs, "IPCs")
    if dataset not in RECIPES:
        raise ConfigError(f"bench fidelity has no recipe for data set {dataset!r}: expected one of "
                          f"{', '.join(sorted(RECIPES))}")
    presets = {}
    for f in factors:
        for i in ipcs:
            name = preset_name(dataset, f, i)
            if not (PRESET_DIR / f"{name}.yaml").is_file():
                have = sorted(p.stem for p in PRESET_DIR.glob(f"{dataset}-lt-*.yaml") if "unilevel" not in p.stem)
                raise ConfigError(f"no preset {name} for imbalance factor {f} at IPC {i}: expected one of "
                                  f"{', '.join(have) or '(none for ' + dataset + ')'}")
            overrides = [f"device={device}", f"seed={seed}"] + (list(QUICK_DISTILL) if quick else [])
            if data_dir is not None:
                overrides.append(f"data_dir={data_dir}")
            presets[f, i] = cfg = load_config(name, overrides)
            if cfg.dataset != dataset or cfg.imbalance_factor != f or cfg.ipc != i:
                raise ConfigError(f"preset {name} is for {cfg.dataset} at imbalance factor {cfg.imbalance_factor:g} "
                                  f"and IPC {cfg.ipc}: expected {dataset}, {f} and {i}")
    recipe = QUICK if quick else RECIPES[dataset]
    for name, cfg in ((preset_name(dataset, f, i), c) for (f, i), c in presets.items()):
        if cfg.expert_epochs > min(recipe.stage2_epochs, recipe.stage1_epochs - 1 - cfg.min_start_epoch):
            raise ConfigError(f"preset {name} matches {cfg.expert_epochs} expert epochs from start epoch "
                              f"{cfg.min_start_epoch}, more than the recipe's experts have ({recipe.stage1_epochs} "
                              f"stage-1, {recipe.stage2_epochs} stage-2 epochs)")
    return Plan(dataset=dataset, data_dir=data_dir, factors=factors, ipcs=ipcs, out=Path(out), recipe=recipe,
                quick=quick, device=device, seed=seed, presets=presets, two_stage=two_stage)


def _say(text):
    print(f"... {text}", file=sys.stderr, flush=True)


def _cached(path: Path, key: dict):
    """The stored result at path if it was made with these settings, else None."""
    if path.is_file():
        try:
            stored = read_json(path, "stored result")
        except DataError:
            return None  # damaged: made again
        if isinstance(stored, dict) and stored.get("key") == key:
            return stored
    return None


def _fingerprint(images, labels) -> str:
    """sha256 of a set's images and labels: an evaluation is reused only for exactly the set it was made on."""
    h = hashlib.sha256()
    for t in (images, labels):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _row(report: EvalReport, seconds: float) -> dict:
    """The JSON row of one evaluation: overall, the many/medium/few split, head and tail by rank, seconds."""
    ranks = rank_split(report.run_per_class, report.class_counts, HEAD_TAIL)
    return {"overall": report.overall_mean, "overall_std": report.overall_std, "many": report.many,
            "medium": report.medium, "few": report.few, "head": ranks["head"], "tail": ranks["tail"],
            "tail_std": ranks["tail_std"], "seconds": seconds, "runs": len(report.run_accuracies),
            "per_class": report.per_class}


class Fidelity:
    """One comparison; run() does every stage that is not yet done and returns the results."""

    def __init__(self, plan: Plan, progress=True):
        self.plan, self.progress = plan, progress
        self.results = {m: {} for m in METHODS}
        self.results["two_stage"] = {m: {} for m in SYNTHETIC}
        self.results["stage_seconds"] = {}
        self.reports = {}   # (factor, ipc) -> {label: EvalReport}: the per-class plot's panels

    # ---- stages ------------------------------------------------------------------------------------------

    def _load(self, factor):
        plan = self.plan
        cfg = plan.presets[factor, plan.ipcs[0]]
        dataset = load_dataset(plan.dataset, data_dir=plan.data_dir, imbalance_factor=factor, seed=cfg.data_seed,
                               zca=cfg.zca, resolution=cfg.resolution)
        if plan.quick:
            dataset = _subsample(dataset, QUICK_TRAIN_LIMIT, plan.seed)
        if self.progress:
            print(dataset.describe(), file=sys.stderr)
        return dataset

    def _timed_stage(self, run_dir: Path, name: str, work):
        """Run work() and add its seconds to run_dir/stage_seconds.json[name] (kept across reruns)."""
        path = run_dir / "stage_seconds.json"
        seconds = read_json(path, "stage-time record") if path.is_file() else {}
        start = time.perf_counter()
        result = work()
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, seconds)
        return result, seconds[name]

    def _experts(self, dataset, run_dir, width):
        r, device, seed = self.plan.recipe, self.plan.device, self.plan.seed
        common = dict(num_experts=r.num_experts, batch_size=r.expert_batch, width=width, device=device, seed=seed)
        jobs = [("experts1", ExpertConfig(stage=1, epochs=r.stage1_epochs, **common), None),
                ("experts2", ExpertConfig(stage=2, epochs=r.stage2_epochs, **common), run_dir / "experts1"),
                # plain matching's experts are trained the ordinary way: the usual weight decay, no weight balancing
                ("experts_plain", ExpertConfig(stage=1, epochs=r.stage1_epochs, weight_decay=5e-4, **common), None)]
        seconds = {}
        for name, config, source in jobs:
            _say(f"IF {dataset.imbalance_factor:g}: {name} ({config.num_experts} x {config.epochs} epochs)")
            _, seconds[name] = self._timed_stage(
                run_dir, name, lambda: train_experts(dataset, config, run_dir / name, source_dir=source,
                                                     progress=self.progress))
        return seconds

    def _distill(self, dataset, run_dir, factor, ipc, method):
        plan, r = self.plan, self.plan.recipe
        preset = plan.presets[factor, ipc]
        ipc_dir = run_dir / f"ipc{ipc}"
        config = replace(preset, method=method, iterations=r.iterations or preset.iterations,
                         max_start_epoch=min(preset.max_start_epoch, r.stage1_epochs - preset.expert_epochs + 1),
                         experts=str(run_dir / ("experts1" if method == "ltdd" else "experts_plain")),
                         experts_stage2=str(run_dir / "experts2"), out=str(ipc_dir / method)).validate()
        _say(f"IF {factor} IPC {ipc}: distil {method} ({config.iterations} iterations)")

        def work():
            distiller = Distiller(config, dataset=dataset, progress=self.progress)
            save_config(config, Path(config.out) / "config.yaml")
            distiller.run()
            return distiller

        distiller, seconds = self._timed_stage(ipc_dir, f"distill_{method}", work)
        save_grid(distiller.images, dataset, ipc, ipc_dir / f"{method}.png",
                  f"{method}, {dataset.name}-LT IF {factor}, IPC {ipc}")
        return (distiller.images.detach(), distiller.labels.detach(), float(distiller.alpha.detach())), seconds

    def _eval_config(self, runs, epochs, lr):
        r = self.plan.recipe
        cfg = self.plan.presets[self.plan.factors[0], self.plan.ipcs[0]]
        return EvalConfig(model=cfg.model, width=r.eval_width, epochs=epochs, num_runs=runs, lr=lr,
                          seed=self.plan.seed, device=self.plan.device)

    def _evaluate(self, path: Path, label: str, images, labels, dataset, config: EvalConfig, two_stage: bool,
                  made_with: dict, classes=None):
        """The flat report (and the two-stage one) of a set, from path when it was made with these settings.
        classes: each image's class (the ce+mse protocol's hard label)."""
        settings = {k: v for k, v in asdict(config).items() if k != "device"}
        if config.protocol == "soft-ce":  # the key of every evaluation stored before the protocols existed
            for k in ("protocol", "ce_weight", "mse_weight"):
                settings.pop(k)
        key = {"eval": settings,
               "set": {**made_with, "sha256": _fingerprint(images, labels)},
               "two_stage_runs": self.plan.recipe.two_stage_runs if two_stage else 0}
        stored = _cached(path, key)
        if stored is not None:
            _say(f"{label}: evaluated before ({path})")
            flat = EvalReport(**{k: v for k, v in stored["flat"].items() if k != "std_ddof"})
            two = stored.get("two_stage")
            return flat, (EvalReport(**{k: v for k, v in two.items() if k != "std_ddof"}) if two else None), stored
        _say(f"{label}: {config.num_runs} network(s) of {config.epochs} epochs"
             + (f", then {self.plan.recipe.two_stage_runs} two-stage classifier(s)" if two_stage else ""))
        start = time.perf_counter()
        flat = train_and_evaluate(images, labels, dataset, config, name=label, progress=self.progress,
                                  classes=classes if config.protocol != "soft-ce" else None)
        flat_seconds = time.perf_counter() - start
        two, two_seconds = None, None
        if two_stage:

            runs = min(self.plan.recipe.two_stage_runs, config.num_runs)
            start = time.perf_counter()
            res = train_two_stage(images, labels, dataset, replace(config, num_runs=runs),
                                  group_by_rank(dataset.class_counts, HEAD_TAIL), combine="hard",
                                  name=f"{label} two-stage", progress=self.progress,
                                  flat=flat.first_runs(runs, name=f"{label} flat"))
            two, two_seconds = res.report, time.perf_counter() - start
        stored = {"key": key, "flat": flat.to_dict(), "flat_seconds": flat_seconds,
                  "two_stage": two.to_dict() if two else None, "two_stage_seconds": two_seconds}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, stored)
        return flat, two, stored

    # ---- the run -----------------------------------------------------------------------------------------

    def run(self):
        with RunLock(self.plan.out, "bench out"):  # one comparison at a time per directory
            return self._run()

    def _run(self):
        plan, r = self.plan, self.plan.recipe
        started = time.perf_counter()
        for factor in plan.factors:
            dataset = self._load(factor)
            run_dir = plan.out / f"{plan.dataset}-if{factor}"
            width = plan.presets[factor, plan.ipcs[0]].width
            expert_seconds = self._experts(dataset, run_dir, width)
            whole_cfg = self._eval_config(r.whole_runs, r.whole_epochs, 0.01)
            whole, _, whole_stored = self._evaluate(run_dir / "eval_whole.json", f"whole IF {factor}",
                                                    dataset.images_train, dataset.labels_train, dataset, whole_cfg,
                                                    two_stage=False, made_with={"whole": len(dataset.labels_train)})
            stage_seconds = {**expert_seconds, "eval_whole": whole_stored["flat_seconds"]}
            for ipc in plan.ipcs:
                sets, seconds = {}, {}
                x, y = random_real(dataset, ipc, seed=plan.seed)
                sets["random"], seconds["random"] = (x, y, 0.01), 0.0
                save_grid(x, dataset, ipc, run_dir / f"ipc{ipc}" / "random.png",
                          f"random real, {dataset.name}-LT IF {factor}, IPC {ipc}", classes=y.tolist())
                for method in ("plain_tm", "ltdd"):
                    sets[method], seconds[method] = self._distill(dataset, run_dir, factor, ipc, method)
                    stage_seconds[f"ipc{ipc}_distill_{method}"] = seconds[method]
                # each method's row counts the experts it needs
                seconds["ltdd"] += expert_seconds["experts1"] + expert_seconds["experts2"]
                seconds["plain_tm"] += expert_seconds["experts_plain"]
                reports = {"whole": whole}
                self._put("whole", None, factor, ipc, whole, whole_stored["flat_seconds"])
                for method in SYNTHETIC:
                    images, labels, lr = sets[method]
                    made_with = {"method": method, "ipc": ipc}
                    flat, two, stored = self._evaluate(run_dir / f"ipc{ipc}" / f"eval_{method}.json",
                                                       f"{method} IF {factor} IPC {ipc}", images, labels, dataset,
                                                       self._eval_config(r.eval_runs, r.eval_epochs, lr),
                                                       two_stage=plan.two_stage, made_with=made_with)
                    stage_seconds[f"ipc{ipc}_eval_{method}"] = stored["flat_seconds"] + (stored["two_stage_seconds"] or 0)
                    self._put(method, two, factor, ipc, flat, seconds[method] + stored["flat_seconds"],
                              stored["two_stage_seconds"])
                    reports[method] = flat
                    if two is not None:
                        reports[f"{method} two-stage"] = two
                self.reports[factor, ipc] = reports
            self.results["stage_seconds"][str(factor)] = stage_seconds
        self.results["settings"] = self._settings()
        self.results["verdicts"] = verdicts(self.results)
        self.results["run_seconds"] = time.perf_counter() - started   # this invocation's, resumed stages aside
        self._write()
        return self.results

    def _put(self, method, two, factor, ipc, flat, seconds, two_seconds=None):
        self.results[method].setdefault(str(factor), {})[str(ipc)] = _row(flat, seconds)
        if two is not None:
            self.results["two_stage"][method].setdefault(str(factor), {})[str(ipc)] = _row(two, two_seconds)

    def _settings(self):
        plan = self.plan
        return {"dataset": plan.dataset, "imbalance_factors": plan.factors, "ipcs": plan.ipcs, "quick": plan.quick,
                "device": plan.device, "seed": plan.seed, "recipe": asdict(plan.recipe), "head_tail_classes": HEAD_TAIL,
                "two_stage": plan.two_stage,
                "presets": {f"{f}/{i}": asdict(c) for (f, i), c in plan.presets.items()}}

    def _write(self):
        out = self.plan.out
        out.mkdir(parents=True, exist_ok=True)
        table = format_fidelity(self.results)
        (out / "table.txt").write_text(table + "\n")
        write_json_atomic(out / "results.json", self.results)
        panels = {k: {m: rep for m, rep in reps.items() if "two-stage" not in m} for k, reps in self.reports.items()}
        per_class_panels(panels, out / "per_class_accuracy.png", 6,
                         lambda k: f"{self.plan.dataset}-LT, IF {k[0]}, IPC {k[1]}")


def _subsample(dataset, limit, seed):
    """A seeded subset of at most `limit` training images with the same class proportions (for --quick)."""
    n = len(dataset.labels_train)
    if n <= limit:
        return dataset
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(dataset.num_classes):
        idx = torch.nonzero(dataset.labels_train == c).flatten()
        take = max(1, round(len(idx) * limit / n))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:take]])
    keep = torch.cat(keep).sort().values
    return replace(dataset, images_train=dataset.images_train[keep], labels_train=dataset.labels_train[keep],
                   notes=dataset.notes + [f"--quick: {len(keep)} of the {n} long-tailed training images"])


def verdicts(results) -> list:
    """The issue's comparisons, per factor and IPC: this method's margin over plain matching and random images,
    overall and on the tail, against twice the larger of the two stds over evaluation runs."""
    out = []
    for factor, by_ipc in results["ltdd"].items():
        for ipc, ours in by_ipc.items():
            for base in ("plain_tm", "random"):
                theirs = results[base].get(factor, {}).get(ipc)
                if theirs is None:
                    continue
                for what, std in (("overall", "overall_std"), ("tail", "tail_std")):
                    if ours[what] is None or theirs[what] is None:
                        continue
                    margin = ours[what] - theirs[what]
                    noise = 2 * max(ours[std] or 0.0, theirs[std] or 0.0)
                    out.append({"factor": int(factor), "ipc": int(ipc), "against": base, "on": what, "margin": margin,
                                "two_std": noise, "beats": margin > noise})
            whole = results["whole"].get(factor, {}).get(ipc)
            if whole is not None:
                out.append({"factor": int(factor), "ipc": int(ipc), "against": "whole", "on": "overall",
                            "margin": ours["overall"] - whole["overall"], "two_std": None,
                            "beats": ours["overall"] > whole["overall"]})
    return out


def _pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def format_fidelity(results) -> str:
    """One block per factor and IPC: every method's row (flat, then two-stage), then the verdicts."""
    s = results.get("settings", {})
    r = s.get("recipe", {})
    lines = [f"{s.get('dataset')}-LT, seed {s.get('seed')}: {r.get('num_experts')} experts of {r.get('stage1_epochs')} "
             f"(stage 1) and {r.get('stage2_epochs')} (stage 2) epochs; each set evaluated by {r.get('eval_runs')} "
             f"networks of {r.get('eval_epochs')} epochs (width {r.get('eval_width')}), the whole set by "
             f"{r.get('whole_runs')} of {r.get('whole_epochs')} epochs; two-stage: {r.get('two_stage_runs')} runs, "
             f"rank groups. head/tail: the {s.get('head_tail_classes')} largest / smallest classes. seconds: wall "
             f"time of the row's experts, distillation and evaluation."]
    header = (f"{'method':<20} {'overall %':>15} {'many':>6} {'medium':>6} {'few':>6} {'head':>6} "
              f"{'tail %':>14} {'seconds':>8}")
    for factor, by_ipc in results["ltdd"].items():
        for ipc in by_ipc:
            lines += ["", f"IF {factor}, IPC {ipc}", header]
            rows = [(m, results[m].get(factor, {}).get(ipc)) for m in METHODS]
            rows += [(f"{m} two-stage", results["two_stage"][m].get(factor, {}).get(ipc)) for m in SYNTHETIC]
            for name, row in rows:
                if row is None:
                    continue
                seconds = "-" if row["seconds"] is None else f"{row['seconds']:.0f}"
                lines.append(f"{name:<20} {_pct(row['overall']) + ' ± ' + _pct(row['overall_std']):>15} "
                             f"{_pct(row['many']):>6} {_pct(row['medium']):>6} {_pct(row['few']):>6} "
                             f"{_pct(row['head']):>6} {_pct(row['tail']) + ' ± ' + _pct(row['tail_std']):>14} "
                             f"{seconds:>8}")
            for v in results.get("verdicts", []):
                if str(v["factor"]) == factor and str(v["ipc"]) == ipc:
                    bound = "" if v["two_std"] is None else f" (2 std {100 * v['two_std']:.2f})"
                    word = "beats" if v["beats"] else "does not beat"
                    lines.append(f"  ltdd {word} {v['against']} on {v['on']}: {100 * v['margin']:+.2f} points{bound}")
    return "\n".join(lines)
