"""Which part of the uni-level distiller costs or gains what: one data set, one IPC, the same debiased experts.

    python bench/unilevel_ablation.py --preset fashion-mnist-lt-if100-ipc10-unilevel --experts DIR --json OUT

Rows (every set evaluated by the preset's evaluation network, `--runs` seeds, soft-ce):
  random real, hard labels      ipc random real images per class (the baseline)
  + teacher labels              the same images, relabelled by the teacher
  multi-round init, hard        the initialisation's crops, hard labels
  multi-round init, teacher     ... relabelled
  real + recovery, hard         random real images, then the recovery
  full method                   multi-round init, recovery, teacher labels (method=unilevel as shipped)
"""
import argparse
import json
import tempfile
import time
from dataclasses import replace

from ltdd_fast.config import load_config
from ltdd_fast.evaluate import EvalConfig, train_and_evaluate
from ltdd_fast.unilevel import Recovery


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--experts", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    base = load_config(args.preset, [f"experts={args.experts}"])
    rows, dataset = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        def made(name, **changes):
            nonlocal dataset
            rec = Recovery(replace(base, out=f"{tmp}/{name}", **changes).validate(), dataset=dataset, progress=False)
            dataset = rec.dataset
            start = time.perf_counter()
            rec.run()
            return rec, time.perf_counter() - start

        real, _ = made("real", init="real", iterations=0)
        init, _ = made("init", iterations=0)
        recovered, _ = made("recovered", init="real")
        full, seconds = made("full")
        sets = {"random real, hard labels": (real.images, real.classes),
                "random real, teacher labels": (real.images, real.relabel()),
                "multi-round init, hard labels": (init.images, init.classes),
                "multi-round init, teacher labels": (init.images, init.relabel()),
                "random real + recovery, hard labels": (recovered.images, recovered.classes),
                "full method": (full.images, full.relabel())}
        config = EvalConfig(model=base.eval_model, width=base.eval_width, epochs=base.eval_epochs, num_runs=args.runs,
                            lr=base.lr_eval, seed=base.seed)
        for name, (images, labels) in sets.items():
            report = train_and_evaluate(images.detach(), labels, dataset, config, name=name, progress=False)
            tail = sorted(range(dataset.num_classes), key=lambda c: dataset.class_counts[c])[:3]
            rows[name] = {"overall": report.overall_mean, "overall_std": report.overall_std,
                          "tail": sum(report.per_class[c] for c in tail) / 3}
            print(f"{name:<40} {100 * report.overall_mean:6.2f} ± {100 * report.overall_std:.2f}   tail "
                  f"{100 * rows[name]['tail']:6.2f}", flush=True)
    with open(args.json, "w") as f:
        json.dump({"preset": args.preset, "settings": {k: v for k, v in vars(base).items()},
                   "eval": {"runs": args.runs, "epochs": base.eval_epochs, "width": base.eval_width},
                   "synthesis_seconds_full": seconds, "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
