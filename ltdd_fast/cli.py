"""The `ltdd` command: experts -> (distill) -> eval, and the demo that runs them all on Digits-LT.

User errors (LTDDError) print one line on stderr and exit with status 2; nothing already written is lost,
because every step writes its outputs atomically and experts are kept one by one.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

from .checks import check_device
from .errors import ConfigError, DataError, LTDDError
from .files import check_output_dir, check_output_file


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and status 2) like every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number_type(kind, low, low_open=False):
    """An argparse type: a finite `kind` of at least `low` (above it if low_open); a bad value is one line."""
    want = f"{'an integer' if kind is int else 'a finite number'} {'above' if low_open else 'of at least'} {low}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} value"
    return parse


_positive_int = _number_type(int, 1)
_natural_int = _number_type(int, 0)
_positive_float = _number_type(float, 0, low_open=True)
_nonneg_float = _number_type(float, 0)
_factor = _number_type(float, 1)


def _device(text):
    try:
        return check_device(text, "--device")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device ")) from None


def _add_data_args(p, required=True):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=required, default=None,
                   help="digits, mnist, fashion-mnist, cifar10, cifar100, tiny or imagenet-lt")
    g.add_argument("--data-dir", default=None, help="directory holding the data set's files (all but digits; "
                   "mnist and fashion-mnist default to where Debian's package puts them)")
    g.add_argument("--imbalance-factor", type=_factor, default=None,
                   help="n_head / n_tail of the long-tailed training set (1 = balanced; default 1)")
    g.add_argument("--data-seed", type=_natural_int, default=None, help="seed of the long-tailed subsampling (default 0)")
    g.add_argument("--resolution", type=_positive_int, default=None, help="resize images to this side length")
    g.add_argument("--zca", action=argparse.BooleanOptionalAction, default=None,
                   help="ZCA whitening (default: on for CIFAR and Tiny, off otherwise)")


def _load_data(args, defaults=None):
    """The data set named by the arguments; values left unset come from `defaults` (a manifest or synset)."""
    from .data import load_dataset

    defaults = defaults or {}
    name = args.dataset or defaults.get("dataset")
    if name is None:
        raise ConfigError("--dataset is required")
    factor = args.imbalance_factor if args.imbalance_factor is not None else defaults.get("imbalance_factor", 1.0)
    zca = args.zca if args.zca is not None else defaults.get("zca")
    resolution = args.resolution
    if resolution is None and "im_size" in defaults:
        resolution = defaults["im_size"][0]
    data_dir = args.data_dir
    if data_dir is None and defaults.get("data_dir") and name == defaults.get("dataset"):
        data_dir = defaults["data_dir"]
        if not Path(data_dir).is_dir():
            raise DataError(f"the {name} files were read from {data_dir} (as {defaults.get('_source', 'the run')} "
                            f"records), which is gone: give --data-dir with their new place")
    dataset = load_dataset(name, data_dir=data_dir, imbalance_factor=factor,
                           seed=args.data_seed if args.data_seed is not None else defaults.get("data_seed", 0),
                           zca=zca, resolution=resolution)
    if not args.quiet:
        print(dataset.describe(), file=sys.stderr)
    return dataset


def _write_json(path, obj):
    from .files import write_json_atomic

    write_json_atomic(path, obj)


# ---- ltdd experts ---------------------------------------------------------------------------------------

def _cmd_experts(args):
    from .experts import ExpertConfig, train_experts
    from .trajectories import TrajectoryStore

    defaults = None
    if args.source:
        defaults = dict(TrajectoryStore(args.source).manifest, _source=f"{Path(args.source) / 'manifest.json'}")
    if args.stage == 2 and defaults is None:
        raise ConfigError("stage 2 needs the stage-1 trajectories it starts from: --from DIR")
    model = args.model or (defaults["model"] if defaults else "convnet")
    width = args.width if args.width is not None else (defaults.get("width", 128) if defaults else 128)
    config = ExpertConfig(stage=args.stage, num_experts=args.num_experts, epochs=args.epochs, lr=args.lr,
                          momentum=args.momentum, weight_decay=args.weight_decay, batch_size=args.batch_size,
                          model=model, width=width, dsa=not args.no_dsa, sam=args.sam, sam_rho=args.sam_rho,
                          gsam_alpha=args.gsam_alpha, max_norm=args.max_norm, dtype=args.dtype, seed=args.seed,
                          device=args.device)
    dataset = _load_data(args, defaults)
    store = train_experts(dataset, config, args.out, source_dir=args.source, progress=not args.quiet)
    accs = [store.manifest["experts"].get(str(i), {}).get("test_acc") for i in store.completed()]
    accs = [a for a in accs if isinstance(a, (int, float))]
    mean = f" (mean test accuracy {100 * sum(accs) / len(accs):.1f}%)" if accs else ""
    print(f"{len(store)} stage-{args.stage} experts in {args.out}{mean}")


def _experts_parser(sub):
    p = sub.add_parser("experts", help="train expert trajectories (stage 1: whole network; stage 2: classifier)",
                       description="Train expert trajectories on a long-tailed set. A rerun with the same --out "
                                   "continues at the first unfinished expert.")
    _add_data_args(p, required=False)
    p.add_argument("--stage", type=int, choices=(1, 2), default=1)
    p.add_argument("--from", dest="source", default=None,
                   help="stage 2: the stage-1 trajectory directory (its data settings are reused)")
    p.add_argument("--out", required=True, help="directory for the trajectories and manifest.json")
    p.add_argument("--num-experts", type=_positive_int, default=5)
    p.add_argument("--epochs", type=_positive_int, default=None, help="default 50 (stage 1) or 10 (stage 2)")
    p.add_argument("--model", default=None, help="convnet (default), convnet1..5, vgg11, resnet18, alexnet")
    p.add_argument("--width", type=_positive_int, default=None, help="network width (default 128)")
    p.add_argument("--lr", type=_positive_float, default=0.01)
    p.add_argument("--momentum", type=_nonneg_float, default=0.0)
    p.add_argument("--weight-decay", type=_nonneg_float, default=None, help="default 5e-3 (stage 1) or 0 (stage 2)")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--no-dsa", action="store_true", help="train without DSA augmentation")
    p.add_argument("--sam", default="none", help="none, sam or gsam (sharpness-aware steps)")
    p.add_argument("--sam-rho", type=_nonneg_float, default=0.01)
    p.add_argument("--gsam-alpha", type=_nonneg_float, default=0.3)
    p.add_argument("--max-norm", type=_positive_float, default=None, help="stage 2: classifier row max-norm (e.g. 0.1)")
    p.add_argument("--dtype", default="float32", help="stored trajectory dtype: float32 or float16")
    _add_run_args(p)
    p.set_defaults(run=_cmd_experts)


# ---- ltdd eval ------------------------------------------------------------------------------------------

def _check_eval_args(args):
    """Usage mistakes of eval/groups, caught before any data is loaded."""
    if args.few_threshold > args.many_threshold:
        raise ConfigError(f"--few-threshold ({args.few_threshold}) must not exceed --many-threshold "
                          f"({args.many_threshold})")


def _check_grouping_args(method, num_groups, option):
    if num_groups is not None and method == "frequency":
        raise ConfigError(f"--num-groups does not apply to {option} frequency (its groups come from "
                          f"--many-threshold and --few-threshold); use {option} confusion or features")
    if num_groups is not None and num_groups < 2:
        raise ConfigError(f"--num-groups must be at least 2, got {num_groups}")


def _training_set(args, extra_defaults=None):
    """(dataset, images, labels, name, lr) of --synset, --random-ipc or --whole."""
    from .evaluate import random_real
    from .synset import check_synset_compatible, load_synset

    record = load_synset(args.synset) if args.synset else None
    defaults = extra_defaults
    if record is not None:
        defaults = {"dataset": record["dataset"], "imbalance_factor": record["imbalance_factor"],
                    "zca": record["zca"] is not None, "im_size": record["im_size"],
                    "data_seed": record.get("data_seed", 0)}
    dataset = _load_data(args, defaults)
    if record is not None:
        check_synset_compatible(record, dataset, args.synset)
        images, labels, name = record["images"], record["labels"], f"synset {args.synset}"
        lr = args.lr if args.lr is not None else record["lr"]
    elif args.random_ipc is not None:
        images, labels = random_real(dataset, args.random_ipc, seed=args.seed)
        name, lr = f"random ipc {args.random_ipc}", args.lr if args.lr is not None else 0.01
    elif getattr(args, "whole", False):
        images, labels, name = dataset.images_train, dataset.labels_train, "whole"
        lr = args.lr if args.lr is not None else 0.01
    else:
        return dataset, None, None, None, None
    return dataset, images, labels, name, lr


def _eval_config(args, lr, num_runs):
    from .evaluate import EvalConfig

    return EvalConfig(model=args.model, width=args.width, epochs=args.epochs, num_runs=num_runs, batch_size=args.batch_size,
                      lr=lr, momentum=args.momentum, weight_decay=args.weight_decay, dsa=not args.no_dsa,
                      seed=args.seed, device=args.device, many_threshold=args.many_threshold,
                      few_threshold=args.few_threshold)


def _cmd_eval(args):
    from .evaluate import train_and_evaluate

    _check_eval_args(args)
    if not args.two_stage:
        given = [o for o, v in (("--groups", args.groups), ("--num-groups", args.num_groups),
                                ("--combine", args.combine), ("--group-labels", args.group_labels)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --two-stage")
    groups = args.groups or "frequency"
    _check_grouping_args(groups, args.num_groups, "--groups")
    dataset, images, labels, name, lr = _training_set(args)
    config = _eval_config(args, lr, args.num_runs)
    if not args.two_stage:
        report = train_and_evaluate(images, labels, dataset, config, name=name, progress=not args.quiet)
        print(report.format_table())
        if args.json:
            _write_json(args.json, report.to_dict())
        return
    from .hierarchy import evaluate_flat_and_two_stage

    result = evaluate_flat_and_two_stage(images, labels, dataset, config, groups=groups, num_groups=args.num_groups,
                                         combine=args.combine or "hard", name=name,
                                         soft_group_labels=args.group_labels == "soft", progress=not args.quiet)
    print(result.flat.format_table())
    print()
    print(result.report.format_table())
    print()
    print(result.format())
    if args.json:
        _write_json(args.json, result.to_dict())


def _add_train_args(p, num_runs=True):
    g = p.add_argument_group("training (the evaluation protocol)")
    g.add_argument("--model", default="convnet")
    g.add_argument("--width", type=_positive_int, default=128, help="network width (default 128, the field's protocol)")
    g.add_argument("--epochs", type=_positive_int, default=300)
    if num_runs:
        g.add_argument("--num-runs", type=_positive_int, default=5)
    g.add_argument("--batch-size", type=_positive_int, default=256)
    g.add_argument("--lr", type=_positive_float, default=None, help="default: the synthetic set's learned lr, else 0.01")
    g.add_argument("--momentum", type=_nonneg_float, default=0.9)
    g.add_argument("--weight-decay", type=_nonneg_float, default=5e-4)
    g.add_argument("--no-dsa", action="store_true")
    p.add_argument("--many-threshold", type=_natural_int, default=100,
                   help="many-shot (head): more training images than this")
    p.add_argument("--few-threshold", type=_natural_int, default=20, help="few-shot (tail): fewer training images than this")


def _eval_parser(sub):
    p = sub.add_parser("eval", help="train fresh networks on a set of images and report test accuracy",
                       description="Train fresh networks on a synthetic set, random real images or the whole "
                                   "long-tailed set; report mean/std accuracy, per class, many/medium/few and the "
                                   "inter-class bias (per-class std, head-tail gap, prediction KL from uniform). "
                                   "--two-stage also trains a group classifier and one classifier per group on "
                                   "the same set and compares it with the flat networks.")
    _add_data_args(p, required=False)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--synset", default=None, help="a synthetic-set file written by ltdd distill")
    which.add_argument("--random-ipc", type=_positive_int, default=None, help="baseline: this many random real images per class")
    which.add_argument("--whole", action="store_true", help="baseline: the whole long-tailed training set")
    _add_train_args(p)
    h = p.add_argument_group("two-stage classification")
    h.add_argument("--two-stage", action="store_true",
                   help="flat and two-stage (group, then class inside the group) on the same set")
    h.add_argument("--groups", choices=("frequency", "confusion", "features"), default=None,
                   help="frequency (default): head/medium/tail by the thresholds; confusion or features: "
                        "clusters from the flat run-0 network (its confusion on training images it was not "
                        "trained on, or its class-mean features; never the test set)")
    h.add_argument("--num-groups", type=_positive_int, default=None,
                   help="confusion/features: this many groups (default: chosen by eigengap or silhouette)")
    h.add_argument("--combine", choices=("hard", "soft"), default=None,
                   help="hard (default): the class inside the most likely group; soft: argmax p(group) * "
                        "p(class | group)")
    h.add_argument("--group-labels", choices=("hard", "soft"), default=None,
                   help="the group classifier's targets: hard (default) the group of each image's class; soft: "
                        "a soft label's probability mass per group")
    p.add_argument("--json", default=None, help="write the report as JSON here (two-stage: its report, the flat "
                                                "one under \"flat\")")
    _add_run_args(p)
    p.set_defaults(run=_cmd_eval)


# ---- ltdd groups ----------------------------------------------------------------------------------------

def _cmd_groups(args):
    from .hierarchy import (
        confusion_matrix, expert_network, format_analysis, grouping_analysis, grouping_from_model,
        model_predictions, save_heatmap,
    )

    _check_eval_args(args)
    _check_grouping_args(args.method, args.num_groups, "--method")
    if args.cluster_on is not None and args.method == "frequency":
        raise ConfigError("--cluster-on applies to --method confusion or features only")
    if args.experts is None and (args.expert_index is not None or args.expert_epoch is not None):
        raise ConfigError("--expert-index and --expert-epoch need --experts DIR")
    store = None
    if args.experts is not None:
        from .trajectories import TrajectoryStore

        store = TrajectoryStore(args.experts)
    dataset, images, labels, name, lr = _training_set(args, store.manifest if store else None)
    if store is not None:
        net, model = expert_network(store, dataset, args.expert_index, args.expert_epoch, args.device)
        used = None  # an expert was trained on the whole training set
    else:
        from .evaluate import train_and_evaluate

        config = _eval_config(args, lr, 1)
        _, nets = train_and_evaluate(images, labels, dataset, config, name=name, progress=not args.quiet,
                                     return_networks=True)
        net, model, used = nets[0], f"flat network trained on {name} (seed {args.seed}, {args.epochs} epochs)", images
    cluster_on = args.cluster_on or "train"
    grouping, _ = grouping_from_model(args.method, net, dataset, args.num_groups, args.many_threshold,
                                      args.few_threshold, seed=args.seed, used_images=used, cluster_on=cluster_on,
                                      device=args.device, source=model)
    test_conf = confusion_matrix(model_predictions(net, dataset.images_test, args.device), dataset.labels_test,
                                 dataset.num_classes)
    circular = args.method == "confusion" and cluster_on == "test"
    analysis = grouping_analysis(test_conf, grouping, dataset.class_counts, args.many_threshold, args.few_threshold,
                                 seed=args.seed, circular=circular)
    analysis = {"model": model, "dataset": dataset.name, "imbalance_factor": float(dataset.imbalance_factor),
                "cluster_on": None if args.method == "frequency" else cluster_on, **analysis}
    print(format_analysis(analysis, title=f"{model}: test confusion"))
    if args.json:
        _write_json(args.json, analysis)
    if args.png:
        save_heatmap(test_conf, grouping, args.png, dataset.class_names, dataset.class_counts,
                     title=f"{dataset.name} IF {dataset.imbalance_factor:g}: test confusion by {args.method} groups")


def _groups_parser(sub):
    p = sub.add_parser("groups", help="grouping analysis: how a model's errors sit inside and across class groups",
                       description="Group the classes by frequency or by clustering a model's confusion or "
                                   "class-mean features, then measure on the test confusion the share of errors "
                                   "inside groups against chance and the direction of cross-group errors (the "
                                   "grouping hypothesis). The model is an expert (--experts) or a network trained "
                                   "on --synset / --random-ipc / --whole.")
    _add_data_args(p, required=False)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--synset", default=None, help="train a network on this synthetic set")
    which.add_argument("--random-ipc", type=_positive_int, default=None, help="train a network on this many random images per class")
    which.add_argument("--whole", action="store_true", help="train a network on the whole long-tailed training set")
    which.add_argument("--experts", default=None, help="a trajectory directory: analyse one expert as it is")
    p.add_argument("--expert-index", type=_natural_int, default=None, help="which expert (default: the first complete one)")
    p.add_argument("--expert-epoch", type=_natural_int, default=None, help="which snapshot (default: the last)")
    p.add_argument("--method", choices=("frequency", "confusion", "features"), default="frequency",
                   help="frequency: head/medium/tail by the thresholds; confusion: spectral clustering of the "
                        "symmetrised confusion; features: k-means of class-mean features")
    p.add_argument("--num-groups", type=_positive_int, default=None,
                   help="confusion/features: this many groups (default: chosen by eigengap or silhouette)")
    p.add_argument("--cluster-on", choices=("train", "test"), default=None,
                   help="confusion/features: cluster on the training images (default; for a network on a set, "
                        "those not in the set) or on the test images (a diagnosis: circular for confusion)")
    _add_train_args(p, num_runs=False)
    p.add_argument("--json", default=None, help="write the analysis as JSON here")
    p.add_argument("--png", default=None, help="write a heatmap of the test confusion, ordered by group, here")
    _add_run_args(p)
    p.set_defaults(run=_cmd_groups)


# ---- ltdd distill ---------------------------------------------------------------------------------------

def _cmd_distill(args):
    from .config import list_presets, load_config, save_config
    from .distill import Distiller

    if args.list_presets:
        print("\n".join(list_presets()))
        return
    if args.config is None:
        raise ConfigError("--config PRESET_OR_FILE is required (ltdd distill --list-presets shows the presets)")
    overrides = list(args.overrides) + ([f"memory_budget={args.memory_budget}"] if args.memory_budget else [])
    config = load_config(args.config, overrides)
    distiller = Distiller(config, progress=not args.quiet)
    if args.quiet and distiller.plan is not None:
        print(distiller.plan.describe(), file=sys.stderr)
    save_config(config, Path(config.out) / "config.yaml")
    if distiller.iteration:
        print(f"resuming {config.out} at iteration {distiller.iteration}", file=sys.stderr)
    path = distiller.run()
    print(f"synthetic set: {path} (alpha {float(distiller.alpha.detach()):.4g}, {distiller.iteration} iterations)")
    if args.evaluate:
        report = distiller.evaluate()
        print(report.format_table())
        _write_json(Path(config.out) / "eval.json", report.to_dict())


def _distill_parser(sub):
    p = sub.add_parser("distill", help="distil a long-tailed set from expert trajectories",
                       description="Distil with DAM + Expert Decoupling (method=ltdd) or plain trajectory "
                                   "matching (method=plain_tm). Settings come from a preset or YAML file, then "
                                   "key=value overrides; a rerun with the same out continues from its checkpoint.")
    p.add_argument("--config", default=None, help="a preset name (see --list-presets) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any setting, e.g. ipc=20 device=cuda")
    p.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the result (eval_epochs, eval_runs) and write eval.json")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="fit each iteration into SIZE (e.g. 24GB): chooses batch_chunk and precision and says so")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_distill)


# ---- ltdd bench ------------------------------------------------------------------------------------------

def _cmd_bench(args):
    from .bench import bench_ops, format_rows

    rows = bench_ops(device=args.device, backend=args.backend, quick=args.quick, repeats=args.repeats,
                     only=args.op)
    print(format_rows(rows))
    if args.json:
        _write_json(args.json, rows)


def _bench_parser(sub):
    p = sub.add_parser("bench", help="benchmark the fast path against its references: operators, whole iterations, "
                                     "memory, and what options cost in accuracy",
                       description="Check the fast path against its PyTorch reference, then measure both in the same "
                                   "run and print the ratio (ops, e2e, memory), or what a speed or memory option costs "
                                   "in distilled accuracy (accuracy).")
    what = p.add_subparsers(dest="what", metavar="WHAT", parser_class=_Parser)
    what.required = True
    o = what.add_parser("ops", help="one row per operator and size: reference_s, fast_s, speedup")
    o.add_argument("--device", type=_device, default="cpu")
    o.add_argument("--backend", default="native", help="native (C++/CUDA) or triton")
    o.add_argument("--quick", action="store_true", help="the smallest sizes, few repeats")
    o.add_argument("--repeats", type=_positive_int, default=None, help="timed repeats per measurement (median)")
    o.add_argument("--op", action="append", default=None, help="only this operator (repeatable)")
    o.add_argument("--json", default=None, help="write the rows as a JSON list here")
    o.set_defaults(run=_cmd_bench)
    for name, helptext, run in (
            ("e2e", "whole iterations of a preset: reference_it_s, fast_it_s, speedup, peak bytes, grad_cosine",
             _cmd_bench_e2e),
            ("memory", "peak memory of one iteration at several syn_steps, fast and reference, a process each",
             _cmd_bench_memory)):
        e = what.add_parser(name, help=helptext)
        e.add_argument("--preset", required=True, help="cifar10-lt-ipc10, cifar100-lt-ipc50, tiny-lt-ipc10, "
                                                       "imagenet-lt-ipc10, imagenet-lt-ipc50 (or a distill preset)")
        e.add_argument("--device", type=_device, default="cpu")
        e.add_argument("--backend", default="auto", help="the fast path's operators: auto, native or triton")
        e.add_argument("--students", type=_positive_int, default=1, help="K students per phase, advanced together")
        e.add_argument("--second-pass", default="exact", help="exact (reverse over reverse), forward (forward over reverse) or fd (finite differences)")
        e.add_argument("--chunk", type=_positive_int, default=None, help="split minibatches into chunks of this many images")
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
            e.add_argument("--iterations", type=_positive_int, default=3, help="timed iterations of each path (median)")
            e.add_argument("--profile", type=_natural_int, default=0, metavar="N",
                           help="also list the N operators that take most of one fast iteration (torch.profiler)")
        else:
            e.add_argument("--syn-steps", type=_positive_int, nargs="+", default=[10, 80], help="the syn_steps to measure")
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
    a.add_argument("--seeds", type=_natural_int, nargs="+", default=[0, 1, 2], help="distillation seeds (default 0 1 2)")
    a.add_argument("--eval-epochs", type=_positive_int, default=300)
    a.add_argument("--eval-runs", type=_positive_int, default=3, help="networks trained per synthetic set")
    a.add_argument("--out", default="runs/bench-accuracy", help="every run's directory (resumable)")
    a.add_argument("--json", default=None, help="write the result as JSON here")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(run=_cmd_bench_accuracy)
    f = what.add_parser("fidelity", help="this method against plain matching, random real images and the whole "
                                         "long-tailed set, at several imbalance factors and IPCs",
                        description="Train the experts, distil with this method and with plain trajectory matching "
                                    "(presets DATASET-lt-ifF-ipcI), and evaluate those sets beside random real "
                                    "images and the whole long-tailed set under one protocol, flat and two-stage. "
                                    "Every stage keeps its output under --out, so a rerun continues where the last "
                                    "one stopped.")
    f.add_argument("--dataset", required=True, help="fashion-mnist, mnist or digits")
    f.add_argument("--data-dir", default=None, help="the data set's files (fashion-mnist: default Debian's folder)")
    f.add_argument("--imbalance-factors", type=_positive_int, nargs="+", required=True, metavar="F")
    f.add_argument("--ipc", type=_positive_int, nargs="+", required=True, metavar="I", help="images per class")
    f.add_argument("--out", required=True, help="every stage's output (resumable)")
    f.add_argument("--json", default=None, help="also write the results (as out/results.json) here")
    f.add_argument("--quick", action="store_true", help="every stage at a size that only shows the pipeline works "
                                                        "(a smaller set, tiny experts and evaluations: for CI)")
    f.add_argument("--seed", type=_natural_int, default=0)
    f.add_argument("--two-stage", action=argparse.BooleanOptionalAction, default=True,
                   help="also train two-stage classifiers on every set (default); --no-two-stage: flat only")
    f.add_argument("--device", type=_device, default="cpu")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(run=_cmd_bench_fidelity)


def _cmd_bench_fidelity(args):
    from .bench_fidelity import Fidelity, format_fidelity, make_plan

    plan = make_plan(args.dataset, args.imbalance_factors, args.ipc, args.out, data_dir=args.data_dir,
                     quick=args.quick, device=args.device, seed=args.seed, two_stage=args.two_stage)
    results = Fidelity(plan, progress=not args.quiet).run()
    print(format_fidelity(results))
    if args.json:
        _write_json(args.json, results)


def _cmd_bench_accuracy(args):
    from .bench_accuracy import DEFAULT_VARIANTS, bench_accuracy, format_accuracy

    result = bench_accuracy(args.config, args.overrides, variants=args.variant or DEFAULT_VARIANTS, seeds=args.seeds,
                            eval_epochs=args.eval_epochs, eval_runs=args.eval_runs, out=args.out,
                            progress=not args.quiet, say=_say)
    print(format_accuracy(result))
    if args.json:
        _write_json(args.json, result)


def _e2e_options(args):
    from .bench_e2e import Options
    from .matching import COMPILE_MODES, PRECISIONS, SECOND_PASSES

    if args.backend not in ("auto", "native", "triton"):
        raise ConfigError(f"--backend must be auto, native or triton, got {args.backend!r}")
    if args.second_pass not in SECOND_PASSES:
        raise ConfigError(f"--second-pass must be one of {', '.join(SECOND_PASSES)}, got {args.second_pass!r}")
    if args.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {args.precision!r}")
    if args.compile == "none":
        args.compile = None
    if args.compile is not None and args.compile not in COMPILE_MODES:
        raise ConfigError(f"--compile must be one of none, {', '.join(COMPILE_MODES)}, got {args.compile!r}")
    return Options(backend=args.backend, students=args.students, second_pass=args.second_pass, chunk=args.chunk,
                   precision=args.precision, compile=args.compile, cudnn_benchmark=args.cudnn_benchmark)


def _say(text):
    print(f"... {text}", file=sys.stderr, flush=True)


def _cmd_bench_e2e(args):
    from .bench_e2e import bench_e2e, format_e2e

    row = bench_e2e(args.preset, device=args.device, iterations=args.iterations, options=_e2e_options(args),
                    overrides=args.set, quick=args.quick, progress=_say, profile=args.profile)
    print(format_e2e(row))
    if args.json:
        _write_json(args.json, row)


def _cmd_bench_memory(args):
    from .bench_e2e import bench_memory, format_memory

    result = bench_memory(args.preset, device=args.device, syn_steps=args.syn_steps, options=_e2e_options(args),
                          overrides=args.set, quick=args.quick, progress=_say)
    print(format_memory(result))
    if args.json:
        _write_json(args.json, result)


# ---- ltdd demo ------------------------------------------------------------------------------------------

def _cmd_demo(args):
    from .demo import run_demo

    run_demo(out=args.out, quick=args.quick, json_path=args.json, device=args.device, progress=not args.quiet)


def _demo_parser(sub):
    p = sub.add_parser("demo", help="the whole pipeline on Digits-LT (no files needed)",
                       description="Train experts on Digits-LT at imbalance factors 10 and 50 and compare the "
                                   "evaluated sets in one table.")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a smoke-test sized run")
    p.add_argument("--json", default=None, help="write {method: {imbalance_factor: {overall, many, medium, few}}, "
                                                "two_stage: {...}, grouping_analysis: [...]} (as results.json)")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_demo)


# ---- ltdd plot ------------------------------------------------------------------------------------------

def _cmd_plot(args):
    from .files import read_log
    from .plots import plot_metrics

    run = Path(args.directory)
    if not run.is_dir():
        raise DataError(f"{run} is not a directory: expected the out directory of `ltdd distill` or `ltdd experts`")
    png = args.png or run / "metrics.png"
    kind = plot_metrics(read_log(run / "metrics.jsonl"), png, title=str(run))
    print(f"{kind} curves: {png}")


def _plot_parser(sub):
    p = sub.add_parser("plot", help="draw a run's metrics log (loss, alpha, per-class gradient norms) to PNG",
                       description="Read RUN/metrics.jsonl, which `ltdd distill` and `ltdd experts` append to as "
                                   "they go, and draw its curves: each phase's matching loss, the learned lr and "
                                   "every class's image-gradient norm per iteration, or each expert's training loss "
                                   "per epoch. Works on a run still in progress.")
    p.add_argument("directory", metavar="RUN", help="a distill out directory or an expert directory")
    p.add_argument("--png", default=None, help="where to write the figure (default RUN/metrics.png)")
    p.set_defaults(run=_cmd_plot)


def _add_run_args(p):
    p.add_argument("--seed", type=_natural_int, default=0)
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars or data summary")


def build_parser():
    parser = _Parser(prog="ltdd", description="Long-tailed dataset distillation: experts -> distill -> eval, and the demo.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _experts_parser(sub)
    _distill_parser(sub)
    _eval_parser(sub)
    _groups_parser(sub)
    _bench_parser(sub)
    _demo_parser(sub)
    _plot_parser(sub)
    return parser


IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _check_outputs(args):
    """Every output path on the command line, checked before any work: a result computed for an hour must not
    fail at its last write."""
    if getattr(args, "out", None):
        check_output_dir(args.out, "--out")
    for option in ("json", "png"):
        if getattr(args, option, None):
            check_output_file(getattr(args, option), f"--{option}")
    if getattr(args, "png", None) and Path(args.png).suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(f"--png {args.png}: the image type comes from its suffix, expected one of "
                          f"{', '.join(IMAGE_SUFFIXES)}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        _check_outputs(args)
        args.run(args)
    except LTDDError as exc:
        message = " ".join(str(exc).split())  # one line, whatever a library message held
        print(f"ltdd {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ltdd {args.command}: interrupted; finished outputs are kept", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system refused something no check could foresee (permissions, a dying disk)
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"ltdd {args.command}: error: {exc.strerror or exc}{where}; finished outputs are kept", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError):
        print(f"ltdd {args.command}: error: out of memory on {getattr(args, 'device', 'cpu')}: lower the batch size, "
              f"width or ipc; finished outputs are kept", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
