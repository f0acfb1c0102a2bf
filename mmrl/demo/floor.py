"""The demo's quality floor: the trained model must beat every baseline by a clear margin on
each held-out retrieval set (text-image, cross-style and same-style image retrieval) and on
Fashion-MNIST zero-shot. A baseline that cannot run an entry (raw pixels have no text side) is
not compared there; a set the suite marks ``trained_on`` (training items) is a fit diagnostic and
never a floor set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from .results import HEADLINE, EntryMetrics

__all__ = ["FloorCheck", "floor_checks", "FLOOR_TASKS"]

FLOOR_TASKS = ("retrieval", "cross-retrieval", "image-retrieval")
FLOOR_ZEROSHOT = ("fashion-mnist",)


@dataclass
class FloorCheck:
    task: str
    name: str
    metric: str
    trained: Optional[float]
    baselines: Dict[str, float]
    margin: float

    @property
    def best_baseline(self) -> Optional[str]:
        return max(self.baselines, key=self.baselines.get) if self.baselines else None

    @property
    def gap(self) -> Optional[float]:
        if self.trained is None or not self.baselines:
            return None
        return self.trained - max(self.baselines.values())

    @property
    def passed(self) -> bool:
        return self.gap is not None and self.gap >= self.margin


def floor_checks(trained: List[EntryMetrics], baselines: Dict[str, List[EntryMetrics]], margin: float) -> List[FloorCheck]:
    """One check per floor entry the trained model was evaluated on."""
    by_key = {label: {e.key: e for e in entries} for label, entries in baselines.items()}
    checks = []
    for e in trained:
        if not (e.task in FLOOR_TASKS or (e.task == "zeroshot" and e.name in FLOOR_ZEROSHOT)):
            continue
        if e.status == "skipped" or e.trained_on:
            continue
        base = {}
        for label, entries in by_key.items():
            other = entries.get(e.key)
            value = other.headline() if other is not None else None
            if value is not None:
                base[label] = value
        checks.append(FloorCheck(e.task, e.name, HEADLINE[e.task][1], e.headline(), base, margin))
    return checks
