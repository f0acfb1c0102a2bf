"""The ``mmrl`` subcommands; importing this package registers them with :mod:`mmrl.cli`."""
from . import demo, eval, models, prepare, shard, train  # noqa: F401
