"""Training on DeepSpeed: config, engine module, loop, checkpoints."""
from .config import DataConfig, EvalConfig, TrainConfig

__all__ = ["DataConfig", "EvalConfig", "TrainConfig", "train"]


def train(cfg: TrainConfig):
    """Run training in this process (one process of the job); see :mod:`mmrl.train.trainer`."""
    from .trainer import train as _train

    return _train(cfg)
