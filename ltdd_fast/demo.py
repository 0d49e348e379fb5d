"""`ltdd demo`: the pipeline on Digits-LT, the one real image set every machine has.

For each imbalance factor: stage-1 and stage-2 experts, then every set evaluated under the same protocol,
all in one table. Distillation (this method and plain trajectory matching) joins the table with the
method issue; until then the table holds the baselines it will be compared against.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .data import load_dataset
from .evaluate import EvalConfig, format_comparison, random_real, train_and_evaluate
from .experts import ExpertConfig, train_experts
from .trajectories import write_json_atomic

IMBALANCE_FACTORS = (10, 50)
IPC = 10


@dataclass
class DemoSize:
    num_experts: int
    stage1_epochs: int
    stage2_epochs: int
    eval_epochs: int
    eval_runs: int


FULL = DemoSize(num_experts=5, stage1_epochs=30, stage2_epochs=10, eval_epochs=300, eval_runs=5)
QUICK = DemoSize(num_experts=1, stage1_epochs=5, stage2_epochs=2, eval_epochs=20, eval_runs=1)


def run_demo(out="runs/demo", quick=False, json_path=None, device="cpu", progress=True):
    size = QUICK if quick else FULL
    out = Path(out)
    results, reports = {}, []
    for factor in IMBALANCE_FACTORS:
        dataset = load_dataset("digits", imbalance_factor=factor, seed=0)
        if progress:
            print(dataset.describe(), file=sys.stderr)
        run_dir = out / f"if{factor}"
        # Digits-LT has a few hundred images: small batches give the experts enough steps per epoch
        stage1 = ExpertConfig(stage=1, num_experts=size.num_experts, epochs=size.stage1_epochs, batch_size=32,
                              device=device)
        train_experts(dataset, stage1, run_dir / "experts1", progress=progress)
        stage2 = ExpertConfig(stage=2, num_experts=size.num_experts, epochs=size.stage2_epochs, batch_size=32,
                              device=device)
        train_experts(dataset, stage2, run_dir / "experts2", source_dir=run_dir / "experts1", progress=progress)
        eval_config = EvalConfig(epochs=size.eval_epochs, num_runs=size.eval_runs, device=device)
        sets = {
            "random": (*random_real(dataset, IPC, seed=0), f"random ipc {IPC}, IF {factor}"),
            "whole": (dataset.images_train, dataset.labels_train, f"whole set, IF {factor}"),
        }
        for method, (images, labels, name) in sets.items():
            report = train_and_evaluate(images, labels, dataset, eval_config, name=name, progress=progress)
            reports.append(report)
            results.setdefault(method, {})[str(factor)] = {
                "overall": report.overall_mean, "many": report.many, "medium": report.medium, "few": report.few}
    table = format_comparison(reports)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(table + "\n")
    write_json_atomic(out / "results.json", results)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_path, results)
    return results
