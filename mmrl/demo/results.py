"""Reading a suite's results back for the report: per model, per evaluation entry, its metrics.

``mmrl eval suite`` writes ``suite_<name>.json`` (every entry's status, result file and
metrics) beside the per-task result JSONs; these helpers read that summary and pick the
metrics the report shows, in CLIP_benchmark's names.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ["SHOWN_METRICS", "HEADLINE", "EntryMetrics", "read_suite", "recall_curves", "fmt_metric"]

# suite task -> (metric key, label) rows shown in the report, in order
SHOWN_METRICS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "retrieval": (("image_retrieval_recall@1", "text→image R@1"), ("image_retrieval_recall@5", "text→image R@5"),
                  ("image_retrieval_recall@10", "text→image R@10"), ("text_retrieval_recall@1", "image→text R@1"),
                  ("text_retrieval_recall@5", "image→text R@5"), ("text_retrieval_recall@10", "image→text R@10")),
    "cross-retrieval": (("q2g_recall@1", "query→gallery R@1"), ("g2q_recall@1", "gallery→query R@1"),
                        ("recall@1", "mean R@1"), ("recall@5", "mean R@5")),
    "zeroshot": (("acc1", "top-1"), ("acc5", "top-5"), ("mean_per_class_recall", "mean per-class recall")),
    "image-retrieval": (("recall@1", "R@1"), ("map@r", "MAP@R")),
    "linear-probe": (("lp_acc1", "top-1"),),
}
# one number per entry for checks and plots: mean recall over both directions and K in {1, 5, 10}
HEADLINE: Dict[str, Tuple[str, str]] = {
    "retrieval": ("mean_recall", "mean R@1/5/10, both directions"),
    "cross-retrieval": ("recall@1", "mean R@1, both directions"),
    "zeroshot": ("acc1", "top-1"),
    "image-retrieval": ("recall@1", "R@1"),
    "linear-probe": ("lp_acc1", "top-1"),
}


@dataclass
class EntryMetrics:
    name: str
    task: str
    status: str
    message: str = ""
    result: Optional[str] = None
    metrics: Dict[str, float] = field(default_factory=dict)
    trained_on: bool = False  # the suite marks the set as training items (a fit diagnostic)

    @property
    def key(self) -> Tuple[str, str]:
        return self.task, self.name

    def headline(self) -> Optional[float]:
        if self.status != "ok":
            return None
        if self.task == "retrieval":
            keys = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
            vals = [self.metrics.get(k) for k in keys]
            return None if any(v is None for v in vals) else sum(vals) / len(vals)
        return self.metrics.get(HEADLINE[self.task][0])


def read_suite(path: Path) -> List[EntryMetrics]:
    """The entries of a ``suite_<name>.json`` summary."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [EntryMetrics(e["name"], e["task"], e["status"], e.get("message", ""), e.get("result"),
                         {k: float(v) for k, v in (e.get("metrics") or {}).items() if isinstance(v, (int, float))},
                         bool(e.get("trained_on", False)))
            for e in data.get("entries", [])]


def recall_curves(entry: EntryMetrics) -> Dict[int, float]:
    """K -> recall for the R@K plot: retrieval averages both directions, the others use their own."""
    m = entry.metrics
    out: Dict[int, float] = {}
    for k in (1, 2, 4, 5, 8, 10):
        if entry.task == "retrieval":
            a, b = m.get(f"image_retrieval_recall@{k}"), m.get(f"text_retrieval_recall@{k}")
            if a is not None and b is not None:
                out[k] = (a + b) / 2
        elif f"recall@{k}" in m:
            out[k] = m[f"recall@{k}"]
    return out


def fmt_metric(value: Optional[float], key: str = "") -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return "nan"
    return f"{value:.2f}" if key == "rsum" else f"{100 * value:.1f}"
