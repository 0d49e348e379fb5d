"""`ltdd demo`: the whole pipeline on Digits-LT, the one real image set every machine has.

For imbalance factors 10 and 50 at IPC 10: experts (weight-balanced stage 1 + stage 2 for this method,
ordinary ones for plain matching), distillation with this method and with plain trajectory matching,
and every set evaluated under one protocol beside random real images and the whole long-tailed set.
Then, at imbalance factor 50 (METHOD section 10): flat versus two-stage classification (frequency groups,
hard and probability-weighted inference) on each synthetic set, and a grouping analysis of an expert
trained the ordinary way and of the flat networks.
Writes runs/demo/: the synthetic sets, a PNG grid of each, per-class accuracy plots, heatmaps of grouped
confusion matrices, table.txt and results.json.
"""
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .config import load_config, save_config
from .data import load_dataset
from .distill import Distiller
from .evaluate import EvalConfig, format_comparison, random_real, train_and_evaluate
from .experts import ExpertConfig, train_experts
from .files import RunLock, write_json_atomic
from .hierarchy import (confusion_matrix, expert_network, group_by_frequency, grouping_analysis, grouping_from_model,
                        model_predictions, train_two_stage)
from .plots import per_class_panels, save_grid, save_heatmap
from .trajectories import TrajectoryStore

IMBALANCE_FACTORS = (10, 50)
METHODS = ("random", "whole", "plain_tm", "ltdd")
TWO_STAGE_FACTOR = 50
TWO_STAGE_METHODS = ("random", "plain_tm", "ltdd")


@dataclass
class DemoSize:
    num_experts: int
    stage1_epochs: int
    stage2_epochs: int
    iterations: int
    eval_epochs: int
    eval_runs: int
    # two-stage runs (seeds 0..n-1), compared with the same runs of the flat evaluation; fewer than
    # eval_runs to keep the demo's time in bounds (each run trains a group and two group classifiers)
    two_stage_runs: int


FULL = DemoSize(num_experts=5, stage1_epochs=80, stage2_epochs=10, iterations=100, eval_epochs=300, eval_runs=5,
                two_stage_runs=3)
QUICK = DemoSize(num_experts=1, stage1_epochs=6, stage2_epochs=2, iterations=3, eval_epochs=20, eval_runs=1,
                 two_stage_runs=1)


def _experts(dataset, run_dir, size, width, device, progress):
    """Three trajectory sets: weight-balanced stage 1, its stage 2, and ordinary experts for plain matching."""
    common = dict(num_experts=size.num_experts, batch_size=32, width=width, device=device)
    e1 = train_experts(dataset, ExpertConfig(stage=1, epochs=size.stage1_epochs, **common), run_dir / "experts1",
                       progress=progress)
    train_experts(dataset, ExpertConfig(stage=2, epochs=size.stage2_epochs, **common), run_dir / "experts2",
                  source_dir=e1.root, progress=progress)
    # the baseline's experts are trained the ordinary way: the usual weight decay, no weight balancing
    train_experts(dataset, ExpertConfig(stage=1, epochs=size.stage1_epochs, weight_decay=5e-4, **common),
                  run_dir / "experts_plain", progress=progress)


def save_per_class_plot(reports_by_factor, path):
    per_class_panels(reports_by_factor, path, 6,
                      lambda factor: f"Digits-LT, imbalance factor {factor}, IPC 10")


def _summary(report) -> dict:
    keys = ("many", "medium", "few", "per_class_std", "head_tail_gap", "pred_kl_uniform")
    return {"overall": report.overall_mean, "overall_std": report.overall_std, **{k: getattr(report, k) for k in keys},
            "per_class": report.per_class}


def save_two_stage_plot(rows, path, factor):
    """Per-class accuracy of flat and two-stage networks, one panel per synthetic set."""
    per_class_panels(rows, path, 5, lambda method: f"{method}: flat vs two-stage, IF {factor}", title_size=9,
                      ylim=(0, 105))


def two_stage_section(dataset, sets, flat_reports, eval_config, runs, out, progress=True):
    """Flat vs two-stage (frequency groups) on each synthetic set: (table, results, seconds).

    The flat rows are the main evaluation's runs 0..runs-1, so both sides share seeds and protocol.
    """
    start = time.perf_counter()
    grouping = group_by_frequency(dataset.class_counts, eval_config.many_threshold, eval_config.few_threshold)
    rows, plot, results = [], {}, {}
    for method in TWO_STAGE_METHODS:
        images, labels, lr = sets[method]
        flat = flat_reports[method].first_runs(runs, name=f"{method} flat")
        res = train_two_stage(images, labels, dataset, replace(eval_config, lr=lr, num_runs=runs), grouping,
                              combine="hard", name=f"{method} two-stage hard", progress=progress, flat=flat)
        soft = res.by_combine["soft"]
        soft.name = f"{method} two-stage soft"
        rows += [flat, res.report, soft]
        plot[method] = {"flat": flat, "two-stage hard": res.report, "two-stage soft": soft}
        results[method] = {"flat": _summary(flat), "two_stage_hard": _summary(res.report),
                           "two_stage_soft": _summary(soft), "group_accuracy": res.group_accuracy,
                           "within_group_accuracy": res.within_group_accuracy}
    groups = ", ".join(f"{n} {g}" for n, g in zip(grouping.names, grouping.groups))
    header = (f"Digits-LT IF {dataset.imbalance_factor:g}, flat vs two-stage ({groups}); {runs} run(s), seeds "
              f"{eval_config.seed}..{eval_config.seed + runs - 1}, {eval_config.epochs} epochs per network\n"
              f"cls-std: std of per-class accuracy; gap: many minus few accuracy; KL: prediction histogram from "
              f"uniform (nats)")
    table = header + "\n" + format_comparison(rows)
    save_two_stage_plot(plot, out / f"two_stage_per_class_if{TWO_STAGE_FACTOR}.png", TWO_STAGE_FACTOR)
    seconds = time.perf_counter() - start
    return table, {"imbalance_factor": TWO_STAGE_FACTOR, "runs": runs, "grouping": grouping.to_dict(),
                   "seconds": seconds, "methods": results}, seconds


def _pct0(x):
    return "-" if x is None else f"{100 * x:.0f}"


def grouping_section(dataset, expert_dir, flat_nets, sets, out, seed=0, device="cpu"):
    """The grouping analysis (test confusion) of an expert trained the ordinary way and of the flat
    run-0 networks: (table, {"seconds", "analyses"})."""
    start = time.perf_counter()
    models = [("plain expert", *expert_network(TrajectoryStore(expert_dir), dataset, device=device), None)]
    models += [(f"{m} flat", net, f"flat run-0 network on {m}", sets[m][0]) for m, net in flat_nets.items()]
    analyses, lines = [], []
    head = f"{'model':<15} {'grouping':<10} {'groups':<34} {'inside %':>8} {'chance %':>8} {'p':>6} " \
           f"{'x->head %':>9} {'tail->head':>10} {'head->tail':>10}"
    lines.append(head)
    for label, net, desc, used in models:
        test_conf = confusion_matrix(model_predictions(net, dataset.images_test, device), dataset.labels_test,
                                     dataset.num_classes)
        for method in ("frequency", "confusion", "features"):
            grouping, _ = grouping_from_model(method, net, dataset, seed=seed, used_images=used, device=device,
                                              source=desc)
            a = grouping_analysis(test_conf, grouping, dataset.class_counts, seed=seed)
            analyses.append({"model": desc, "label": label, **a})
            if label == "plain expert":
                save_heatmap(test_conf, grouping, out / f"grouping_if{TWO_STAGE_FACTOR}_expert_{method}.png",
                             dataset.class_names, dataset.class_counts,
                             title=f"plain expert, Digits-LT IF {TWO_STAGE_FACTOR}: test confusion, {method} groups")
            groups = " ".join("{" + ",".join(map(str, g)) + "}" for g in grouping.groups)
            lines.append(f"{label:<15} {method:<10} {groups:<34} {_pct0(a['within_group_share']):>8} "
                         f"{_pct0(a['within_group_share_chance']):>8} {a['permutation_p_value']:>6.3f} "
                         f"{_pct0(a['cross_toward_head_share']):>9} {a['tail_predicted_as_head']:>10} "
                         f"{a['head_predicted_as_tail']:>10}")
    note = ("grouping analysis, Digits-LT IF 50, test confusion; groups from training data only (frequency: "
            "counts; confusion: on training images the model was not trained on, all of them for the expert; "
            "features: class means); inside %: errors inside a group, chance %: the same for errors spread "
            "uniformly, p: permutation test, x->head %: cross-group errors toward the more frequent group")
    return note + "\n" + "\n".join(lines), {"seconds": time.perf_counter() - start, "analyses": analyses}


def run_demo(out="runs/demo", quick=False, json_path=None, device="cpu", progress=True):
    with RunLock(out, "demo out"):  # one demo at a time per directory
        return _run_demo(out, quick, json_path, device, progress)


def _run_demo(out, quick, json_path, device, progress):
    size = QUICK if quick else FULL
    started = time.perf_counter()
    out = Path(out)
    results, reports, by_factor = {}, [], {}
    sections = []
    for factor in IMBALANCE_FACTORS:
        preset = load_config(f"digits-lt-if{factor}-ipc10")
        dataset = load_dataset("digits", imbalance_factor=factor, seed=preset.data_seed)
        if progress:
            print(dataset.describe(), file=sys.stderr)
        run_dir = out / f"if{factor}"
        _experts(dataset, run_dir, size, preset.width, device, progress)
        eval_config = EvalConfig(model=preset.model, epochs=size.eval_epochs, num_runs=size.eval_runs, device=device)
        sets = {"random": (*random_real(dataset, preset.ipc, seed=0), eval_config.lr),
                "whole": (dataset.images_train, dataset.labels_train, eval_config.lr)}
        for method in ("plain_tm", "ltdd"):
            config = replace(preset, method=method, iterations=size.iterations, device=device,
                             max_start_epoch=min(preset.max_start_epoch, size.stage1_epochs - preset.expert_epochs),
                             experts=str(run_dir / ("experts1" if method == "ltdd" else "experts_plain")),
                             experts_stage2=str(run_dir / "experts2"), out=str(run_dir / method))
            distiller = Distiller(config.validate(), dataset=dataset, progress=progress)
            save_config(config, run_dir / method / "config.yaml")
            distiller.run()
            sets[method] = (distiller.images.detach(), distiller.labels.detach(), float(distiller.alpha.detach()))
            save_grid(distiller.images, dataset, config.ipc, run_dir / f"{method}.png",
                      f"{method}, Digits-LT IF {factor}, IPC {config.ipc}")
        by_factor[factor], flat_nets = {}, {}
        for method in METHODS:
            images, labels, lr = sets[method]
            report, nets = train_and_evaluate(images, labels, dataset, replace(eval_config, lr=lr),
                                              name=f"{method} IF {factor}", progress=progress, return_networks=True)
            if factor == TWO_STAGE_FACTOR and method in TWO_STAGE_METHODS:
                flat_nets[method] = nets[0]
            del nets
            reports.append(report)
            by_factor[factor][method] = report
            results.setdefault(method, {})[str(factor)] = {
                "overall": report.overall_mean, "many": report.many, "medium": report.medium, "few": report.few}
        if factor == TWO_STAGE_FACTOR:
            out.mkdir(parents=True, exist_ok=True)
            table, results["two_stage"], _ = two_stage_section(dataset, sets, by_factor[factor], eval_config,
                                                               size.two_stage_runs, out, progress)
            analysis_table, results["grouping_analysis"] = grouping_section(
                dataset, run_dir / "experts_plain", flat_nets, sets, out, device=device)
            sections += [table, analysis_table]
    table = "\n\n".join([format_comparison(reports), *sections])
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(table + "\n")
    save_per_class_plot(by_factor, out / "per_class_accuracy.png")
    write_json_atomic(out / "results.json", results)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_path, results)
    if progress:
        print(f"demo finished in {time.perf_counter() - started:.0f} s (flat vs two-stage "
              f"{results['two_stage']['seconds']:.0f} s, grouping analysis "
              f"{results['grouping_analysis']['seconds']:.0f} s)", file=sys.stderr)
    return results
