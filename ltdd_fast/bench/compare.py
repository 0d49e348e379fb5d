"""`ltdd bench compare`: the two distiller families under one protocol (METHOD section 11).

For each imbalance factor and IPC: random real images, plain trajectory matching, this project's method (ltdd)
and the uni-level distiller (unilevel), each as distilled and after ADSA's soft-label calibration (random real
images have hard labels, which calibration does not apply to), each evaluated under both student losses: soft-ce
(METHOD section 9) and ce+mse (the uni-level paper's). Every row gives overall and tail accuracy (the 3 smallest
classes) and the wall time of its method's expert training and synthesis on this machine.

The trajectory side is `ltdd bench fidelity`'s: the same directory layout, experts, presets and evaluation recipe,
so a comparison run in a fidelity directory reuses its experts and its distilled sets (its evaluations are its own,
compare_*.json: fidelity's also train two-stage classifiers).
The uni-level side adds experts_debiased/ (the observer and teacher, DEBIAS below) per factor and ipcI/unilevel/
per IPC, distilled from the preset `<dataset>-lt-if<factor>-ipc<ipc>-unilevel`. Every evaluation is stored with
the settings it was made with; a rerun repeats nothing that is done.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..calibration import calibrate_labels
from ..config import PRESET_DIR, load_config, save_config
from ..errors import ConfigError
from ..evaluate import random_real
from ..files import RunLock, write_json_atomic
from ..plots import save_grid
from ..unilevel import DebiasConfig, Recovery, train_debiased
from .fidelity import HEAD_TAIL, Fidelity, _row, _say, make_plan, preset_name

METHODS = ("random", "plain_tm", "ltdd", "unilevel")
PROTOCOLS = ("soft-ce", "ce+mse")

# The debiased experts per data set (ours, measured): Fashion-MNIST's as its trajectory experts (15 epochs, width
# 32); q = 2 (on Digits-LT IF 10 the teacher's tail accuracy was 93% at q 2 against 89% at q 1).
DEBIAS = {
    "fashion-mnist": dict(epochs=15, q=2.0, batch_size=128),
    "digits": dict(epochs=60, q=2.0, batch_size=128),
}
DEBIAS["mnist"] = DEBIAS["fashion-mnist"]
QUICK_DEBIAS = dict(epochs=2, q=2.0, batch_size=256, proj_dim=16)
QUICK_UNILEVEL = ("iterations=2", "init_pool=8", "init_crops=2")


@dataclass
class ComparePlan:
    fidelity: object          # bench.fidelity.Plan: the trajectory side
    unilevel: dict            # (factor, ipc) -> UnilevelConfig
    protocols: tuple
    calibrate: bool


def make_compare_plan(dataset, factors, ipcs, out, data_dir=None, quick=False, device="cpu", seed=0,
                      protocols=PROTOCOLS, calibrate=True) -> ComparePlan:
    """Check every setting and find every preset (both families') before any work."""
    plan = make_plan(dataset, factors, ipcs, out, data_dir=data_dir, quick=quick, device=device, seed=seed,
                     two_stage=False)
    if dataset not in DEBIAS:
        raise ConfigError(f"bench compare has no debiased-expert recipe for {dataset!r}: expected one of "
                          f"{', '.join(sorted(DEBIAS))}")
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ConfigError(f"protocols must be among {', '.join(PROTOCOLS)}, got {list(protocols)}")
    unilevel = {}
    for f in plan.factors:
        for i in plan.ipcs:
            name = preset_name(dataset, f, i) + "-unilevel"
            if not (PRESET_DIR / f"{name}.yaml").is_file():
                have = sorted(p.stem for p in PRESET_DIR.glob(f"{dataset}-lt-*-unilevel.yaml"))
                raise ConfigError(f"no preset {name} for the uni-level distiller at imbalance factor {f}, IPC {i}: "
                                  f"expected one of {', '.join(have) or '(none for ' + dataset + ')'}")
            overrides = [f"device={device}", f"seed={seed}", f"eval_width={plan.recipe.eval_width}"]
            overrides += list(QUICK_UNILEVEL) if quick else []
            overrides += [f"data_dir={data_dir}"] if data_dir is not None else []
            unilevel[f, i] = load_config(name, overrides)
    return ComparePlan(plan, unilevel, tuple(protocols), calibrate)


class Comparison:
    def __init__(self, plan: ComparePlan, progress=True):
        self.plan, self.progress = plan, progress
        self.fidelity = Fidelity(plan.fidelity, progress=progress)
        self.results = {p: {} for p in plan.protocols}
        self.results["seconds"] = {}
        self.results["tau"] = {}
        self.results["calibration_warnings"] = {}

    def run(self):
        with RunLock(self.plan.fidelity.out, "bench out"):
            return self._run()

    def _debiased(self, dataset, run_dir, width):
        plan = self.plan.fidelity
        recipe = QUICK_DEBIAS if plan.quick else DEBIAS[plan.dataset]
        config = DebiasConfig(width=width, device=plan.device, seed=plan.seed, **recipe)
        _say(f"IF {dataset.imbalance_factor:g}: debiased observer and teacher ({config.epochs} epochs each)")
        _, seconds = self.fidelity._timed_stage(
            run_dir, "experts_debiased",
            lambda: train_debiased(dataset, config, run_dir / "experts_debiased", progress=self.progress))
        return seconds

    def _unilevel(self, dataset, run_dir, factor, ipc):
        ipc_dir = run_dir / f"ipc{ipc}"
        config = replace(self.plan.unilevel[factor, ipc], experts=str(run_dir / "experts_debiased"),
                         out=str(ipc_dir / "unilevel")).validate()
        _say(f"IF {factor} IPC {ipc}: distil unilevel ({config.iterations} iterations)")

        def work():
            rec = Recovery(config, dataset=dataset, progress=self.progress)
            save_config(config, Path(config.out) / "config.yaml")
            rec.run()
            return rec

        rec, seconds = self.fidelity._timed_stage(ipc_dir, "distill_unilevel", work)
        save_grid(rec.images.detach(), dataset, ipc, ipc_dir / "unilevel.png",
                  f"unilevel, {dataset.name}-LT IF {factor}, IPC {ipc}")
        return (rec.images.detach(), rec.relabel(), config.lr_eval), seconds

    def _run(self):
        fplan, r = self.plan.fidelity, self.plan.fidelity.recipe
        started = time.perf_counter()
        for factor in fplan.factors:
            dataset = self.fidelity._load(factor)
            run_dir = fplan.out / f"{fplan.dataset}-if{factor}"
            width = fplan.presets[factor, fplan.ipcs[0]].width
            experts = self.fidelity._experts(dataset, run_dir, width)
            experts["experts_debiased"] = self._debiased(dataset, run_dir, width)
            expert_seconds = {"random": 0.0, "plain_tm": experts["experts_plain"],
                              "ltdd": experts["experts1"] + experts["experts2"],
                              "unilevel": experts["experts_debiased"]}
            for ipc in fplan.ipcs:
                sets, synthesis = {}, {"random": 0.0}
                x, y = random_real(dataset, ipc, seed=fplan.seed)
                sets["random"] = (x, y, 0.01, y)
                syn_classes = torch.arange(dataset.num_classes).repeat_interleave(ipc)
                for method in ("plain_tm", "ltdd"):
                    (images, labels, lr), synthesis[method] = self.fidelity._distill(dataset, run_dir, factor, ipc,
                                                                                     method)
                    sets[method] = (images, labels, lr, syn_classes)
                (images, labels, lr), synthesis["unilevel"] = self._unilevel(dataset, run_dir, factor, ipc)
                sets["unilevel"] = (images, labels, lr, syn_classes)
                self.results["seconds"].setdefault(str(factor), {})[str(ipc)] = {
                    m: {"experts": expert_seconds[m], "synthesis": synthesis[m]} for m in METHODS}
                for method in METHODS:
                    images, labels, lr, classes = sets[method]
                    variants = [(method, labels)]
                    if self.plan.calibrate and labels.is_floating_point():
                        adjusted, summary = calibrate_labels(labels, classes, dataset.class_counts)
                        variants.append((f"{method}+calibrated", adjusted))
                        self.results["tau"].setdefault(str(factor), {}).setdefault(str(ipc), {})[method] = \
                            summary["tau"]
                        if (warning := summary["warning"]) is not None:
                            _say(f"IF {factor} IPC {ipc}: {method}'s calibration: {warning}")
                            self.results["calibration_warnings"].setdefault(str(factor), {}).setdefault(
                                str(ipc), {})[method] = warning
                    for name, lab in variants:
                        for protocol in self.plan.protocols:
                            config = replace(self.fidelity._eval_config(r.eval_runs, r.eval_epochs, lr),
                                             protocol=protocol)
                            # its own files: bench fidelity's eval_*.json hold two-stage runs as well
                            path = run_dir / f"ipc{ipc}" / f"compare_{name.replace('+', '_')}_{protocol}.json"
                            flat, _, stored = self.fidelity._evaluate(
                                path, f"{name} IF {factor} IPC {ipc} ({protocol})", images, lab, dataset, config,
                                two_stage=False, made_with={"method": method, "ipc": ipc}, classes=classes)
                            row = _row(flat, stored["flat_seconds"])
                            self.results[protocol].setdefault(name, {}).setdefault(str(factor), {})[str(ipc)] = row
        self.results["settings"] = {"dataset": fplan.dataset, "imbalance_factors": fplan.factors,
                                    "ipcs": fplan.ipcs, "quick": fplan.quick, "seed": fplan.seed,
                                    "device": fplan.device, "eval": {"runs": r.eval_runs, "epochs": r.eval_epochs,
                                                                     "width": r.eval_width},
                                    "debiased_experts": QUICK_DEBIAS if fplan.quick else DEBIAS[fplan.dataset],
                                    "head_tail_classes": HEAD_TAIL, "protocols": list(self.plan.protocols)}
        self.results["run_seconds"] = time.perf_counter() - started
        out = fplan.out
        (out / "compare.txt").write_text(format_compare(self.results) + "\n")
        write_json_atomic(out / "compare.json", self.results)
        return self.results


def _pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def format_compare(results) -> str:
    s = results["settings"]
    protocols = s["protocols"]
    lines = [f"{s['dataset']}-LT, seed {s['seed']}: every set evaluated by {s['eval']['runs']} networks of "
             f"{s['eval']['epochs']} epochs (ConvNet, width {s['eval']['width']}) under each protocol; tail: the "
             f"{s['head_tail_classes']} smallest classes; seconds: expert training and synthesis on this machine."]
    header = f"{'method':<22}" + "".join(f" {p + ' overall':>22} {p + ' tail':>20}" for p in protocols)
    header += f" {'experts s':>9} {'synth s':>8}"
    first = results[protocols[0]]
    for factor in (str(f) for f in s["imbalance_factors"]):
        for ipc in (str(i) for i in s["ipcs"]):
            lines += ["", f"IF {factor}, IPC {ipc}", header]
            for name in first:
                row = first[name].get(factor, {}).get(ipc)
                if row is None:
                    continue
                method = name.split("+")[0]
                cells = ""
                for p in protocols:
                    r = results[p].get(name, {}).get(factor, {}).get(ipc)
                    cells += (f" {_pct(r['overall']) + ' ± ' + _pct(r['overall_std']):>22}"
                              f" {_pct(r['tail']) + ' ± ' + _pct(r['tail_std']):>20}") if r else f" {'-':>22} {'-':>20}"
                sec = results["seconds"][factor][ipc][method]
                lines.append(f"{name:<22}{cells} {sec['experts']:>9.0f} {sec['synthesis']:>8.0f}")
            for method, warning in results.get("calibration_warnings", {}).get(factor, {}).get(ipc, {}).items():
                lines.append(f"  {method}+calibrated: {warning}")
    return "\n".join(lines)
