"""One table from many result folders: runs side by side, mean +- std over seeds.

Each argument is a folder of result files (``DIR`` or ``LABEL=DIR``). A column's label is
``LABEL`` or the folder's name without a trailing seed suffix (``-seed1``, ``_seed2``,
``.seed-3``), so ``runs/ggem-seed0 runs/ggem-seed1 runs/avg-seed0`` give the columns ``ggem``
(mean +- sample std over 2 seeds) and ``avg``. Rows are (dataset, task, metric); without a metric
list, a task's rows are the metrics its registered task declares (:attr:`.tasks.Task.table_metrics`).
Fractions are shown in percent; ``rsum`` (already percent) and the probe's regularisation as they are.

A folder that holds no result files itself is searched below: every subfolder that directly holds
result files becomes a column, labelled by its path relative to the folder (``LABEL/`` in front
when one was given) with seed suffixes removed from each part, so ``runs/`` holding
``ggem-seed0/eval/`` and ``ggem-seed1/eval/`` gives one column ``ggem/eval`` over 2 seeds. The
search skips ``suite_*.json``, anything under a ``.mmrl`` folder and JSON files that are not
result files (a run's ``summary.json``, a model's configs).
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .results import read_result
from .tasks import task_of_result

__all__ = ["default_metrics", "Column", "collect", "build_table", "column_label", "mean_std"]
_RAW = re.compile(r"rsum|l2_lambda|^C$")
_SEED = re.compile(r"[-_.]seed[-_]?\d+$", re.IGNORECASE)


def column_label(arg: str) -> tuple[str, Path]:
    """``LABEL=DIR`` -> (LABEL, DIR); ``DIR`` -> (its name without a seed suffix, DIR)."""
    if "=" in arg and not Path(arg).exists():
        label, path = arg.split("=", 1)
        return label, Path(path)
    path = Path(arg)
    name = path.resolve().name
    return _SEED.sub("", name) or name, path


@dataclass
class Column:
    label: str
    dirs: list[Path]
    # (dataset, task) -> metric -> values, one per seed folder
    values: dict[tuple[str, str], dict[str, list[float]]]


def _result_folders(label: str, path: Path, explicit: bool) -> list[tuple[str, Path, list[dict]]]:
    """(label, folder, results) for ``path`` itself when it holds result files, else for every
    folder below it that directly holds some (see the module docstring)."""
    files = sorted(p for p in path.glob("*.json") if not p.name.startswith("suite_"))
    if files:
        return [(label, path, [read_result(f) for f in files])]
    found: dict[Path, list[dict]] = {}
    for f in sorted(path.rglob("*.json")):
        rel = f.relative_to(path)
        if f.name.startswith("suite_") or ".mmrl" in rel.parts[:-1] or not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None  # read_result below says why
        if data is not None and not (isinstance(data, dict) and {"dataset", "task", "metrics"} <= data.keys()):
            continue  # a run's summary.json, a model's config: not results
        found.setdefault(f.parent, []).append(read_result(f))
    out = []
    for folder, results in found.items():
        rel = "/".join(_SEED.sub("", part) or part for part in folder.relative_to(path).parts)
        out.append((f"{label}/{rel}" if explicit else rel, folder, results))
    return out


def collect(args: Sequence[str]) -> list[Column]:
    """Read every ``*.json`` result file of the given folders (or of the folders below one that
    holds none itself), grouped into columns."""
    columns: OrderedDict[str, Column] = OrderedDict()
    for arg in args:
        label, path = column_label(arg)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: results folder not found")
        explicit = "=" in arg and not Path(arg).exists()
        folders = _result_folders(label, path, explicit)
        if not folders:
            raise ValueError(f"{path}: no result files (*.json), nor any in its subfolders")
        for col_label, folder, results in folders:
            col = columns.setdefault(col_label, Column(col_label, [], defaultdict(lambda: defaultdict(list))))
            col.dirs.append(folder)
            _add_results(col, results)
    return list(columns.values())


def _add_results(col: Column, results: list[dict]) -> None:
    for r in results:
        for metric, value in r["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                col.values[(r["dataset"], r["task"])][metric].append(float(value))


def default_metrics(result_task: str) -> tuple[str, ...]:
    """The rows a table shows for result files of ``result_task`` without ``--metrics``: the
    metrics its registered task declares (:attr:`.tasks.Task.table_metrics`; none if unknown)."""
    task = task_of_result(result_task)
    return task.table_metrics if task is not None else ()


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
    """``(mean, sample std or None for one value, n)`` -- the statistics of a table cell."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std, n


def _fmt(metric: str, mean: float, std: float | None, n: int) -> str:
    if _RAW.search(metric):
        text = f"{mean:.2f}" if "rsum" in metric else f"{mean:.3g}"
        sd = "" if std is None else (f" ± {std:.2f}" if "rsum" in metric else f" ± {std:.2g}")
    else:
        text, sd = f"{100 * mean:.2f}", ("" if std is None else f" ± {100 * std:.2f}")
    return text + sd + (f" (n={n})" if n > 1 else "")


def build_table(columns: list[Column], metrics: Sequence[str] | None = None, fmt: str = "markdown") -> str:
    """Markdown (``| dataset | task | metric | col... |``) or CSV (mean, std and n per column)."""
    keys = sorted({k for c in columns for k in c.values})
    rows: list[tuple[str, str, str]] = []
    for dataset, task in keys:
        present = {m for c in columns for m in c.values.get((dataset, task), {})}
        wanted = metrics or default_metrics(task) or sorted(present)
        rows.extend((dataset, task, m) for m in wanted if m in present)
    if not rows:
        raise ValueError("none of the requested metrics is in the result files")
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["dataset", "task", "metric"] + [f"{c.label}{s}" for c in columns for s in ("", " std", " n")])
        for dataset, task, m in rows:
            cells = []
            for c in columns:
                vals = c.values.get((dataset, task), {}).get(m)
                if vals:
                    mean, std, n = mean_std(vals)
                    cells += [f"{mean:.6g}", "" if std is None else f"{std:.6g}", str(n)]
                else:
                    cells += ["", "", ""]
            w.writerow([dataset, task, m] + cells)
        return buf.getvalue()
    if fmt != "markdown":
        raise ValueError(f"format must be 'markdown' or 'csv', got {fmt!r}")
    lines = ["| dataset | task | metric | " + " | ".join(c.label for c in columns) + " |",
             "|---|---|---|" + "---:|" * len(columns)]
    for dataset, task, m in rows:
        cells = []
        for c in columns:
            vals = c.values.get((dataset, task), {}).get(m)
            cells.append(_fmt(m, *mean_std(vals)) if vals else "–")
        lines.append(f"| {dataset} | {task} | {m} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Values in % (rsum: sum of six recalls in %); mean ± sample std over seed folders where n > 1.")
    return "\n".join(lines) + "\n"
