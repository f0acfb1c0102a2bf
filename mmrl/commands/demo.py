"""``mmrl demo [CONFIG.yaml] [key=value ...] [--force] [--study]``.

Prepares the corpora it needs (``mmrl prepare``), trains with ``mmrl train``, evaluates with the
demo suite and writes ``runs/demo/report.md``; ``--study`` runs the pooling study instead
(``runs/study/study.md``). Finished work is reused; ``--force`` retrains and re-evaluates.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .registry import command

DEFAULT_CONFIG = "configs/demo.yaml"


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help=f"demo YAML (default: {DEFAULT_CONFIG} when it exists, else built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.max_steps=100 prepare_limit=200 study.seeds=[0,1]")
    p.add_argument("--study", action="store_true", help="run the pooling study (tok/avg/gem/ggem/cgem x seeds)")
    p.add_argument("--force", action="store_true", help="retrain and re-evaluate even if finished runs exist")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


@command("demo", "the main job: prepare real corpora, train, evaluate, write runs/demo/report.md "
                 "(--study: pooling study)", _arguments)
def cmd_demo(args: argparse.Namespace) -> int:
    import json

    from ..config import load_config, to_dict
    from ..demo import DemoConfig, run_demo, run_study
    from ..deps import DEMO_PACKAGES, require

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config] + overrides  # only overrides were given
    if config is None and Path(DEFAULT_CONFIG).is_file():
        config = DEFAULT_CONFIG
    cfg = load_config(DemoConfig, config, overrides)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    for module in DEMO_PACKAGES:  # fail in one line now, not after training (the report's plots)
        require(module, feature="the demo")
    if args.study:
        run_study(cfg, force=args.force)
        return 0
    outcome = run_demo(cfg, force=args.force)
    if cfg.check_floor and not outcome["passed"]:
        failed = [f"{c['name']} ({c['task']})" for c in outcome["checks"] if not c["passed"]]
        print(f"quality floor not met on: {', '.join(failed) or 'no set evaluated'} (see {outcome['report']})")
        return 1
    return 0
