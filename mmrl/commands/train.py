"""``mmrl train CONFIG.yaml [key=value ...]``.

One process needs no launcher. Several: ``torchrun --nproc_per_node N -m mmrl train ...`` or
``deepspeed --num_gpus N --module mmrl train ...``; multi-node through torchrun's or DeepSpeed's
rendezvous/hostfile, or SLURM (``srun python -m mmrl train ...``: ranks come from SLURM_* variables).

Exit status: 0 the run finished; 2 it could not start or stopped on an error (one line on stderr: a bad
config, an ``output_dir`` in use by another ``mmrl train`` or holding checkpoints of a different config, a
full disk -- the partial checkpoint or model removed, earlier ones intact);
3 (:data:`STOPPED`) it was stopped by SIGTERM/SIGINT after saving a checkpoint (``resume=auto``
continues it), so ``mmrl train ... && mmrl eval ...`` does not go on with an unfinished model;
4 (:data:`mmrl.train.lost_peer.LOST_PEER`) another rank died or did not answer within ``dist_timeout_s``
(one line naming it; ``resume=auto`` continues from the last complete checkpoint, e.g. under
``torchrun --max-restarts``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .registry import command

STOPPED = 3  # exit status of a run stopped by SIGTERM/SIGINT (checkpoint saved)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML recipe (e.g. configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys for nesting")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


@command("train", "train a dual encoder with DeepSpeed (YAML config + key=value overrides); exit status 0 "
                  "finished, 2 could not start, 3 stopped by SIGTERM/SIGINT (checkpoint saved), 4 lost another "
                  "rank (died, or silent for dist_timeout_s)", _arguments)
def cmd_train(args: argparse.Namespace) -> int:
    from ..config import load_config, to_dict
    from ..train import TrainConfig, train
    from ..train.lost_peer import LOST_PEER, LostPeer

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    try:
        summary = train(cfg)
    except LostPeer as err:
        # one line, then out at once: the run folder's lock and the loader were released on the way here, and
        # no thread, loader worker or process-group teardown waiting on the lost peer may keep the process alive
        print(f"mmrl train: error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(LOST_PEER)
    if summary.get("stopped_early"):
        print(f"stopped at step {summary['step']} (checkpoint saved; resume with resume=auto)")
        return STOPPED
    if _is_main():
        out = Path(cfg.output_dir)
        logs = [out / "log.jsonl"] + [out / "tensorboard"] * (out / "tensorboard").is_dir()
        print(f"model: {summary.get('model_dir') or out / 'model'}")
        print("logs: " + ", ".join(str(p) for p in logs))
        print(f"summary: {out / 'summary.json'}")
    return 0


def _is_main() -> bool:
    from ..train.distributed import dist_info_from_env

    return dist_info_from_env().is_main
