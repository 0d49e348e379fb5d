"""`ltdd plot`: a run's metrics log drawn to PNG."""
from pathlib import Path

from ..errors import DataError


def run(args):
    from ..files import read_log
    from ..plots import plot_metrics

    run = Path(args.directory)
    if not run.is_dir():
        raise DataError(f"{run} is not a directory: expected the out directory of `ltdd distill` or `ltdd experts`")
    png = args.png or run / "metrics.png"
    kind = plot_metrics(read_log(run / "metrics.jsonl"), png, title=str(run))
    print(f"{kind} curves: {png}")


def add_parser(sub):
    p = sub.add_parser("plot", help="draw a run's metrics log (loss, alpha, per-class gradient norms) to PNG",
                       description="Read RUN/metrics.jsonl, which `ltdd distill` and `ltdd experts` append to as "
                                   "they go, and draw its curves: each phase's matching loss, the learned lr and "
                                   "every class's image-gradient norm per iteration, or each expert's training loss "
                                   "per epoch. Works on a run still in progress.")
    p.add_argument("directory", metavar="RUN", help="a distill out directory or an expert directory")
    p.add_argument("--png", default=None, help="where to write the figure (default RUN/metrics.png)")
    p.set_defaults(run=run)
