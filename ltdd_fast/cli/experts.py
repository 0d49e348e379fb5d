"""`ltdd experts`: train expert trajectories (stage 1, then stage 2 from it)."""
from pathlib import Path

from ..errors import ConfigError
from .common import add_data_args, add_run_args, load_data, nonneg_float, positive_float, positive_int


RECIPES = ("trajectories", "debiased")
# what only the trajectory recipe takes (flag: its value when not given)
TRAJECTORY_ONLY = {"--stage": ("stage", 1), "--from": ("source", None), "--sam": ("sam", "none"),
                   "--max-norm": ("max_norm", None), "--dtype": ("dtype", "float32"), "--num-experts": ("num_experts", 5)}


def run_debiased(args):
    from ..unilevel.experts import DebiasConfig, train_debiased

    given = [flag for flag, (dest, default) in TRAJECTORY_ONLY.items() if getattr(args, dest) != default]
    if given:
        raise ConfigError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --recipe debiased "
                          f"(an observer and a teacher, each trained once)")
    config = DebiasConfig(epochs=args.epochs or 30, lr=args.lr or 0.05,
                          momentum=args.momentum if args.momentum is not None else 0.9,
                          weight_decay=args.weight_decay if args.weight_decay is not None else 5e-4,
                          batch_size=args.batch_size or 128, model=args.model or "convnet",
                          teacher_model=args.teacher_model, width=args.width or 128, q=args.q,
                          dsa=not args.no_dsa, seed=args.seed, device=args.device)
    dataset = load_data(args)
    store = train_debiased(dataset, config, args.out, progress=not args.quiet)
    for role, record in store.manifest["models"].items():
        print(f"{role} ({record['model']}) in {args.out}: test accuracy {100 * record['test_acc']:.1f}%, tail "
              f"{100 * record['tail_acc']:.1f}%")


def run(args):
    from ..experts import ExpertConfig, train_experts
    from ..trajectories import TrajectoryStore

    if args.recipe == "debiased":
        return run_debiased(args)
    if args.teacher_model is not None or args.q != 1.0:
        raise ConfigError("--teacher-model and --q apply to --recipe debiased only")
    defaults = None
    if args.source:
        defaults = dict(TrajectoryStore(args.source).manifest, _source=f"{Path(args.source) / 'manifest.json'}")
    if args.stage == 2 and defaults is None:
        raise ConfigError("stage 2 needs the stage-1 trajectories it starts from: --from DIR")
    model = args.model or (defaults["model"] if defaults else "convnet")
    width = args.width if args.width is not None else (defaults.get("width", 128) if defaults else 128)
    config = ExpertConfig(stage=args.stage, num_experts=args.num_experts, epochs=args.epochs, lr=args.lr or 0.01,
                          momentum=args.momentum or 0.0, weight_decay=args.weight_decay,
                          batch_size=args.batch_size or 256,
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
    p = sub.add_parser("experts", help="train expert trajectories (stage 1: whole network; stage 2: classifier), "
                                       "or the uni-level distiller's debiased observer and teacher",
                       description="Train experts on a long-tailed set. --recipe trajectories (default): expert "
                                   "trajectories for ltdd and plain_tm; a rerun with the same --out continues at the "
                                   "first unfinished expert. --recipe debiased: the BN observer and teacher of "
                                   "method=unilevel (METHOD section 11); a rerun continues at its last epoch.")
    add_data_args(p, required=False)
    p.add_argument("--recipe", choices=RECIPES, default="trajectories")
    p.add_argument("--stage", type=int, choices=(1, 2), default=1)
    p.add_argument("--from", dest="source", default=None,
                   help="stage 2: the stage-1 trajectory directory (its data settings are reused)")
    p.add_argument("--out", required=True, help="directory for the trajectories and manifest.json")
    p.add_argument("--num-experts", type=positive_int, default=5)
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="default 50 (stage 1), 10 (stage 2), 30 (debiased)")
    p.add_argument("--model", default=None, help="convnet (default), convnet1..5, vgg11, resnet18, alexnet (debiased: "
                                                 "the observer, with batch norm)")
    p.add_argument("--teacher-model", default=None, help="debiased: the teacher's network (default: --model)")
    p.add_argument("--q", type=nonneg_float, default=1.0, help="debiased: the rebalancing weights' sharpness r^-q")
    p.add_argument("--width", type=positive_int, default=None, help="network width (default 128)")
    p.add_argument("--lr", type=positive_float, default=None, help="default 0.01 (debiased: 0.05, cosine decay)")
    p.add_argument("--momentum", type=nonneg_float, default=None, help="default 0 (debiased: 0.9)")
    p.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help="default 5e-3 (stage 1), 0 (stage 2), 5e-4 (debiased)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default 256 (debiased: 128)")
    p.add_argument("--no-dsa", action="store_true", help="train without DSA augmentation")
    p.add_argument("--sam", default="none", help="none, sam or gsam (sharpness-aware steps)")
    p.add_argument("--sam-rho", type=nonneg_float, default=0.01)
    p.add_argument("--gsam-alpha", type=nonneg_float, default=0.3)
    p.add_argument("--max-norm", type=positive_float, default=None, help="stage 2: classifier row max-norm (e.g. 0.1)")
    p.add_argument("--dtype", default="float32", help="stored trajectory dtype: float32 or float16")
    add_run_args(p)
    p.set_defaults(run=run)
