"""`ltdd distill`: distil a long-tailed set from expert trajectories (resumable)."""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

from .. import distributed
from ..errors import ConfigError
from ..files import write_json_atomic


def run(args):
    from ..config import list_presets, load_config, save_config
    from ..distill import Distiller

    if args.list_presets:
        print("\n".join(list_presets()))
        return
    if args.config is None:
        raise ConfigError("--config PRESET_OR_FILE is required (ltdd distill --list-presets shows the presets)")
    overrides = list(args.overrides) + ([f"memory_budget={args.memory_budget}"] if args.memory_budget else [])
    config = load_config(args.config, overrides)
    world = distributed.init(config.device)  # under torchrun: NCCL for device=cuda, Gloo for the CPU
    config = replace(config, device=distributed.rank_device(config.device))  # torchrun: cuda:LOCAL_RANK
    if config.method == "unilevel":
        from ..unilevel import Recovery
        distiller = Recovery(config, progress=not args.quiet)
    else:
        distiller = Distiller(config, progress=not args.quiet)
        if args.quiet and distiller.plan is not None:
            print(distiller.plan.describe(), file=sys.stderr)
    if world.main:
        save_config(config, Path(config.out) / "config.yaml")
    if distiller.iteration and world.main:
        print(f"resuming {config.out} at iteration {distiller.iteration}", file=sys.stderr)
    path = distiller.run()
    print(f"synthetic set: {path} (alpha {float(distiller.alpha.detach()):.4g}, {distiller.iteration} iterations)")
    if args.evaluate:
        report = distiller.evaluate()
        print(report.format_table())
        if world.main:
            write_json_atomic(Path(config.out) / "eval.json", report.to_dict())


def add_parser(sub):
    p = sub.add_parser("distill", help="distil a long-tailed set from expert trajectories or debiased experts",
                       description="Distil with DAM + Expert Decoupling (method=ltdd), plain trajectory "
                                   "matching (method=plain_tm), or uni-level statistics matching with relabelling "
                                   "(method=unilevel, from `ltdd experts --recipe debiased`). Settings come from a "
                                   "preset or YAML file, then key=value overrides; a rerun with the same out "
                                   "continues from its checkpoint.")
    p.add_argument("--config", default=None, help="a preset name (see --list-presets) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any setting, e.g. ipc=20 device=cuda")
    p.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the result (eval_epochs, eval_runs) and write eval.json")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="fit each iteration into SIZE (e.g. 24GB): chooses batch_chunk (and, for trajectory "
                        "matching, precision) and says so")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
