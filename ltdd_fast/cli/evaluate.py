"""`ltdd eval`: train fresh networks on a set and report accuracy, flat or two-stage."""
import sys

from ..errors import ConfigError
from ..files import write_json_atomic
from .common import (add_data_args, add_run_args, add_set_choice, add_train_args, check_eval_args, check_grouping_args,
                     eval_config, positive_int, training_set)


def run(args):
    from ..evaluate import train_and_evaluate

    check_eval_args(args)
    if not args.two_stage:
        given = [o for o, v in (("--groups", args.groups), ("--num-groups", args.num_groups),
                                ("--combine", args.combine), ("--group-labels", args.group_labels)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --two-stage")
    groups = args.groups or "frequency"
    check_grouping_args(groups, args.num_groups, "--groups")
    if args.calibrate and not args.synset:
        raise ConfigError("--calibrate adjusts a synthetic set's soft labels: it needs --synset")
    dataset, images, labels, name, lr, record = training_set(args)
    classes = None
    if record is not None:
        from ..synset import synset_classes

        classes = synset_classes(record)
        if args.calibrate:
            from ..calibration import calibrate_record

            record, summary = calibrate_record(record, classes)
            labels, name = record["labels"], f"{name} calibrated (tau {summary['tau']:.3f})"
            if summary["warning"]:
                print(f"ltdd eval: warning: {summary['warning']}", file=sys.stderr)
    config = eval_config(args, lr, args.num_runs)
    if not args.two_stage:
        report = train_and_evaluate(images, labels, dataset, config, name=name, progress=not args.quiet,
                                    classes=classes)
        print(report.format_table())
        if args.json:
            write_json_atomic(args.json, report.to_dict())
        return
    from ..hierarchy import evaluate_flat_and_two_stage

    result = evaluate_flat_and_two_stage(images, labels, dataset, config, groups=groups, num_groups=args.num_groups,
                                         combine=args.combine or "hard", name=name,
                                         soft_group_labels=args.group_labels == "soft", progress=not args.quiet)
    print(result.flat.format_table())
    print()
    print(result.report.format_table())
    print()
    print(result.format())
    if args.json:
        write_json_atomic(args.json, result.to_dict())


def add_parser(sub):
    p = sub.add_parser("eval", help="train fresh networks on a set of images and report test accuracy",
                       description="Train fresh networks on a synthetic set, random real images or the whole "
                                   "long-tailed set; report mean/std accuracy, per class, many/medium/few and the "
                                   "inter-class bias (per-class std, head-tail gap, prediction KL from uniform). "
                                   "--two-stage also trains a group classifier and one classifier per group on "
                                   "the same set and compares it with the flat networks.")
    add_data_args(p, required=False)
    add_set_choice(p, "a synthetic-set file written by ltdd distill", "baseline: this many random real images per class",
                   "baseline: the whole long-tailed training set")
    add_train_args(p)
    p.add_argument("--calibrate", action="store_true",
                   help="with --synset: first adjust its soft labels by ADSA's logit calibration (ltdd calibrate)")
    h = p.add_argument_group("two-stage classification")
    h.add_argument("--two-stage", action="store_true",
                   help="flat and two-stage (group, then class inside the group) on the same set")
    h.add_argument("--groups", choices=("frequency", "confusion", "features"), default=None,
                   help="frequency (default): head/medium/tail by the thresholds; confusion or features: "
                        "clusters from the flat run-0 network (its confusion on training images it was not "
                        "trained on, or its class-mean features; never the test set)")
    h.add_argument("--num-groups", type=positive_int, default=None,
                   help="confusion/features: this many groups (default: chosen by eigengap or silhouette)")
    h.add_argument("--combine", choices=("hard", "soft"), default=None,
                   help="hard (default): the class inside the most likely group; soft: argmax p(group) * "
                        "p(class | group)")
    h.add_argument("--group-labels", choices=("hard", "soft"), default=None,
                   help="the group classifier's targets: hard (default) the group of each image's class; soft: "
                        "a soft label's probability mass per group")
    p.add_argument("--json", default=None, help="write the report as JSON here (two-stage: its report, the flat "
                                                "one under \"flat\")")
    add_run_args(p)
    p.set_defaults(run=run)
