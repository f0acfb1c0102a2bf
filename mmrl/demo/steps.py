"""The demo's steps, each reusable on its own and each skipping work that is already done:
prepare the corpora, train (``mmrl train`` in a child process), build the baselines' models,
evaluate a model with the suite -- the baselines optionally in a second process while the model
trains (:class:`BaselineJob`; they do not depend on it).

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
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import save_config
from ..evaluation import EntryResult, read_suite_results
from ..fileio import atomic_write_text

__all__ = ["prepare_corpora", "train_shards", "finished_run", "run_training", "build_initial", "describe_recipe",
           "evaluate", "evaluation_done", "file_digest", "BaselineJob", "thread_env"]

Log = Callable[[str], None]


def prepare_corpora(names: list[str], root: Path, limits: Callable[[str], int | None], log: Log) -> dict[str, dict]:
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


def train_shards(root: Path, corpora: list[str]) -> str:
    """The ``data.train`` value for the corpora's ``train/`` shard folders ("::"-joined)."""
    parts = []
    for name in corpora:
        folder = root / name / "train"
        if not folder.is_dir() or not any(folder.glob("*.tar")):
            raise FileNotFoundError(f"{folder}: no training shards (mmrl prepare {name} --root {root})")
        parts.append(str(folder))
    return "::".join(parts)


def _recipe_matches(out: Path, cfg) -> bool | None:
    """Whether ``out/config.yaml`` (written by ``mmrl train``) is the typed config ``cfg``, ``resume``
    aside; ``None`` when there is no saved config (one that no longer loads -- unreadable, or keys
    this version does not know -- does not match)."""
    from dataclasses import replace

    from ..config import ConfigError, load_config

    path = out / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = load_config(type(cfg), path)
    except (ConfigError, OSError):
        return False
    return replace(saved, resume=cfg.resume) == cfg


def finished_run(cfg) -> dict | None:
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


def _threads_note(threads: int | None) -> str:
    return f" ({threads} CPU thread{'s' * (threads > 1)})" if threads else ""


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment of a child process limited to ``threads`` intra-op CPU threads (None: as is)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_training(cfg, force: bool, log: Log, threads: int | None = None) -> tuple[dict, bool]:
    """Train ``cfg`` with ``python -m mmrl train`` (DeepSpeed engine; ``threads`` intra-op CPU
    threads, None: torch's default) unless a finished run of the same config is there;
    ``force`` starts over. Returns the run's summary and whether it was reused (nothing
    trained now)."""
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
    log("train: " + " ".join(["mmrl", "train", str(recipe)]) + _threads_note(threads))
    proc = subprocess.run(cmd, env=thread_env(threads))
    if proc.returncode == 3:  # mmrl train's status for a run stopped by SIGTERM/SIGINT (checkpoint saved)
        raise RuntimeError(f"mmrl train {recipe} was stopped before the last step (checkpoint saved); "
                           "run the demo again to resume")
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


def describe_recipe(cfg):
    """The recipe's model as :func:`mmrl.describe_model` reads it (built without its packaged
    weights: the architecture, not the weights, is described)."""
    from ..model import create_model, describe_model

    model = create_model(cfg.model, cfg.pool, pool_kwargs=cfg.pool_kwargs or None,
                         final_ln_after_pool=cfg.final_ln_after_pool, lock_text=cfg.lock_text, pretrained=False)
    return describe_model(model)


def build_initial(cfg, dest: Path, log: Log, *, pretrained: bool) -> Path:
    """The recipe's model at step 0, created as ``mmrl train`` creates it (same seed), saved with
    ``mmrl.save_model``. ``pretrained=False``: the *untrained* baseline, every weight at random
    initialisation; ``True``: the *pretrained-init* baseline, the recipe's pretrained parts (text
    tower, stem) loaded -- what training starts from."""
    import torch

    from ..model import create_model, save_model

    label = "pretrained-init baseline" if pretrained else "untrained baseline"
    stamp = dest / "initial.json"
    want = {"model": cfg.model, "pool": cfg.pool, "pool_kwargs": cfg.pool_kwargs, "seed": cfg.seed,
            "final_ln_after_pool": cfg.final_ln_after_pool, "lock_text": cfg.lock_text, "pretrained": pretrained}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (dest / "open_clip_config.json").is_file():
        log(f"{label}: reusing {dest}")
        return dest
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, cfg.pool, pool_kwargs=cfg.pool_kwargs or None,
                         final_ln_after_pool=cfg.final_ln_after_pool, lock_text=cfg.lock_text, pretrained=pretrained)
    save_model(model, dest)
    atomic_write_text(stamp, json.dumps(want, indent=1) + "\n")
    weights = "pretrained parts loaded" if pretrained else "every weight random"
    log(f"{label}: {cfg.model} pool={cfg.pool} seed={cfg.seed} at initialisation ({weights}) -> {dest}")
    return dest


def evaluate(spec: str, suite_path: Path, root: Path, out_dir: Path, *, only: str | None, batch_size: int,
             workers: int, log: Log, force: bool = False, exclude: Sequence[str] = (),
             progress: bool = True) -> tuple[list[EntryResult], bool]:
    """Run the suite for one model (a saved folder or ``raw-pixels:N``) into ``out_dir``,
    unless the same weights were already evaluated with the same suite and filter. Returns the
    entries' results (read back from the suite summary when reused) and whether they were
    reused (nothing evaluated now)."""
    from ..evaluation.context import RunOptions, default_device, load_eval_model
    from ..evaluation.suite import load_suite, run_suite

    if not force and evaluation_done(spec, suite_path, root, out_dir, only=only, exclude=exclude):
        log(f"eval {spec}: reusing {out_dir}")
        return read_suite_results(next(iter(sorted(out_dir.glob("suite_*.json"))))), True
    want = _eval_stamp(spec, suite_path, root, only, exclude)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    device = default_device()
    em = load_eval_model(spec, device=device)
    # features cached for this evaluation only (the folder is emptied above): entries that share images or
    # captions (Fashion-MNIST test in zero-shot and linear probe, one caption list in three styles) encode them once
    opts = RunOptions(device=device, batch_size=batch_size, num_workers=workers, out_dir=out_dir, progress=progress,
                      cache_dir=out_dir / ".mmrl" / "features")
    suite = load_suite(suite_path, root=root)
    results = run_suite(em, opts, suite, only=only, exclude=exclude, log=lambda m: log(f"eval {out_dir.name}: {m}"))
    atomic_write_text(out_dir / _STAMP, json.dumps(want, indent=1) + "\n")
    return results, False


_STAMP = Path(".mmrl") / "evaluated.json"  # not beside the result files: `mmrl eval table` reads those


def _eval_stamp(spec: str, suite_path: Path, root: Path, only: str | None, exclude: Sequence[str]) -> dict:
    from ..evaluation.raw_pixels import parse_raw_pixels

    if not Path(spec).is_dir() and parse_raw_pixels(spec) is None:
        raise ValueError(f"{spec}: expected a saved model folder or raw-pixels:N")
    weights = Path(spec) / "open_clip_model.safetensors"
    return {"model": spec, "weights_sha256": file_digest(weights) if weights.is_file() else None,
            "suite_sha256": file_digest(suite_path), "root": str(root.resolve()), "only": only,
            "exclude": list(exclude)}


def evaluation_done(spec: str, suite_path: Path, root: Path, out_dir: Path, *, only: str | None,
                    exclude: Sequence[str] = ()) -> bool:
    """Whether ``out_dir`` holds the suite's results for these weights, suite file and filter."""
    stamp = out_dir / _STAMP
    if not (stamp.is_file() and any(out_dir.glob("suite_*.json"))):
        return False
    return json.loads(stamp.read_text()) == _eval_stamp(spec, suite_path, root, only, exclude)


class BaselineJob:
    """The baselines' evaluations (:func:`evaluate`, one model after the other) in a child
    process started now, so that they run while the model trains. The child has ``threads``
    intra-op CPU threads, shows no progress bars and writes its lines to ``log_path``;
    :meth:`wait` joins it (an error names the log) and returns ``{label: seconds}``. The
    results land where :func:`evaluate` puts them, so evaluating the same models afterwards
    reuses them."""

    def __init__(self, specs: dict[str, str], suite_path: Path, root: Path, out_eval: Path, *, only: str | None,
                 batch_size: int, workers: int, force: bool, threads: int | None, log_path: Path, log: Log,
                 excludes: dict[str, Sequence[str]] | None = None):
        import multiprocessing as mp

        self.log_path, self.timings_path = Path(log_path), Path(log_path).with_suffix(".json")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.timings_path.unlink(missing_ok=True)
        self.labels = list(specs)
        excludes = {label: list((excludes or {}).get(label, ())) for label in specs}
        args = (dict(specs), str(suite_path), str(root), str(out_eval), only, batch_size, workers, force, threads,
                str(self.log_path), str(self.timings_path), excludes)
        self.process = mp.get_context("spawn").Process(target=_baseline_job_main, args=args, name="mmrl-baselines")
        self.start = time.perf_counter()
        self.process.start()
        log(f"baselines: evaluating {', '.join(self.labels)} in a second process while the model trains"
            f"{_threads_note(threads)}; its log: {self.log_path}")

    def wait(self, log: Log) -> dict[str, float]:
        if self.process.is_alive():
            log("baselines: waiting for the second process")
        self.process.join()
        if self.process.exitcode != 0:
            raise RuntimeError(f"the baseline evaluations failed (exit status {self.process.exitcode}); "
                               f"see {self.log_path}")
        timings = json.loads(self.timings_path.read_text(encoding="utf-8"))
        log(f"baselines: done ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}; "
            f"{time.perf_counter() - self.start:.0f} s after they started)")
        return timings

    def stop(self) -> None:
        """Terminate the child (training failed or was interrupted)."""
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()


def _baseline_job_main(specs, suite_path, root, out_eval, only, batch_size, workers, force, threads, log_path,
                       timings_path, excludes) -> None:
    """The child of :class:`BaselineJob`: stdout and stderr (its data workers' too) go to ``log_path``."""
    with open(log_path, "w", encoding="utf-8") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    timings = {}
    for label, spec in specs.items():
        t0 = time.perf_counter()
        evaluate(spec, Path(suite_path), Path(root), Path(out_eval) / label, only=only, batch_size=batch_size,
                 workers=workers, log=lambda m: print(f"[baselines] {m}", flush=True), force=force, progress=False,
                 exclude=excludes.get(label, ()))
        timings[label] = time.perf_counter() - t0
    atomic_write_text(Path(timings_path), json.dumps(timings, indent=1) + "\n")
