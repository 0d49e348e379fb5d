"""`ltdd demo`: the whole pipeline on Digits-LT, the one real image set every machine has.

For imbalance factors 10 and 50 at IPC 10: experts (weight-balanced stage 1 + stage 2 for this method,
ordinary ones for plain matching), distillation with this method and with plain trajectory matching,
and every set evaluated under one protocol beside random real images and the whole long-tailed set.
Writes runs/demo/: the synthetic sets, a PNG grid of each, a per-class accuracy plot, table and JSON.
"""
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from .config import load_config, save_config
from .data import load_dataset
from .distill import Distiller
from .evaluate import EvalConfig, format_comparison, random_real, train_and_evaluate
from .experts import ExpertConfig, train_experts
from .trajectories import write_json_atomic

IMBALANCE_FACTORS = (10, 50)
METHODS = ("random", "whole", "plain_tm", "ltdd")


@dataclass
class DemoSize:
    num_experts: int
    stage1_epochs: int
    stage2_epochs: int
    iterations: int
    eval_epochs: int
    eval_runs: int


FULL = DemoSize(num_experts=5, stage1_epochs=80, stage2_epochs=10, iterations=100, eval_epochs=300, eval_runs=5)
QUICK = DemoSize(num_experts=1, stage1_epochs=6, stage2_epochs=2, iterations=3, eval_epochs=20, eval_runs=1)


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


def save_grid(images, dataset, ipc, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = dataset.denormalize(images.detach().cpu()).permute(0, 2, 3, 1).numpy()
    rows = dataset.num_classes
    fig, axes = plt.subplots(rows, ipc, figsize=(ipc * 0.6, rows * 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.imshow(pixels[i].squeeze(-1) if pixels.shape[-1] == 1 else pixels[i], cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if i % ipc == 0:
            ax.set_ylabel(f"{dataset.class_names[i // ipc]}\n({dataset.class_counts[i // ipc]})", fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def save_per_class_plot(reports_by_factor, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports_by_factor), figsize=(6 * len(reports_by_factor), 3.5), squeeze=False)
    for ax, (factor, reports) in zip(axes.flat, reports_by_factor.items()):
        width = 0.8 / len(reports)
        for j, (method, report) in enumerate(reports.items()):
            xs = [c + (j - len(reports) / 2 + 0.5) * width for c in range(len(report.per_class))]
            ax.bar(xs, [100 * (a or 0) for a in report.per_class], width, label=method)
        counts = next(iter(reports.values())).class_counts
        ax.set_xticks(range(len(counts)), [f"{c}\n({n})" for c, n in enumerate(counts)], fontsize=7)
        ax.set_xlabel("class (training images)")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"Digits-LT, imbalance factor {factor}, IPC 10")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(out="runs/demo", quick=False, json_path=None, device="cpu", progress=True):
    size = QUICK if quick else FULL
    out = Path(out)
    results, reports, by_factor = {}, [], {}
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
        by_factor[factor] = {}
        for method in METHODS:
            images, labels, lr = sets[method]
            report = train_and_evaluate(images, labels, dataset, replace(eval_config, lr=lr),
                                        name=f"{method} IF {factor}", progress=progress)
            reports.append(report)
            by_factor[factor][method] = report
            results.setdefault(method, {})[str(factor)] = {
                "overall": report.overall_mean, "many": report.many, "medium": report.medium, "few": report.few}
    table = format_comparison(reports)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(table + "\n")
    save_per_class_plot(by_factor, out / "per_class_accuracy.png")
    write_json_atomic(out / "results.json", results)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_path, results)
    return results
