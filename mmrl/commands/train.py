"""``mmrl train CONFIG.yaml [key=value ...]``.

One process needs no launcher. Several: ``torchrun --nproc_per_node N -m mmrl train ...`` or
``deepspeed --num_gpus N --module mmrl train ...``; multi-node through torchrun's or DeepSpeed's
rendezvous/hostfile, or SLURM (``srun python -m mmrl train ...``: ranks come from SLURM_* variables).
"""
from __future__ import annotations

import argparse
import json

from .registry import command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML recipe (e.g. configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys for nesting")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


@command("train", "train a dual encoder with DeepSpeed (YAML config + key=value overrides)", _arguments)
def cmd_train(args: argparse.Namespace) -> int:
    from ..config import load_config, to_dict
    from ..train import TrainConfig, train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    summary = train(cfg)
    if summary.get("stopped_early"):
        print(f"stopped at step {summary['step']} (checkpoint saved; resume with resume=auto)")
    return 0
