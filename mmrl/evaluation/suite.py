"""Suites: a YAML list of (task, dataset) entries run against one model.

.. code-block:: yaml

    suite: transfer                # name (default: the file's stem)
    root: datasets                 # data paths are relative to this (relative: to the working dir)
    entries:
      - {task: zeroshot, dataset: cifar10}
      - {task: linear-probe, dataset: cifar10, train_limit: 10000}
      - {task: zeroshot, name: tux, data: tuxpaint/zeroshot, templates: [a drawing of {c}.]}
      - {task: retrieval, name: tux, annotations: tuxpaint/dataset_tuxpaint.json, floor: true,
         hint: "mmrl prepare tuxpaint --root data"}

An entry's ``task`` is a registered task (:mod:`.tasks`) and its other keys are the fields of
that task's options (:mod:`.options`): the same as the ``mmrl eval TASK`` flags, ``_`` for ``-``
(``val_proportion`` is ``--val-proportion``; ``eccv: false`` is ``--no-eccv``), checked the same
way -- a bad value or an unknown key is one error naming the entry and the key. Data paths
(``annotations``, ``images``, ``data``, ``train``, ``test``, ``query``, ``gallery``) are relative to
the suite's ``root``, which is also where named datasets (``dataset``) live; ``classnames`` /
``templates`` files are relative to the YAML file (``templates`` may be a list).

Every entry also takes ``hint`` (shown when its data is missing), ``trained_on: true`` (the set
holds items the model trained on: a fit diagnostic) and ``floor: true`` (the set decides a
quality floor, e.g. the demo's); an entry cannot be both. A missing dataset is *skipped* (with
where to put it), not failed; so are tasks that need a text tower for a model without one
(``--model raw-pixels``).

:func:`run_suite` returns one :class:`EntryResult` per entry run and writes them to
``OUT/suite_<name>.json``; :func:`read_suite_results` reads that file back.
"""
from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..fileio import NoSpaceLeft, atomic_write_text
from .context import EvalModel, RunOptions, has_text_encoder
from .datasets import DatasetMissing
from .options import TaskOptions, data_paths, in_suite, options_from_entry
from .tasks import get_task, tasks

__all__ = ["Suite", "SuiteEntry", "EntryResult", "load_suite", "run_suite", "format_summary", "read_suite_results"]

_COMMON = ("task", "hint", "trained_on", "floor")  # keys of every entry besides its task's options
_LABEL_KEYS = ("name", "dataset", "data", "annotations", "train", "query")


@dataclass
class SuiteEntry:
    task: str
    options: TaskOptions  # the task's options, as written in the suite file
    index: int
    hint: str = ""
    trained_on: bool = False  # the set holds items the model trained on (a fit diagnostic)
    floor: bool = False       # the set decides a quality floor

    @property
    def label(self) -> str:
        values = (getattr(self.options, k, None) for k in _LABEL_KEYS)
        return str(next((v for v in values if v), None) or f"entry {self.index}")


@dataclass
class Suite:
    name: str
    path: Path
    root: Path
    entries: list[SuiteEntry]
    description: str = ""


@dataclass
class EntryResult:
    """What became of one suite entry: ``status`` ok | skipped | failed, the result file and its
    numeric metrics, and the entry's ``trained_on`` / ``floor`` marks."""

    name: str
    task: str
    status: str
    message: str = ""
    result: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    trained_on: bool = False
    floor: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.task, self.name

    def headline(self) -> float | None:
        """The task's headline metric (:class:`~.tasks.Headline`); ``None`` unless the entry ran."""
        return get_task(self.task).headline.value(self.metrics) if self.status == "ok" else None

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "name": self.name, "status": self.status, "message": self.message,
                "result": self.result, "metrics": self.metrics, "trained_on": self.trained_on, "floor": self.floor}


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flag(raw: dict, key: str, where: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def load_suite(path: str | Path, root: str | Path | None = None) -> Suite:
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
    known = tasks()
    entries = []
    for n, raw in enumerate(data["entries"]):
        if not isinstance(raw, dict) or raw.get("task") not in known:
            raise ValueError(f"{path}: entries[{n}] needs 'task' (one of {', '.join(known)})")
        task = known[raw["task"]]
        where = f"{path}: entries[{n}] ({task.name})"
        trained_on, floor = _flag(raw, "trained_on", where), _flag(raw, "floor", where)
        if trained_on and floor:
            raise ValueError(f"{where}: an entry cannot be both floor: true and trained_on: true")
        try:
            options = options_from_entry(task.options, {k: v for k, v in raw.items() if k not in _COMMON})
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        entries.append(SuiteEntry(task.name, options, n, str(raw.get("hint") or ""), trained_on, floor))
    base = Path(root if root is not None else data.get("root", "."))
    return Suite(str(data.get("suite") or path.stem), path, base, entries, str(data.get("description", "")))


def _missing(suite: Suite, options: TaskOptions, hint: str) -> str | None:
    """Why the entry's data is absent (``None`` when its files are there); ``options`` resolved."""
    for p in map(Path, data_paths(options)):
        if not p.exists():
            return f"{p} not found" + (f"; {hint.replace('ROOT', str(suite.root))}" if hint else "")
    return None


def _result(e: SuiteEntry, status: str, message: str = "", path: str | None = None,
            metrics: dict[str, Any] | None = None) -> EntryResult:
    return EntryResult(e.label, e.task, status, message, path, _numbers(metrics or {}), e.trained_on, e.floor)


def run_suite(em: EvalModel, opts: RunOptions, suite: Suite, *, only: str | None = None,
              exclude: Sequence[str] = (), log: Callable[[str], None] = print) -> list[EntryResult]:
    """Run every entry (or those whose task or name contains ``only``, minus those whose task
    is or name contains one of ``exclude``); never stops at a failure, but for a full disk. Writes the results to
    ``opts.out_dir/suite_<name>.json`` and returns them."""
    results: list[EntryResult] = []
    for e in suite.entries:
        if only and only not in e.label and only != e.task:
            continue
        if any(x in e.label or x == e.task for x in exclude):
            continue
        task = get_task(e.task)
        options = in_suite(e.options, suite.root, suite.path.parent)
        if task.needs_text and not has_text_encoder(em.model):
            why = f"{em.info.source} has no text encoder"
        else:
            why = _missing(suite, options, e.hint)
        if why:
            results.append(_result(e, "skipped", why))
            log(f"[{e.task}] {e.label}: skipped ({why})")
            continue
        log(f"[{e.task}] {e.label}: running")
        try:
            path, metrics = task.run(em, opts, options)
            results.append(_result(e, "ok", "", str(path), metrics))
        except NoSpaceLeft:
            raise  # every later write fails too: stop, the finished entries' files stay
        except DatasetMissing as err:
            results.append(_result(e, "skipped", str(err)))
            log(f"[{e.task}] {e.label}: skipped ({err})")
        except Exception as err:  # noqa: BLE001 - a suite reports failures and goes on
            msg = f"{type(err).__name__}: {err}"
            results.append(_result(e, "failed", msg))
            log(f"[{e.task}] {e.label}: FAILED ({msg})")
            if not isinstance(err, (ValueError, FileNotFoundError)):
                log(traceback.format_exc())
    summary = {"suite": suite.name, "file": str(suite.path), "root": str(suite.root), "model": em.info.as_dict(),
               "entries": [r.as_dict() for r in results]}
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(opts.out_dir / f"suite_{suite.name}.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return results


def read_suite_results(path: str | Path) -> list[EntryResult]:
    """The entries of a ``suite_<name>.json`` written by :func:`run_suite` (an evaluation finished
    earlier), as :func:`run_suite` returned them."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [EntryResult(e["name"], e["task"], e["status"], e.get("message", ""), e.get("result"),
                        _numbers(e.get("metrics") or {}), bool(e.get("trained_on", False)), bool(e.get("floor", False)))
            for e in data.get("entries", [])]


def format_summary(results: list[EntryResult]) -> str:
    """A markdown table: entry, task, status, headline metric (:class:`~.tasks.Headline`), file or reason."""
    lines = ["| entry | task | status | headline | result / reason |", "|---|---|---|---|---|"]
    for r in results:
        value = r.headline()
        shown = "" if value is None else f"{get_task(r.task).headline.label}: {100 * value:.2f}%"
        lines.append(f"| {r.name} | {r.task} | {r.status} | {shown} | {r.result or r.message} |")
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    lines.append("")
    lines.append(f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed")
    return "\n".join(lines)
