"""What the subcommands share: argparse types that turn a bad value into one usage line, the data, training and
run options, and the training sets of eval and groups."""
import argparse
import math
import sys
from pathlib import Path

import torch

from ..checks import check_device
from ..errors import ConfigError, DataError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and status 2) like every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number_type(kind, low, low_open=False):
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


positive_int = number_type(int, 1)
natural_int = number_type(int, 0)
positive_float = number_type(float, 0, low_open=True)
nonneg_float = number_type(float, 0)
factor = number_type(float, 1)


def device_arg(text):
    try:
        return check_device(text, "--device")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device ")) from None


def add_data_args(p, required=True):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=required, default=None,
                   help="digits, mnist, fashion-mnist, cifar10, cifar100, tiny or imagenet-lt")
    g.add_argument("--data-dir", default=None, help="directory holding the data set's files (all but digits; "
                   "mnist and fashion-mnist default to where Debian's package puts them)")
    g.add_argument("--imbalance-factor", type=factor, default=None,
                   help="n_head / n_tail of the long-tailed training set (1 = balanced; default 1)")
    g.add_argument("--data-seed", type=natural_int, default=None, help="seed of the long-tailed subsampling (default 0)")
    g.add_argument("--resolution", type=positive_int, default=None, help="resize images to this side length")
    g.add_argument("--zca", action=argparse.BooleanOptionalAction, default=None,
                   help="ZCA whitening (default: on for CIFAR and Tiny, off otherwise)")


def load_data(args, defaults=None):
    """The data set named by the arguments; values left unset come from `defaults` (a manifest or synset)."""
    from ..data import load_dataset

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


def add_set_choice(p, synset_help, random_help, whole_help):
    """The training set of eval and groups, one of --synset, --random-ipc, --whole (a group: groups adds one)."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--synset", default=None, help=synset_help)
    which.add_argument("--random-ipc", type=positive_int, default=None, help=random_help)
    which.add_argument("--whole", action="store_true", help=whole_help)
    return which


def add_train_args(p, num_runs=True):
    g = p.add_argument_group("training (the evaluation protocol)")
    g.add_argument("--model", default="convnet")
    g.add_argument("--width", type=positive_int, default=128, help="network width (default 128, the field's protocol)")
    g.add_argument("--epochs", type=positive_int, default=300)
    if num_runs:
        g.add_argument("--num-runs", type=positive_int, default=5)
    g.add_argument("--batch-size", type=positive_int, default=256)
    g.add_argument("--lr", type=positive_float, default=None, help="default: the synthetic set's learned lr, else 0.01")
    g.add_argument("--momentum", type=nonneg_float, default=0.9)
    g.add_argument("--weight-decay", type=nonneg_float, default=5e-4)
    g.add_argument("--no-dsa", action="store_true")
    g.add_argument("--protocol", choices=("soft-ce", "ce+mse"), default="soft-ce",
                   help="the student's loss: soft-ce (soft cross-entropy against the labels, METHOD section 9) or "
                        "ce+mse (CE on each image's class plus the squared distance of the probabilities, the "
                        "uni-level paper's)")
    g.add_argument("--ce-weight", type=nonneg_float, default=1.0, help="ce+mse: the CE term's weight")
    g.add_argument("--mse-weight", type=nonneg_float, default=1.0, help="ce+mse: the squared distance's weight")
    p.add_argument("--many-threshold", type=natural_int, default=100,
                   help="many-shot (head): more training images than this")
    p.add_argument("--few-threshold", type=natural_int, default=20, help="few-shot (tail): fewer training images than this")


def add_run_args(p):
    p.add_argument("--seed", type=natural_int, default=0)
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars or data summary")


def check_eval_args(args):
    """Usage mistakes of eval/groups, caught before any data is loaded."""
    if args.few_threshold > args.many_threshold:
        raise ConfigError(f"--few-threshold ({args.few_threshold}) must not exceed --many-threshold "
                          f"({args.many_threshold})")


def check_grouping_args(method, num_groups, option):
    if num_groups is not None and method == "frequency":
        raise ConfigError(f"--num-groups does not apply to {option} frequency (its groups come from "
                          f"--many-threshold and --few-threshold); use {option} confusion or features")
    if num_groups is not None and num_groups < 2:
        raise ConfigError(f"--num-groups must be at least 2, got {num_groups}")


def training_set(args, extra_defaults=None):
    """(dataset, images, labels, name, lr, record) of --synset, --random-ipc or --whole; record is the synthetic-set
    file's contents (None for the other two)."""
    from ..evaluate import random_real
    from ..synset import check_synset_compatible, load_synset

    record = load_synset(args.synset) if args.synset else None
    defaults = extra_defaults
    if record is not None:
        defaults = {"dataset": record["dataset"], "imbalance_factor": record["imbalance_factor"],
                    "zca": record["zca"] is not None, "im_size": record["im_size"],
                    "data_seed": record.get("data_seed", 0)}
    dataset = load_data(args, defaults)
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
        return dataset, None, None, None, None, None
    return dataset, images, labels, name, lr, record


def eval_config(args, lr, num_runs):
    from ..evaluate import EvalConfig

    return EvalConfig(model=args.model, width=args.width, epochs=args.epochs, num_runs=num_runs, batch_size=args.batch_size,
                      lr=lr, momentum=args.momentum, weight_decay=args.weight_decay, dsa=not args.no_dsa,
                      seed=args.seed, device=args.device, many_threshold=args.many_threshold,
                      few_threshold=args.few_threshold, protocol=args.protocol, ce_weight=args.ce_weight,
                      mse_weight=args.mse_weight)


def say(text):
    print(f"... {text}", file=sys.stderr, flush=True)
