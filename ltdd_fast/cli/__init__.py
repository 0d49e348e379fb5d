"""The `ltdd` command: experts -> (distill) -> eval, and the demo that runs them all on Digits-LT.

One module per subcommand (experts, distill, evaluate, groups, bench, demo, plot), each with add_parser(sub) and
the function its parser runs; common holds what they share. Each command imports the library modules it runs
when it runs, so that `ltdd --help` and a usage mistake answer without loading them. May import anything in
ltdd_fast; nothing imports it.

User errors (LTDDError) print one line on stderr and exit with status 2; nothing already written is lost,
because every step writes its outputs atomically and experts are kept one by one.
"""
import sys
from pathlib import Path

import torch

from ..errors import ConfigError, LTDDError
from ..files import check_output_dir, check_output_file
from . import bench, demo, distill, evaluate, experts, groups, plot
from .common import Parser


def build_parser():
    parser = Parser(prog="ltdd", description="Long-tailed dataset distillation: experts -> distill -> eval, and the demo.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in (experts, distill, evaluate, groups, bench, demo, plot):
        command.add_parser(sub)
    return parser


IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_outputs(args):
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
        check_outputs(args)
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
