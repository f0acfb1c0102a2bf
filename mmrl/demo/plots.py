"""The demo report's PNG plots (matplotlib, headless Agg backend).

Each function takes plain data (lists and dicts read from ``log.jsonl`` and the result JSONs),
writes one PNG atomically and returns its path.
"""
from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..figures import pyplot, save_png

__all__ = ["read_log", "plot_loss", "plot_pooling_p", "plot_recalls", "plot_study"]

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def _pyplot():
    return pyplot("drawing the demo report's plots")  # the demo extra's


def _save(fig, path: Path) -> Path:
    return save_png(fig, path, dpi=110)


def read_log(path: Path) -> list[dict]:
    """The records of a training ``log.jsonl`` (lines that do not parse are ignored)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss(records: Sequence[dict], path: Path, title: str = "training loss") -> Path:
    """Contrastive loss per logged step, with the learned temperature on a second axis."""
    plt = _pyplot()
    rows = [r for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=_COLORS[0], label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("contrastive loss", color=_COLORS[0])
    ax.grid(alpha=0.3)
    scale = [(r["step"], r["logit_scale"]) for r in rows if isinstance(r.get("logit_scale"), (int, float))]
    if scale:
        ax2 = ax.twinx()
        ax2.plot(*zip(*scale), color=_COLORS[1], linestyle="--", label="logit scale")
        ax2.set_ylabel("logit scale (1 / temperature)", color=_COLORS[1])
    ax.set_title(title)
    return _save(fig, path)


def plot_pooling_p(records: Sequence[dict], path: Path, init: float | None = None,
                   title: str = "GGeM exponent p per channel group") -> Path:
    """Left: each group's p over training; right: the final p per group (bars), with the
    initial value as a reference line."""
    plt = _pyplot()
    rows = [r for r in records if isinstance(r.get("ggem_p"), list) and r["ggem_p"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    if not rows:
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "no learnable p (pooling without exponents)", ha="center", va="center")
            ax.set_axis_off()
        return _save(fig, path)
    steps = [r["step"] for r in rows]
    groups = len(rows[-1]["ggem_p"])
    for g in range(groups):
        ax1.plot(steps, [r["ggem_p"][g] if g < len(r["ggem_p"]) else math.nan for r in rows],
                 color=_COLORS[g % len(_COLORS)] if groups <= len(_COLORS) else None, linewidth=1)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("p")
    ax1.set_title(f"{groups} group{'s' if groups != 1 else ''} over training")
    ax1.grid(alpha=0.3)
    final = rows[-1]["ggem_p"]
    ax2.bar(range(groups), final, color=[_COLORS[g % len(_COLORS)] for g in range(groups)] if groups <= 64 else None)
    if init is not None:
        ax2.axhline(init, color="black", linestyle=":", linewidth=1, label=f"init p = {init:g}")
        ax2.legend(loc="lower right", fontsize=8)
    lo, hi = min(final + ([init] if init is not None else [])), max(final + ([init] if init is not None else []))
    pad = max(0.05, 0.15 * (hi - lo))
    ax2.set_ylim(max(0.0, lo - pad), hi + pad)
    ax2.set_xlabel("channel group")
    ax2.set_ylabel("final p")
    ax2.set_title(f"after step {steps[-1]}")
    fig.suptitle(title)
    return _save(fig, path)


def plot_recalls(sets: Mapping[str, Mapping[str, Mapping[int, float]]], path: Path,
                 title: str = "Recall@K per evaluation set") -> Path:
    """``sets``: eval set -> model label -> {K: recall in [0, 1]}; one panel per set, grouped
    bars (K on the x axis, one bar per model, one colour per model throughout)."""
    plt = _pyplot()
    names = list(sets)
    models = list(dict.fromkeys(m for name in names for m in sets[name]))
    color = {m: _COLORS[j % len(_COLORS)] for j, m in enumerate(models)}
    cols = min(3, max(1, len(names)))
    rows_n = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        present = [m for m in models if m in sets[name]]
        ks = sorted({k for m in present for k in sets[name][m]})
        width = 0.8 / max(1, len(present))
        top = 0.0
        for j, m in enumerate(present):
            xs = [ks.index(k) + (j - (len(present) - 1) / 2) * width for k in sets[name][m]]
            ys = [100 * v for v in sets[name][m].values()]
            ax.bar(xs, ys, width, label=m, color=color[m])
            top = max([top] + ys)
        ax.set_xticks(range(len(ks)), [f"R@{k}" for k in ks])
        ax.set_ylim(0, min(100.0, max(5.0, 1.15 * top)))
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("%")
    for i in range(len(names), rows_n * cols):
        axes[i // cols][i % cols].set_axis_off()
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[m]) for m in models]
    fig.legend(handles, models, loc="upper right", ncol=len(models), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, path)


def plot_study(metrics: Mapping[str, Mapping[str, tuple[float, float, int]]], path: Path,
               title: str = "pooling study: mean +- std over seeds") -> Path:
    """``metrics``: metric label -> pooling -> (mean, std, seeds); one panel per metric with
    error bars of one sample standard deviation."""
    plt = _pyplot()
    names = list(metrics)
    cols = min(4, max(1, len(names)))
    rows_n = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.4 * cols, 2.9 * rows_n), squeeze=False)
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        pools = list(metrics[name])
        means = [metrics[name][p][0] for p in pools]
        stds = [metrics[name][p][1] if math.isfinite(metrics[name][p][1]) else 0.0 for p in pools]
        ax.bar(range(len(pools)), means, yerr=stds, capsize=3,
               color=[_COLORS[j % len(_COLORS)] for j in range(len(pools))])
        ax.set_xticks(range(len(pools)), pools, fontsize=8)
        lo = min(m - s for m, s in zip(means, stds))
        hi = max(m + s for m, s in zip(means, stds))
        pad = max(0.5, 0.25 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.set_title(textwrap.fill(name, 38), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for i in range(len(names), rows_n * cols):
        axes[i // cols][i % cols].set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
