"""`ltdd experts`: train expert trajectories (stage 1, then stage 2 from it)."""
from pathlib import Path

from ..errors import ConfigError
from .common import add_data_args, add_run_args, load_data, nonneg_float, positive_float, positive_int


def run(args):
    from ..experts import ExpertConfig, train_experts
    from ..trajectories import TrajectoryStore

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
    dataset = load_data(args, defaults)
    store = train_experts(dataset, config, args.out, source_dir=args.source, progress=not args.quiet)
    accs = [store.manifest["experts"].get(str(i), {}).get("test_acc") for i in store.completed()]
    accs = [a for a in accs if isinstance(a, (int, float))]
    mean = f" (mean test accuracy {100 * sum(accs) / len(accs):.1f}%)" if accs else ""
    print(f"{len(store)} stage-{args.stage} experts in {args.out}{mean}")


def add_parser(sub):
    p = sub.add_parser("experts", help="train expert trajectories (stage 1: whole network; stage 2: classifier)",
                       description="Train expert trajectories on a long-tailed set. A rerun with the same --out "
                                   "continues at the first unfinished expert.")
    add_data_args(p, required=False)
    p.add_argument("--stage", type=int, choices=(1, 2), default=1)
    p.add_argument("--from", dest="source", default=None,
                   help="stage 2: the stage-1 trajectory directory (its data settings are reused)")
    p.add_argument("--out", required=True, help="directory for the trajectories and manifest.json")
    p.add_argument("--num-experts", type=positive_int, default=5)
    p.add_argument("--epochs", type=positive_int, default=None, help="default 50 (stage 1) or 10 (stage 2)")
    p.add_argument("--model", default=None, help="convnet (default), convnet1..5, vgg11, resnet18, alexnet")
    p.add_argument("--width", type=positive_int, default=None, help="network width (default 128)")
    p.add_argument("--lr", type=positive_float, default=0.01)
    p.add_argument("--momentum", type=nonneg_float, default=0.0)
    p.add_argument("--weight-decay", type=nonneg_float, default=None, help="default 5e-3 (stage 1) or 0 (stage 2)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--no-dsa", action="store_true", help="train without DSA augmentation")
    p.add_argument("--sam", default="none", help="none, sam or gsam (sharpness-aware steps)")
    p.add_argument("--sam-rho", type=nonneg_float, default=0.01)
    p.add_argument("--gsam-alpha", type=nonneg_float, default=0.3)
    p.add_argument("--max-norm", type=positive_float, default=None, help="stage 2: classifier row max-norm (e.g. 0.1)")
    p.add_argument("--dtype", default="float32", help="stored trajectory dtype: float32 or float16")
    add_run_args(p)
    p.set_defaults(run=run)
