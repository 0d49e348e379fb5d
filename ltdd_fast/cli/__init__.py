"""The `ltdd` command: experts -> (distill) -> eval, and the demo that runs them all on Digits-LT.

One module per subcommand (experts, distill, evaluate, calibrate, groups, bench, demo, plot), each with add_parser(sub) and
the function its parser runs; common holds what they share. Each command imports the library modules it runs
when it runs, so that `ltdd --help` and a usage mistake answer without loading them. May import anything in
ltdd_fast; nothing imports it.

User errors (LTDDError) print one line on stderr and exit with status 2; nothing already written is lost,
because every step writes its outputs atomically and experts are kept one by one.
"""
import os
import sys
from pathlib import Path

import torch

from .. import distributed
from ..errors import ConfigError, LTDDError
from ..files import check_output_dir, check_output_file
from . import bench, calibrate, demo, distill, evaluate, experts, groups, plot
from .common import Parser


def build_parser():
    parser = Parser(prog="ltdd", description="Long-tailed dataset distillation: experts -> distill -> eval, and the demo.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in (experts, distill, evaluate, calibrate, groups, bench, demo, plot):
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


# the commands that run under torchrun with more than one process (the others refuse, before any work)
DISTRIBUTED = ("experts", "distill", "eval", "bench e2e")


def join_world(args):
    """Under torchrun, join the process group: this rank's device, and on ranks other than 0 no progress, no
    printed results and no --json/--png (rank 0 writes them). Without torchrun, nothing."""
    found = distributed.from_env()
    if not found.active:
        return found
    command = args.command if args.command != "bench" else f"bench {args.what}"
    if command not in DISTRIBUTED:
        raise ConfigError(f"ltdd {command} does not run under torchrun (WORLD_SIZE {found.size}): run it as one "
                          f"process; {', '.join(f'ltdd {c}' for c in DISTRIBUTED)} do")
    if hasattr(args, "device"):  # distill joins once its config has named the device
        distributed.init(args.device)
        args.device = distributed.rank_device(args.device)
    world = found
    if not world.main:
        if hasattr(args, "quiet"):
            args.quiet = True
        for option in ("json", "png"):
            if hasattr(args, option):
                setattr(args, option, None)
        sys.stdout = open(os.devnull, "w")  # rank 0 prints the results
    return world


def main(argv=None):
    args = build_parser().parse_args(argv)
    name = f"ltdd {args.command}"
    clean = False
    try:
        world = join_world(args)
        if world.active:
            name += f" (rank {world.rank} of {world.size})"
        check_outputs(args)
        args.run(args)
        clean = True
    except LTDDError as exc:
        message = " ".join(str(exc).split())  # one line, whatever a library message held
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; finished outputs are kept", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system refused something no check could foresee (permissions, a dying disk)
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{name}: error: {exc.strerror or exc}{where}; finished outputs are kept", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError):
        print(f"{name}: error: out of memory on {getattr(args, 'device', 'cpu')}: lower the batch size, "
              f"width or ipc; finished outputs are kept", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(clean)
    return 0
