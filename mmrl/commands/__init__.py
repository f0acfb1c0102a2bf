"""The ``mmrl`` subcommands; importing this package registers each in :data:`COMMANDS`
(:mod:`mmrl.cli` builds its parser from them)."""
from . import analyze, demo, eval, models, prepare, shard, train  # noqa: F401  (each registers its command)
from .registry import COMMANDS, Command, command

__all__ = ["COMMANDS", "Command", "command"]
