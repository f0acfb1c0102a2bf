"""The ``mmrl`` subcommands; importing this package registers them with :mod:`mmrl.cli`."""
from . import models, prepare, shard  # noqa: F401
