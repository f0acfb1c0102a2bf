"""Result files: ``DIR/{dataset}_{task}.json`` in CLIP_benchmark's schema plus a ``protocol`` block.

CLIP_benchmark writes ``{"dataset", "model", "pretrained", "task", "metrics", "language"}``;
mmrl adds ``protocol`` (split, counts and options of the run) and ``mmrl`` (version, time,
pooling, weights fingerprint). Values that are not finite numbers are written as ``null``, so
the file is strict JSON.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text
from .context import ModelInfo

__all__ = ["result_path", "write_result", "read_result", "dataset_slug"]


def dataset_slug(name: str) -> str:
    """File-name-safe dataset name (``/`` becomes ``_`` as in CLIP_benchmark)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace("/", "_")) or "dataset"


def result_path(out_dir: str | os.PathLike, dataset: str, task: str) -> Path:
    return Path(out_dir) / f"{dataset_slug(dataset)}_{task}.json"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _clean(value.item())
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_result(out_dir: str | os.PathLike, dataset: str, task: str, metrics: dict[str, Any], model: ModelInfo,
                 protocol: dict[str, Any], *, fingerprint: str | None = None, language: str = "en") -> Path:
    """Write one result file atomically and return its path. ``task`` is the CLIP_benchmark task
    name of a registered task (:func:`.tasks.task_of_result`: ``zeroshot_retrieval``, ...)."""
    from mmrl import __version__

    from .tasks import task_of_result, tasks

    if task_of_result(task) is None:
        known = ", ".join(t.result_task for t in tasks().values())
        raise ValueError(f"unknown task {task!r}; expected one of {known}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(out, dataset, task)
    record = {
        "dataset": dataset, "model": model.model, "pretrained": model.pretrained, "task": task,
        "metrics": _clean(metrics), "language": language, "protocol": _clean(protocol),
        "mmrl": {"version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pool": model.pool,
                 "model_source": model.source, "weights_sha256": fingerprint},
    }
    atomic_write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """Load a result file, checking the fields every consumer relies on."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON result file ({err})") from err
    missing = [k for k in ("dataset", "task", "metrics") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path}: not a result file (missing {', '.join(missing)})")
    if not isinstance(data["metrics"], dict):
        raise ValueError(f"{path}: 'metrics' is not an object")
    return data
