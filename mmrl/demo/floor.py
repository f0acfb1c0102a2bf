"""The demo's quality floor: the trained model must beat every floor baseline by a clear margin,
in its task's headline metric (:class:`mmrl.evaluation.Headline`), on each set its suite marks
``floor: true`` (the demo suite: every held-out retrieval set -- text-image, cross-style and
same-style image retrieval -- and Fashion-MNIST zero-shot). A baseline that cannot run an entry
(raw pixels have no text side) is not compared there; a set the suite marks ``trained_on``
(training items) is a fit diagnostic and never a floor set (the suite cannot mark it both).
Baselines outside the floor (``beside``) are carried along per set so that the report can show
the trained model's gap to them too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluation import EntryResult, get_task

__all__ = ["FloorCheck", "floor_checks"]


@dataclass
class FloorCheck:
    task: str
    name: str
    metric: str
    trained: float | None
    baselines: dict[str, float]
    margin: float
    beside: dict[str, float] = field(default_factory=dict)  # baselines reported beside the floor

    @property
    def best_baseline(self) -> str | None:
        return max(self.baselines, key=self.baselines.get) if self.baselines else None

    @property
    def gap(self) -> float | None:
        if self.trained is None or not self.baselines:
            return None
        return self.trained - max(self.baselines.values())

    @property
    def passed(self) -> bool:
        return self.gap is not None and self.gap >= self.margin


def _headlines(by_key: dict[str, dict[tuple, EntryResult]], key: tuple) -> dict[str, float]:
    values = {}
    for label, entries in by_key.items():
        other = entries.get(key)
        value = other.headline() if other is not None else None
        if value is not None:
            values[label] = value
    return values


def floor_checks(trained: list[EntryResult], baselines: dict[str, list[EntryResult]], margin: float,
                 beside: dict[str, list[EntryResult]] | None = None) -> list[FloorCheck]:
    """One check per ``floor`` entry the trained model was evaluated on, against ``baselines``;
    ``beside``: baselines whose headline values are recorded per set but do not decide the floor."""
    by_key = {label: {e.key: e for e in entries} for label, entries in baselines.items()}
    beside_by_key = {label: {e.key: e for e in entries} for label, entries in (beside or {}).items()}
    checks = []
    for e in trained:
        if not e.floor or e.trained_on or e.status == "skipped":
            continue
        checks.append(FloorCheck(e.task, e.name, get_task(e.task).headline.label, e.headline(),
                                 _headlines(by_key, e.key), margin, _headlines(beside_by_key, e.key)))
    return checks
