"""The subcommand registry: each ``mmrl/commands/*.py`` module registers ``fn(args) -> exit code``
under its name with :func:`command`; :mod:`mmrl.cli` builds the parser from :data:`COMMANDS`."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["COMMANDS", "Command", "command"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``fn(args) -> exit code`` as ``mmrl NAME``; ``arguments(parser)`` adds its options."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, fn, arguments)
        return fn

    return wrap
