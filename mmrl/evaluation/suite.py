"""Suites: a YAML list of (task, dataset) entries run against one model.

.. code-block:: yaml

    suite: transfer                # name (default: the file's stem)
    root: datasets                 # data paths are relative to this (relative: to the working dir)
    entries:
      - {task: zeroshot, dataset: cifar10}
      - {task: linear-probe, dataset: cifar10}
      - {task: zeroshot, name: tux, data: tuxpaint/zeroshot, templates: [a drawing of {c}.]}
      - {task: retrieval, name: tux, annotations: tuxpaint/dataset_tuxpaint.json,
         hint: "mmrl prepare tuxpaint --root data"}

Entry keys by task -- ``retrieval``: ``annotations``, ``images``, ``split``, ``count_check``,
``duplicate_captions``, ``fold_size``; ``zeroshot``: ``dataset`` or ``data``, ``split``,
``classnames``, ``templates`` (file or list); ``linear-probe``: ``dataset`` or ``train`` +
``test``, ``train_split``, ``test_split``, ``features``, ``train_limit`` (probe on a
class-stratified subsample of at most this many training images); ``image-retrieval``:
``dataset`` or ``data``, ``split``, ``features``; ``cross-retrieval``: ``query`` + ``gallery``
(two image folders). All take ``name`` (the result's dataset name) and ``hint`` (shown when the
data is missing). ``classnames`` / ``templates`` files are relative to the YAML file. A missing
dataset is *skipped* (with where to put it), not failed; so are text tasks (``retrieval``,
``zeroshot``) for a model without a text encoder (``--model raw-pixels``).
"""
from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .context import EvalModel, RunOptions, has_text_encoder
from .datasets import NAMED_DATASETS, DatasetMissing

__all__ = ["Suite", "SuiteEntry", "EntryResult", "load_suite", "run_suite", "format_summary"]

_KEYS = {
    "retrieval": {"annotations", "images", "split", "count_check", "duplicate_captions", "fold_size"},
    "zeroshot": {"dataset", "data", "split", "classnames", "templates"},
    "linear-probe": {"dataset", "train", "test", "train_split", "test_split", "features", "train_limit", "max_iter",
                     "grid_points"},
    "image-retrieval": {"dataset", "data", "split", "features"},
    "cross-retrieval": {"query", "gallery"},
}
_COMMON = {"task", "name", "hint", "trained_on"}  # trained_on: true marks a fit diagnostic on training items
_NEEDS = {"retrieval": ("annotations",), "linear-probe": ("train", "test"), "cross-retrieval": ("query", "gallery")}
_TEXT_TASKS = ("retrieval", "zeroshot")


@dataclass
class SuiteEntry:
    task: str
    spec: Dict[str, Any]
    index: int

    @property
    def label(self) -> str:
        s = self.spec
        return str(s.get("name") or s.get("dataset") or s.get("data") or s.get("annotations") or s.get("train")
                   or s.get("query") or f"entry {self.index}")

    @property
    def trained_on(self) -> bool:
        """The suite marks the set as items the model trained on (a fit diagnostic)."""
        return bool(self.spec.get("trained_on", False))


@dataclass
class Suite:
    name: str
    path: Path
    root: Path
    entries: List[SuiteEntry]
    description: str = ""


@dataclass
class EntryResult:
    entry: SuiteEntry
    status: str  # ok | skipped | failed
    message: str = ""
    result: Optional[str] = None
    metrics: Dict[str, float] = field(default_factory=dict)


def load_suite(path: str | Path, root: Optional[str | Path] = None) -> Suite:
    """Parse and validate a suite file (``root`` overrides the file's ``root``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: suite file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError(f"{path}: expected a mapping with an 'entries' list")
    entries = []
    for n, raw in enumerate(data["entries"]):
        if not isinstance(raw, dict) or raw.get("task") not in _KEYS:
            raise ValueError(f"{path}: entries[{n}] needs 'task' (one of {', '.join(_KEYS)})")
        task = raw["task"]
        unknown = set(raw) - _KEYS[task] - _COMMON
        if unknown:
            raise ValueError(f"{path}: entries[{n}] ({task}): unknown keys {sorted(unknown)}")
        need = _NEEDS.get(task, ("data",))
        if "dataset" not in raw and not all(k in raw for k in need):
            either = "" if "dataset" not in _KEYS[task] else "'dataset' or "
            raise ValueError(f"{path}: entries[{n}] ({task}) needs {either}{' + '.join(need)}")
        if not isinstance(raw.get("trained_on", False), bool):
            raise ValueError(f"{path}: entries[{n}] ({task}): trained_on must be true or false, got {raw['trained_on']!r}")
        limit = raw.get("train_limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"{path}: entries[{n}] ({task}): train_limit must be a positive integer, got {limit!r}")
        if "dataset" in raw and raw["dataset"] not in NAMED_DATASETS:
            raise ValueError(f"{path}: entries[{n}]: unknown dataset {raw['dataset']!r} "
                             f"(named datasets: {', '.join(NAMED_DATASETS)})")
        entries.append(SuiteEntry(task, dict(raw), n))
    base = Path(root if root is not None else data.get("root", "."))
    return Suite(str(data.get("suite") or path.stem), path, base, entries, str(data.get("description", "")))


def _file(suite: Suite, value: Any) -> Any:
    """Template / class-name files are relative to the suite file; inline lists pass through."""
    if isinstance(value, str):
        p = Path(value)
        return str(p if p.is_absolute() else suite.path.parent / p)
    return value


def _missing(suite: Suite, e: SuiteEntry) -> Optional[str]:
    """Why the entry's data is absent (``None`` when its files are there)."""
    s, root = e.spec, suite.root
    for key in ("annotations", "data", "train", "test", "query", "gallery"):
        if key in s and "dataset" not in s:
            p = root / str(s[key])
            if not p.exists():
                return f"{p} not found" + (f"; {str(s['hint']).replace('ROOT', str(root))}" if s.get("hint") else "")
    return None


def _probe_options(s: Dict[str, Any]):
    """The entry's probe settings: ``features``, and the solver budget ``max_iter`` (L-BFGS
    iterations per fit) and ``grid_points`` (regularisation values on the log grid)."""
    from .linear_probe import LinearProbeOptions

    defaults = LinearProbeOptions()
    return LinearProbeOptions(features=s.get("features", "pooled"), max_iter=int(s.get("max_iter", defaults.max_iter)),
                              grid_points=int(s.get("grid_points", defaults.grid_points)))


def _run_entry(em: EvalModel, opts: RunOptions, suite: Suite, e: SuiteEntry):
    from .cross_retrieval import run_cross_retrieval
    from .image_retrieval import run_image_retrieval
    from .linear_probe import run_linear_probe
    from .retrieval import run_retrieval
    from .zeroshot import run_zeroshot

    s, root = e.spec, suite.root
    name = s.get("name")
    if e.task == "retrieval":
        images = s.get("images")
        return run_retrieval(em, opts, root / s["annotations"], images=(root / images) if images else None,
                             split=s.get("split", "test"), name=name, count_check=s.get("count_check", True),
                             duplicate_captions=s.get("duplicate_captions", "auto"), fold_size=s.get("fold_size"))
    if e.task == "cross-retrieval":
        return run_cross_retrieval(em, opts, root / s["query"], root / s["gallery"], name=name)
    named = NAMED_DATASETS.get(s.get("dataset", ""))
    splits = named.splits if named else ("train", "test")
    data = (s.get("dataset") or str(root / s["data"])) if e.task != "linear-probe" else None
    if e.task == "zeroshot":
        return run_zeroshot(em, opts, data, root=str(root), split=s.get("split", splits[1]),
                            classnames=_file(suite, s.get("classnames")), templates=_file(suite, s.get("templates")),
                            name=name)
    if e.task == "image-retrieval":
        return run_image_retrieval(em, opts, data, root=str(root), split=s.get("split", splits[1]),
                                   features=s.get("features", "embedding"), name=name)
    train = s.get("dataset") or str(root / s["train"])
    test = s.get("dataset") or str(root / s["test"])
    return run_linear_probe(em, opts, train, test, root=str(root), train_split=s.get("train_split", splits[0]),
                            test_split=s.get("test_split", splits[1]), name=name,
                            options=_probe_options(s),
                            train_limit=s.get("train_limit"))


def run_suite(em: EvalModel, opts: RunOptions, suite: Suite, *, only: Optional[str] = None,
              exclude: Sequence[str] = (), log: Callable[[str], None] = print) -> List[EntryResult]:
    """Run every entry (or those whose task or name contains ``only``, minus those whose task
    is or name contains one of ``exclude``); never stops at a failure."""
    results: List[EntryResult] = []
    for e in suite.entries:
        if only and only not in e.label and only != e.task:
            continue
        if any(x in e.label or x == e.task for x in exclude):
            continue
        if e.task in _TEXT_TASKS and not has_text_encoder(em.model):
            why = f"{em.info.source} has no text encoder"
        else:
            why = _missing(suite, e)
        if why:
            results.append(EntryResult(e, "skipped", why))
            log(f"[{e.task}] {e.label}: skipped ({why})")
            continue
        log(f"[{e.task}] {e.label}: running")
        try:
            path, metrics = _run_entry(em, opts, suite, e)
            results.append(EntryResult(e, "ok", "", str(path), metrics))
        except DatasetMissing as err:
            results.append(EntryResult(e, "skipped", str(err)))
            log(f"[{e.task}] {e.label}: skipped ({err})")
        except Exception as err:  # noqa: BLE001 - a suite reports failures and goes on
            msg = f"{type(err).__name__}: {err}"
            results.append(EntryResult(e, "failed", msg))
            log(f"[{e.task}] {e.label}: FAILED ({msg})")
            if not isinstance(err, (ValueError, FileNotFoundError)):
                log(traceback.format_exc())
    summary = {
        "suite": suite.name, "file": str(suite.path), "root": str(suite.root), "model": em.info.as_dict(),
        "entries": [{"task": r.entry.task, "name": r.entry.label, "status": r.status, "message": r.message,
                     "result": r.result, "metrics": r.metrics, "trained_on": r.entry.trained_on}
                    for r in results],
    }
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    (opts.out_dir / f"suite_{suite.name}.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return results


_HEADLINE = {"retrieval": "rsum", "zeroshot": "acc1", "linear-probe": "lp_acc1", "image-retrieval": "recall@1",
             "cross-retrieval": "recall@1"}


def format_summary(results: List[EntryResult]) -> str:
    """A markdown table: entry, task, status, headline metric, file or reason."""
    lines = ["| entry | task | status | metric | result / reason |", "|---|---|---|---|---|"]
    for r in results:
        key = _HEADLINE[r.entry.task]
        value = r.metrics.get(key)
        shown = "" if value is None else (f"{key} {value:.2f}" if key == "rsum" else f"{key} {100 * value:.2f}%")
        lines.append(f"| {r.entry.label} | {r.entry.task} | {r.status} | {shown} | {r.result or r.message} |")
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    lines.append("")
    lines.append(f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed")
    return "\n".join(lines)
