"""``mmrl demo``: the main job on the embedded real-data default -- prepare the corpora, train a
small GGeM CLIP on CPU, evaluate it against its baselines, write the report -- and the pooling
study (``mmrl demo --study``)."""
from .config import DemoConfig, StudyConfig

__all__ = ["DemoConfig", "StudyConfig", "run_demo", "run_study"]


def run_demo(cfg: DemoConfig, **kwargs):
    from .run import run_demo as _run

    return _run(cfg, **kwargs)


def run_study(cfg: DemoConfig, **kwargs):
    from .study import run_study as _run

    return _run(cfg, **kwargs)
