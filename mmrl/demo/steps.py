"""The demo's steps, each reusable on its own and each skipping work that is already done:
prepare the corpora, train (``mmrl train`` in a child process), build the untrained baseline,
evaluate a model with the suite.

"Done" is decided from what is on disk, never from timestamps: a training run is finished when
its ``summary.json`` reports every step and its saved ``config.yaml`` equals the config asked
for now (a changed recipe retrains; an interrupted run resumes from its last checkpoint); an
evaluation is done when its stamp names the same weights, suite file and entry filter.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from ..config import save_config, to_dict
from ..fileio import atomic_write_text
from .results import EntryMetrics, read_suite

__all__ = ["prepare_corpora", "train_shards", "finished_run", "run_training", "build_untrained", "evaluate",
           "file_digest"]

Log = Callable[[str], None]


def prepare_corpora(names: List[str], root: Path, limits: Callable[[str], Optional[int]], log: Log) -> Dict[str, dict]:
    """``mmrl prepare`` each corpus (idempotent: a finished one is reused) with the source-item
    cap ``limits(name)``; name -> manifest."""
    from ..prepare import prepare

    out = {}
    for name in names:
        t0 = time.perf_counter()
        manifest = prepare(name, root, limit=limits(name))
        out[name] = json.loads(Path(manifest).read_text(encoding="utf-8"))
        log(f"prepare {name}: ready in {manifest.parent} ({time.perf_counter() - t0:.0f} s)")
    return out


def train_shards(root: Path, corpora: List[str]) -> str:
    """The ``data.train`` value for the corpora's ``train/`` shard folders ("::"-joined)."""
    parts = []
    for name in corpora:
        folder = root / name / "train"
        if not folder.is_dir() or not any(folder.glob("*.tar")):
            raise FileNotFoundError(f"{folder}: no training shards (mmrl prepare {name} --root {root})")
        parts.append(str(folder))
    return "::".join(parts)


def _recipe_matches(out: Path, cfg) -> Optional[bool]:
    """Whether ``out/config.yaml`` (written by ``mmrl train``) is ``cfg``, ``resume`` aside;
    ``None`` when there is no saved config (an unreadable one does not match)."""
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) or {}
    except OSError:
        return None
    except yaml.YAMLError:
        return False
    want = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    saved.pop("resume", None)
    want.pop("resume", None)
    return saved == want


def finished_run(cfg) -> Optional[dict]:
    """The run's summary when ``cfg.output_dir`` holds a finished run of exactly ``cfg``."""
    out = Path(cfg.output_dir)
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not _recipe_matches(out, cfg) or summary.get("stopped_early"):
        return None
    if summary.get("step") != summary.get("total_steps") or not (out / "model" / "open_clip_config.json").is_file():
        return None
    return summary


def run_training(cfg, force: bool, log: Log) -> Tuple[dict, bool]:
    """Train ``cfg`` with ``python -m mmrl train`` (DeepSpeed engine) unless a finished run of
    the same config is there; ``force`` starts over. Returns the run's summary and whether it
    was reused (nothing trained now)."""
    out = Path(cfg.output_dir)
    if force and out.exists():
        log(f"train: --force: removing {out}")
        shutil.rmtree(out)
    summary = finished_run(cfg)
    if summary is not None:
        log(f"train: reusing the finished run in {out} (step {summary['step']}; --force retrains)")
        return summary, True
    matches = _recipe_matches(out, cfg)
    if matches is False:
        log(f"train: the recipe differs from the run in {out}; starting over")
        shutil.rmtree(out)
    elif matches:
        log(f"train: resuming the unfinished run in {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = out.parent / f"{out.name}.yaml"
    save_config(cfg, recipe)
    cmd = [sys.executable, "-m", "mmrl", "train", str(recipe)]
    log("train: " + " ".join(["mmrl", "train", str(recipe)]))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"mmrl train {recipe} failed with exit status {proc.returncode} (its log is above)")
    summary = finished_run(cfg)
    if summary is None:
        raise RuntimeError(f"mmrl train {recipe} stopped before the last step; run the demo again to resume")
    return summary, False


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_untrained(cfg, dest: Path, log: Log) -> Path:
    """The recipe's model at step 0 -- created exactly as ``mmrl train`` creates it (same seed,
    same pretrained text tower when the recipe uses one) -- saved with ``mmrl.save_model``."""
    import torch

    from ..model import create_model, save_model

    stamp = dest / "untrained.json"
    want = {"model": cfg.model, "pool": cfg.pool, "pool_kwargs": cfg.pool_kwargs, "seed": cfg.seed,
            "final_ln_after_pool": cfg.final_ln_after_pool, "lock_text": cfg.lock_text}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (dest / "open_clip_config.json").is_file():
        log(f"untrained baseline: reusing {dest}")
        return dest
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, cfg.pool, pool_kwargs=cfg.pool_kwargs or None,
                         final_ln_after_pool=cfg.final_ln_after_pool, lock_text=cfg.lock_text)
    save_model(model, dest)
    atomic_write_text(stamp, json.dumps(want, indent=1) + "\n")
    log(f"untrained baseline: {cfg.model} pool={cfg.pool} seed={cfg.seed} at initialisation -> {dest}")
    return dest


def evaluate(spec: str, suite_path: Path, root: Path, out_dir: Path, *, only: Optional[str], batch_size: int,
             workers: int, log: Log, force: bool = False,
             exclude: Sequence[str] = ()) -> Tuple[List[EntryMetrics], bool]:
    """Run the suite for one model (a saved folder or ``raw-pixels:N``) into ``out_dir``,
    unless the same weights were already evaluated with the same suite and filter. Returns the
    entries and whether they were reused (nothing evaluated now)."""
    from ..evaluation.context import RunOptions, default_device, load_eval_model
    from ..evaluation.raw_pixels import parse_raw_pixels
    from ..evaluation.suite import load_suite, run_suite

    if not Path(spec).is_dir() and parse_raw_pixels(spec) is None:
        raise ValueError(f"{spec}: expected a saved model folder or raw-pixels:N")

    weights = Path(spec) / "open_clip_model.safetensors"
    want = {"model": spec, "weights_sha256": file_digest(weights) if weights.is_file() else None,
            "suite_sha256": file_digest(suite_path), "root": str(root.resolve()), "only": only,
            "exclude": list(exclude)}
    stamp = out_dir / ".mmrl" / "evaluated.json"  # not beside the result files: `mmrl eval table` reads those
    summary = next(iter(sorted(out_dir.glob("suite_*.json"))), None) if out_dir.is_dir() else None
    if not force and summary and stamp.is_file() and json.loads(stamp.read_text()) == want:
        log(f"eval {spec}: reusing {out_dir}")
        return read_suite(summary), True
    if out_dir.exists():
        shutil.rmtree(out_dir)
    device = default_device()
    em = load_eval_model(spec, device=device)
    opts = RunOptions(device=device, batch_size=batch_size, num_workers=workers, out_dir=out_dir)
    suite = load_suite(suite_path, root=root)
    run_suite(em, opts, suite, only=only, exclude=exclude, log=lambda m: log(f"eval {out_dir.name}: {m}"))
    atomic_write_text(stamp, json.dumps(want, indent=1) + "\n")
    return read_suite(out_dir / f"suite_{suite.name}.json"), False
