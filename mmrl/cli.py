"""The ``mmrl`` command line: ``mmrl COMMAND ...`` (``mmrl --help`` lists the commands)."""
from __future__ import annotations

import argparse
import os
import sys

from .deps import MissingDependency
from .fileio import NoSpaceLeft, is_no_space


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import COMMANDS

    parser = argparse.ArgumentParser(prog="mmrl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mmrl {__version__}")
    # the deepspeed launcher passes --local_rank=N before the command
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if cmd.arguments is not None:
            cmd.arguments(p)
        p.set_defaults(func=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (MissingDependency, ValueError, FileNotFoundError, NoSpaceLeft) as err:  # one line, no traceback
        print(f"mmrl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk met outside mmrl's own writers
        if not is_no_space(err):
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"mmrl {args.command}: error: no space left on device{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
