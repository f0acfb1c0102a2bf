"""The demo's view of suite results (:class:`mmrl.evaluation.EntryResult`): Recall@K curves for
the plot and metric formatting for the report. Which metrics a task shows, its headline and their
labels come from the task registry (:mod:`mmrl.evaluation.tasks`)."""
from __future__ import annotations

import math

from ..evaluation import EntryResult, get_task

__all__ = ["recall_curves", "fmt_metric"]


def recall_curves(entry: EntryResult) -> dict[int, float]:
    """K -> recall for the R@K plot (the task's :attr:`~mmrl.evaluation.Task.recall_curve`:
    text-image retrieval averages both directions); empty for tasks without one."""
    curve = get_task(entry.task).recall_curve
    return curve(entry.metrics) if curve is not None else {}


def fmt_metric(value: float | None, key: str = "") -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return "nan"
    return f"{value:.2f}" if key == "rsum" else f"{100 * value:.1f}"
