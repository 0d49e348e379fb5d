"""`ltdd bench`: the fast path against its references (ops, e2e, memory) and what options cost in accuracy or
against the baselines (accuracy, fidelity)."""
import argparse

from ..errors import ConfigError
from ..files import write_json_atomic
from .common import Parser, device_arg, natural_int, positive_int, say


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmark the fast path against its references: operators, whole iterations, "
                                     "memory, and what options cost in accuracy",
                       description="Check the fast path against its PyTorch reference, then measure both in the same "
                                   "run and print the ratio (ops, e2e, memory), or what a speed or memory option costs "
                                   "in distilled accuracy (accuracy).")
    what = p.add_subparsers(dest="what", metavar="WHAT", parser_class=Parser)
    what.required = True
    o = what.add_parser("ops", help="one row per operator and size: reference_s, fast_s, speedup")
    o.add_argument("--device", type=device_arg, default="cpu")
    o.add_argument("--backend", default="native", help="native (C++/CUDA) or triton")
    o.add_argument("--quick", action="store_true", help="the smallest sizes, few repeats")
    o.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per measurement (median)")
    o.add_argument("--op", action="append", default=None, help="only this operator (repeatable)")
    o.add_argument("--json", default=None, help="write the rows as a JSON list here")
    o.set_defaults(run=run_ops)
    for name, helptext, run in (
            ("e2e", "whole iterations of a preset: reference_it_s, fast_it_s, speedup, peak bytes, grad_cosine",
             run_e2e),
            ("memory", "peak memory of one iteration at several syn_steps, fast and reference, a process each",
             run_memory)):
        e = what.add_parser(name, help=helptext)
        e.add_argument("--preset", required=True, help="cifar10-lt-ipc10, cifar100-lt-ipc50, tiny-lt-ipc10, "
                                                       "imagenet-lt-ipc10, imagenet-lt-ipc50 (or a distill preset)")
        e.add_argument("--device", type=device_arg, default="cpu")
        e.add_argument("--backend", default="auto", help="the fast path's operators: auto, native or triton")
        e.add_argument("--students", type=positive_int, default=1, help="K students per phase, advanced together")
        e.add_argument("--second-pass", default="exact", help="exact (reverse over reverse), forward (forward over reverse) or fd (finite differences)")
        e.add_argument("--chunk", type=positive_int, default=None, help="split minibatches into chunks of this many images")
        e.add_argument("--precision", default="full", help="full or bf16 (the student's network)")
        e.add_argument("--compile", default=None, metavar="MODE",
                       help="torch.compile each step's student terms: default, reduce-overhead (and CUDA graphs) or "
                            "max-autotune (none: eager, the default)")
        e.add_argument("--cudnn-benchmark", action="store_true",
                       help="the fast path lets cuDNN time its convolution algorithms and keep the fastest (CUDA)")
        e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a preset setting, e.g. --set batch_syn=50 (repeatable)")
        e.add_argument("--quick", action="store_true", help="2 steps per phase, batch 8, ipc 1 (for CI)")
        e.add_argument("--json", default=None, help="write the result as JSON here")
        if name == "e2e":
            e.add_argument("--iterations", type=positive_int, default=3, help="timed iterations of each path (median)")
            e.add_argument("--profile", type=natural_int, default=0, metavar="N",
                           help="also list the N operators that take most of one fast iteration (torch.profiler)")
        else:
            e.add_argument("--syn-steps", type=positive_int, nargs="+", default=[10, 80], help="the syn_steps to measure")
            e.add_argument("--ipc", type=positive_int, nargs="+", default=[10, 50],
                           help="a -unilevel preset: the IPCs at which one recovery gradient is measured, the whole "
                                "set in one pass and --chunk (default 100) images a pass (its experts: --set "
                                "experts=DIR)")
        e.set_defaults(run=run)
    a = what.add_parser("accuracy", help="what speed and memory options cost in distilled accuracy",
                        description="Distil one data set from the same experts once per variant and seed, evaluate "
                                    "every set under one protocol, and print each variant's accuracy and its paired "
                                    "change against the first variant. A rerun with the same --out continues.")
    a.add_argument("--config", required=True, help="a distill preset (e.g. digits-lt-if50-ipc10) or a YAML file")
    a.add_argument("overrides", nargs="*", metavar="key=value", help="override a setting for every variant")
    a.add_argument("--variant", action="append", default=None, metavar="V",
                   help="full, bf16, fp16-trajectories, bf16+fp16-trajectories, fd, or NAME:key=value,... "
                        "(distill settings; trajectories=float16 stores the experts in half precision); "
                        "repeatable, the first is the baseline (default: full bf16 fp16-trajectories fd)")
    a.add_argument("--seeds", type=natural_int, nargs="+", default=[0, 1, 2], help="distillation seeds (default 0 1 2)")
    a.add_argument("--eval-epochs", type=positive_int, default=300)
    a.add_argument("--eval-runs", type=positive_int, default=3, help="networks trained per synthetic set")
    a.add_argument("--out", default="runs/bench-accuracy", help="every run's directory (resumable)")
    a.add_argument("--json", default=None, help="write the result as JSON here")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(run=run_accuracy)
    f = what.add_parser("fidelity", help="this method against plain matching, random real images and the whole "
                                         "long-tailed set, at several imbalance factors and IPCs",
                        description="Train the experts, distil with this method and with plain trajectory matching "
                                    "(presets DATASET-lt-ifF-ipcI), and evaluate those sets beside random real "
                                    "images and the whole long-tailed set under one protocol, flat and two-stage. "
                                    "Every stage keeps its output under --out, so a rerun continues where the last "
                                    "one stopped.")
    f.add_argument("--dataset", required=True, help="fashion-mnist, mnist or digits")
    f.add_argument("--data-dir", default=None, help="the data set's files (fashion-mnist: default Debian's folder)")
    f.add_argument("--imbalance-factors", type=positive_int, nargs="+", required=True, metavar="F")
    f.add_argument("--ipc", type=positive_int, nargs="+", required=True, metavar="I", help="images per class")
    f.add_argument("--out", required=True, help="every stage's output (resumable)")
    f.add_argument("--json", default=None, help="also write the results (as out/results.json) here")
    f.add_argument("--quick", action="store_true", help="every stage at a size that only shows the pipeline works "
                                                        "(a smaller set, tiny experts and evaluations: for CI)")
    f.add_argument("--seed", type=natural_int, default=0)
    f.add_argument("--two-stage", action=argparse.BooleanOptionalAction, default=True,
                   help="also train two-stage classifiers on every set (default); --no-two-stage: flat only")
    f.add_argument("--device", type=device_arg, default="cpu")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(run=run_fidelity)
    c = what.add_parser("compare", help="both distiller families (ltdd, plain_tm; unilevel) and random real images, "
                                        "each raw and calibrated, under both evaluation protocols",
                        description="The trajectory side of `bench fidelity` (same --out layout: its experts and "
                                    "distilled sets are reused) beside the uni-level distiller (debiased experts, "
                                    "presets DATASET-lt-ifF-ipcI-unilevel); every set raw and after ADSA "
                                    "calibration, evaluated with soft-ce and ce+mse. Resumable.")
    c.add_argument("--dataset", required=True, help="fashion-mnist, mnist or digits")
    c.add_argument("--data-dir", default=None, help="the data set's files (fashion-mnist: default Debian's folder)")
    c.add_argument("--imbalance-factors", type=positive_int, nargs="+", required=True, metavar="F")
    c.add_argument("--ipc", type=positive_int, nargs="+", required=True, metavar="I", help="images per class")
    c.add_argument("--protocols", nargs="+", default=["soft-ce", "ce+mse"], help="soft-ce and/or ce+mse")
    c.add_argument("--no-calibration", action="store_true", help="skip the calibrated variants")
    c.add_argument("--out", required=True, help="every stage's output (resumable; a bench fidelity --out works)")
    c.add_argument("--json", default=None, help="also write the results (as out/compare.json) here")
    c.add_argument("--quick", action="store_true", help="every stage at a size that only shows it works (CI)")
    c.add_argument("--seed", type=natural_int, default=0)
    c.add_argument("--device", type=device_arg, default="cpu")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(run=run_compare)


def run_ops(args):
    from ..bench.operators import bench_ops, format_rows

    rows = bench_ops(device=args.device, backend=args.backend, quick=args.quick, repeats=args.repeats,
                     only=args.op)
    print(format_rows(rows))
    if args.json:
        write_json_atomic(args.json, rows)


def e2e_options(args):
    from ..bench.e2e import Options
    from ..config import check_matching_options

    if args.backend not in ("auto", "native", "triton"):
        raise ConfigError(f"--backend must be auto, native or triton, got {args.backend!r}")
    if args.compile == "none":
        args.compile = None
    check_matching_options("cli", second_pass=args.second_pass, precision=args.precision, compile=args.compile)
    return Options(backend=args.backend, students=args.students, second_pass=args.second_pass, chunk=args.chunk,
                   precision=args.precision, compile=args.compile, cudnn_benchmark=args.cudnn_benchmark)


def run_e2e(args):
    from ..bench.e2e import bench_e2e, format_e2e

    row = bench_e2e(args.preset, device=args.device, iterations=args.iterations, options=e2e_options(args),
                    overrides=args.set, quick=args.quick, progress=say, profile=args.profile)
    print(format_e2e(row))
    if args.json:
        write_json_atomic(args.json, row)


def run_memory(args):
    from ..bench.e2e import bench_memory, format_memory

    if args.preset.endswith("-unilevel"):  # the uni-level distiller: one recovery gradient at each IPC
        from ..bench.recovery import bench_recovery_memory, format_recovery_memory

        result = bench_recovery_memory(args.preset, ipcs=args.ipc, chunk=args.chunk or 100, overrides=args.set,
                                       device=args.device, progress=say)
        print(format_recovery_memory(result))
        if args.json:
            write_json_atomic(args.json, result)
        return
    result = bench_memory(args.preset, device=args.device, syn_steps=args.syn_steps, options=e2e_options(args),
                          overrides=args.set, quick=args.quick, progress=say)
    print(format_memory(result))
    if args.json:
        write_json_atomic(args.json, result)


def run_accuracy(args):
    from ..bench.accuracy import DEFAULT_VARIANTS, bench_accuracy, format_accuracy

    result = bench_accuracy(args.config, args.overrides, variants=args.variant or DEFAULT_VARIANTS, seeds=args.seeds,
                            eval_epochs=args.eval_epochs, eval_runs=args.eval_runs, out=args.out,
                            progress=not args.quiet, say=say)
    print(format_accuracy(result))
    if args.json:
        write_json_atomic(args.json, result)


def run_fidelity(args):
    from ..bench.fidelity import Fidelity, format_fidelity, make_plan

    plan = make_plan(args.dataset, args.imbalance_factors, args.ipc, args.out, data_dir=args.data_dir,
                     quick=args.quick, device=args.device, seed=args.seed, two_stage=args.two_stage)
    results = Fidelity(plan, progress=not args.quiet).run()
    print(format_fidelity(results))
    if args.json:
        write_json_atomic(args.json, results)


def run_compare(args):
    from ..bench.compare import Comparison, format_compare, make_compare_plan

    plan = make_compare_plan(args.dataset, args.imbalance_factors, args.ipc, args.out, data_dir=args.data_dir,
                             quick=args.quick, device=args.device, seed=args.seed, protocols=tuple(args.protocols),
                             calibrate=not args.no_calibration)
    results = Comparison(plan, progress=not args.quiet).run()
    print(format_compare(results))
    if args.json:
        write_json_atomic(args.json, results)
