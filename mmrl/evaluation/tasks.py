"""The evaluation task registry: every task ``mmrl eval`` knows, declared once, in its own module.

A :class:`Task` names the task (the ``mmrl eval TASK`` subcommand and the suite entry's ``task:``),
the CLIP_benchmark ``task`` its result files carry (``zeroshot_retrieval``, ...), its options (a
dataclass of :class:`~.options.TaskOptions`: the ``mmrl eval TASK`` flags and the suite entry's
keys are both derived from its fields), its headline metric (one number per evaluated set: the
``mmrl eval suite`` summary, the demo's quality floor and plots), the metrics it shows (the demo
report's rows; with the extra ones, the default rows of ``mmrl eval table``), whether it needs a
text tower, and its run function ``run(model, run_options, options) -> (result path, metrics)``.

Each task module ends with ``register(Task(...))``; importing :mod:`mmrl.evaluation` imports the
built-in ones (:mod:`.retrieval`, :mod:`.zeroshot`, :mod:`.linear_probe`,
:mod:`.image_retrieval`, :mod:`.cross_retrieval`). A task from elsewhere is one more module that
registers itself (and :func:`unregister` takes it out again).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Metric", "Headline", "Task", "register", "unregister", "get_task", "tasks", "task_of_result",
           "recall_curve", "mean_recall_curve"]


@dataclass(frozen=True)
class Metric:
    """A metric of a task's result files: its key and a label for tables. ``report``: a row of
    the demo report (every declared metric is a default row of ``mmrl eval table``)."""

    key: str
    label: str
    report: bool = True


@dataclass(frozen=True)
class Headline:
    """One number per evaluated set: the mean of the metrics ``keys`` (one key: that metric)."""

    label: str
    keys: tuple[str, ...]

    def value(self, metrics: Mapping[str, float]) -> float | None:
        """The headline of ``metrics`` (``None`` when one of its keys is missing)."""
        vals = [metrics.get(k) for k in self.keys]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)


@dataclass(frozen=True)
class Task:
    """An evaluation task (see the module docstring)."""

    name: str                 # the CLI subcommand and the suite entry's ``task:`` (e.g. ``linear-probe``)
    result_task: str          # the CLIP_benchmark ``task`` of its result files (e.g. ``linear_probe``)
    title: str                # what the task is, in words (report tables)
    help: str                 # one line for ``mmrl eval --help``
    options: type             # a TaskOptions dataclass: the CLI flags and the suite keys
    run: Callable[..., tuple[Path, dict[str, float]]]  # run(EvalModel, RunOptions, options)
    headline: Headline
    metrics: tuple[Metric, ...]
    needs_text: bool = False  # skipped for a model without a text tower (raw pixels)
    recall_curve: Callable[[Mapping[str, float]], dict[int, float]] | None = None  # K -> recall, for plots
    description: str = ""     # more for ``mmrl eval TASK --help`` (default: ``help``)

    @property
    def shown(self) -> tuple[Metric, ...]:
        """The metrics of the demo report's results table, in order."""
        return tuple(m for m in self.metrics if m.report)

    @property
    def table_metrics(self) -> tuple[str, ...]:
        """The default rows of ``mmrl eval table`` for this task's result files."""
        return tuple(m.key for m in self.metrics)


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` (its ``name`` and ``result_task`` must be new, or belong to the task it replaces)."""
    for other in _REGISTRY.values():
        if other.name != task.name and other.result_task == task.result_task:
            raise ValueError(f"task {task.name!r}: result task {task.result_task!r} is already {other.name!r}'s")
    _REGISTRY[task.name] = task
    return task


def unregister(name: str) -> None:
    """Take task ``name`` out of the registry (no error when it is not there)."""
    _REGISTRY.pop(name, None)


def _load_builtin() -> None:
    from .. import evaluation  # noqa: F401  (importing the package registers the built-in tasks)


def tasks() -> dict[str, Task]:
    """Every registered task by name, built-in ones first, in registration order."""
    _load_builtin()
    return dict(_REGISTRY)


def get_task(name: str) -> Task:
    """The task called ``name`` (a ValueError lists the known ones)."""
    known = tasks()
    if name not in known:
        raise ValueError(f"unknown evaluation task {name!r} (tasks: {', '.join(known)})")
    return known[name]


def task_of_result(result_task: str) -> Task | None:
    """The task whose result files carry CLIP_benchmark ``task`` ``result_task``."""
    return next((t for t in tasks().values() if t.result_task == result_task), None)


def recall_curve(metrics: Mapping[str, float], prefix: str = "") -> dict[int, float]:
    """K -> ``{prefix}recall@K`` for the K a result has (1, 2, 4, 5, 8, 10)."""
    return {k: metrics[f"{prefix}recall@{k}"] for k in (1, 2, 4, 5, 8, 10) if f"{prefix}recall@{k}" in metrics}


def mean_recall_curve(metrics: Mapping[str, float], prefixes: tuple[str, str]) -> dict[int, float]:
    """K -> the mean of the two directions' recall@K (``prefixes``: the two metric-name prefixes)."""
    a, b = recall_curve(metrics, prefixes[0]), recall_curve(metrics, prefixes[1])
    return {k: (a[k] + b[k]) / 2 for k in a if k in b}
