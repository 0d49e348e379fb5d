"""`ltdd demo`: the whole pipeline on Digits-LT."""
from .common import device_arg


def run(args):
    from ..demo import run_demo

    run_demo(out=args.out, quick=args.quick, json_path=args.json, device=args.device, progress=not args.quiet)


def add_parser(sub):
    p = sub.add_parser("demo", help="the whole pipeline on Digits-LT (no files needed)",
                       description="Train experts on Digits-LT at imbalance factors 10 and 50 and compare the "
                                   "evaluated sets in one table.")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a smoke-test sized run")
    p.add_argument("--json", default=None, help="write {method: {imbalance_factor: {overall, many, medium, few}}, "
                                                "two_stage: {...}, grouping_analysis: [...]} (as results.json)")
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)
