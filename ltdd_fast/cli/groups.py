"""`ltdd groups`: the grouping analysis of a model's errors."""
from ..errors import ConfigError
from ..files import write_json_atomic
from .common import (add_data_args, add_run_args, add_set_choice, add_train_args, check_eval_args, check_grouping_args,
                     eval_config, natural_int, positive_int, training_set)


def run(args):
    from ..hierarchy import (
        confusion_matrix, expert_network, format_analysis, grouping_analysis, grouping_from_model,
        model_predictions,
    )
    from ..plots import save_heatmap

    check_eval_args(args)
    check_grouping_args(args.method, args.num_groups, "--method")
    if args.cluster_on is not None and args.method == "frequency":
        raise ConfigError("--cluster-on applies to --method confusion or features only")
    if args.experts is None and (args.expert_index is not None or args.expert_epoch is not None):
        raise ConfigError("--expert-index and --expert-epoch need --experts DIR")
    store = None
    if args.experts is not None:
        from ..trajectories import TrajectoryStore

        store = TrajectoryStore(args.experts)
    dataset, images, labels, name, lr, _ = training_set(args, store.manifest if store else None)
    if store is not None:
        net, model = expert_network(store, dataset, args.expert_index, args.expert_epoch, args.device)
        used = None  # an expert was trained on the whole training set
    else:
        from ..evaluate import train_and_evaluate

        config = eval_config(args, lr, 1)
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
        write_json_atomic(args.json, analysis)
    if args.png:
        save_heatmap(test_conf, grouping, args.png, dataset.class_names, dataset.class_counts,
                     title=f"{dataset.name} IF {dataset.imbalance_factor:g}: test confusion by {args.method} groups")


def add_parser(sub):
    p = sub.add_parser("groups", help="grouping analysis: how a model's errors sit inside and across class groups",
                       description="Group the classes by frequency or by clustering a model's confusion or "
                                   "class-mean features, then measure on the test confusion the share of errors "
                                   "inside groups against chance and the direction of cross-group errors (the "
                                   "grouping hypothesis). The model is an expert (--experts) or a network trained "
                                   "on --synset / --random-ipc / --whole.")
    add_data_args(p, required=False)
    which = add_set_choice(p, "train a network on this synthetic set", "train a network on this many random images per class",
                           "train a network on the whole long-tailed training set")
    which.add_argument("--experts", default=None, help="a trajectory directory: analyse one expert as it is")
    p.add_argument("--expert-index", type=natural_int, default=None, help="which expert (default: the first complete one)")
    p.add_argument("--expert-epoch", type=natural_int, default=None, help="which snapshot (default: the last)")
    p.add_argument("--method", choices=("frequency", "confusion", "features"), default="frequency",
                   help="frequency: head/medium/tail by the thresholds; confusion: spectral clustering of the "
                        "symmetrised confusion; features: k-means of class-mean features")
    p.add_argument("--num-groups", type=positive_int, default=None,
                   help="confusion/features: this many groups (default: chosen by eigengap or silhouette)")
    p.add_argument("--cluster-on", choices=("train", "test"), default=None,
                   help="confusion/features: cluster on the training images (default; for a network on a set, "
                        "those not in the set) or on the test images (a diagnosis: circular for confusion)")
    add_train_args(p, num_runs=False)
    p.add_argument("--json", default=None, help="write the analysis as JSON here")
    p.add_argument("--png", default=None, help="write a heatmap of the test confusion, ordered by group, here")
    add_run_args(p)
    p.set_defaults(run=run)
