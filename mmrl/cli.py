"""The ``mmrl`` command line: ``mmrl COMMAND ...`` (``mmrl --help`` lists the commands)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

Command = Callable[[argparse.Namespace], int]
_COMMANDS: Dict[str, tuple] = {}


def command(name: str, help: str, arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    """Register ``fn(args) -> exit code`` as ``mmrl NAME``; ``arguments(parser)`` adds its options."""

    def wrap(fn):
        _COMMANDS[name] = (fn, help, arguments)
        return fn

    return wrap


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, commands  # noqa: F401  (registers the commands)

    parser = argparse.ArgumentParser(prog="mmrl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mmrl {__version__}")
    # the deepspeed launcher passes --local_rank=N before the command
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help_text, arguments) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if arguments is not None:
            arguments(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmrl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
