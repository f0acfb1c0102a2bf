"""``mmrl demo --study``: the paper's claim (GGeM beats the class token, average pooling and GeM)
tested at the demo's scale -- the same recipe and budget for every pooling, several seeds each,
every metric as mean +- std in one table (``mmrl eval table``), a plot with error bars and a
verdict written from the numbers.

A difference "exceeds the seed spread" when the two poolings' mean +- one sample standard
deviation intervals do not overlap (with 3 seeds this is a coarse test, said as such).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..evaluation import EntryResult, get_task
from ..evaluation.table import build_table, collect, mean_std
from ..fileio import atomic_write_text
from .config import DemoConfig
from .plots import plot_study
from .run import analyze_for_report
from .steps import evaluate, prepare_corpora, run_training, train_shards

__all__ = ["run_study", "Stat", "compare_pools", "verdict_sentences", "dependence_values", "dependence_lines"]

_BASELINE_POOLS = ("tok", "avg", "gem")


@dataclass
class Stat:
    mean: float
    std: float  # sample std (0 with one seed)
    n: int

    @property
    def lo(self) -> float:
        return self.mean - self.std

    @property
    def hi(self) -> float:
        return self.mean + self.std


def _stat(values: list[float]) -> Stat:
    mean, std, n = mean_std(values)  # the same statistics as the `mmrl eval table` cells
    return Stat(mean, std or 0.0, n)


def separated(a: Stat, b: Stat) -> bool:
    """True when the +-1 std intervals do not overlap (and there is more than one seed each)."""
    return a.n > 1 and b.n > 1 and (a.lo > b.hi or b.lo > a.hi)


def compare_pools(values: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Stat]]:
    """metric -> pool -> per-seed values  =>  metric -> pool -> Stat."""
    return {m: {p: _stat(v) for p, v in per.items() if v} for m, per in values.items()}


def verdict_sentences(stats: dict[str, dict[str, Stat]], focus: str = "ggem") -> list[str]:
    """Sentences written from the numbers: the winner per metric (and whether its lead over the
    runner-up exceeds the seed spread), then ``focus`` against each baseline pooling."""
    out = []
    wins: dict[str, int] = {}
    clear: dict[str, int] = {}
    for metric, per in stats.items():
        ranked = sorted(per.items(), key=lambda kv: kv[1].mean, reverse=True)
        if len(ranked) < 2:
            continue
        (w, ws), (r, rs) = ranked[0], ranked[1]
        wins[w] = wins.get(w, 0) + 1
        sep = separated(ws, rs)
        clear[w] = clear.get(w, 0) + int(sep)
        out.append(f"- {metric}: **{w}** is best ({100 * ws.mean:.1f} ± {100 * ws.std:.1f}), ahead of {r} "
                   f"({100 * rs.mean:.1f} ± {100 * rs.std:.1f}) by {100 * (ws.mean - rs.mean):.1f} points, "
                   + ("which exceeds the seed spread." if sep else "within the seed spread."))
    n_metrics = sum(1 for per in stats.values() if len(per) >= 2)
    if not n_metrics:
        return ["Not enough poolings were run to compare."]
    board = ", ".join(f"{p} {wins[p]} ({clear.get(p, 0)} beyond the spread)"
                      for p in sorted(wins, key=wins.get, reverse=True))
    summary = [f"Best mean per metric, over {n_metrics} metrics: {board}."]
    compared, beaten = [], []
    for base in _BASELINE_POOLS:
        pairs = [(per[focus], per[base]) for per in stats.values() if focus in per and base in per]
        if not pairs:
            continue
        compared.append(base)
        higher = sum(1 for f, b in pairs if f.mean > b.mean)
        above = sum(1 for f, b in pairs if f.mean > b.mean and separated(f, b))
        below = sum(1 for f, b in pairs if f.mean < b.mean and separated(f, b))
        summary.append(f"{focus} vs {base}: higher mean on {higher} of {len(pairs)} metrics; clearly higher "
                       f"(beyond the seed spread) on {above}, clearly lower on {below}.")
        if above > below:
            beaten.append(base)
    if compared and len(beaten) == len(compared):
        summary.append(f"At this scale the paper's claim holds: {focus} beats {', '.join(compared)} on more metrics "
                       "beyond the seed spread than it loses to each.")
    elif compared:
        summary.append(f"At this scale the paper's claim is not confirmed: {focus} does not clearly beat "
                       f"{', '.join(b for b in compared if b not in beaten)} (the differences are within the seed "
                       "spread, or against it).")
    return summary + [""] + out


_ESTIMATORS = (("hsic_offdiag_mean", "HSIC"), ("cka_offdiag_mean", "linear CKA"))


def dependence_values(analyses: dict[str, list[dict]]) -> dict[str, dict[str, list[float]]]:
    """pool -> each seed's ``mmrl analyze`` result => estimator -> pool -> per-seed mean off-diagonal
    dependence of the model's own pooling (the trained model's groups as it pools them)."""
    from ..analysis.report import own_row

    out: dict[str, dict[str, list[float]]] = {key: {} for key, _ in _ESTIMATORS}
    for pool, runs in analyses.items():
        for analysis in runs:
            row = analysis["dependence"][own_row(analysis)]
            for key, _ in _ESTIMATORS:
                out[key].setdefault(pool, []).append(float(row[key]))
    return out


def dependence_lines(values: dict[str, dict[str, list[float]]], focus: str = "ggem") -> list[str]:
    """The table (mean ± std over seeds per pooling and estimator) and, per estimator, whether ``focus``'s
    dependence is lower than every other pooling's beyond the seed spread."""
    stats = compare_pools(values)
    pools = list(dict.fromkeys(p for per in stats.values() for p in per))
    if not pools:
        return ["No trained model was analysed (the held-out Twemoji images were not prepared)."]
    lines = ["| pooling | " + " | ".join(f"{label} (mean ± std)" for _, label in _ESTIMATORS) + " | seeds |",
             "|---|" + "---|" * len(_ESTIMATORS) + "---|"]
    for pool in pools:
        cells = [f"{stats[k][pool].mean:.4f} ± {stats[k][pool].std:.4f}" if pool in stats[k] else "–"
                 for k, _ in _ESTIMATORS]
        n = max(stats[k][pool].n for k, _ in _ESTIMATORS if pool in stats[k])
        lines.append(f"| {pool} | " + " | ".join(cells) + f" | {n} |")
    lines.append("")
    for key, label in _ESTIMATORS:
        per = stats[key]
        others = [p for p in per if p != focus]
        if focus not in per or not others:
            lines.append(f"- {label}: {focus} and at least one other pooling are needed to compare.")
            continue
        f = per[focus]
        lower = [p for p in others if f.mean < per[p].mean and separated(f, per[p])]
        not_lower = [p for p in others if p not in lower]
        if not not_lower:
            lines.append(f"- {label}: {focus}'s head-wise dependence ({f.mean:.4f} ± {f.std:.4f}) is lower than every "
                         f"other pooling's ({', '.join(others)}) beyond the seed spread: the paper's claim holds here.")
        else:
            lines.append(f"- {label}: {focus}'s head-wise dependence ({f.mean:.4f} ± {f.std:.4f}) is not lower than "
                         f"{', '.join(not_lower)}'s beyond the seed spread"
                         + (f" (it is lower than {', '.join(lower)}'s)" if lower else "")
                         + ": the paper's claim is not confirmed at this scale.")
    return lines


def _headline_values(entries: list[EntryResult]) -> dict[str, float]:
    """One number per evaluated entry (its headline metric), keyed by a readable label."""
    out = {}
    for e in entries:
        v = e.headline()
        if v is not None and math.isfinite(v):
            out[f"{e.name} {e.task} ({get_task(e.task).headline.label})"] = v
    return out


def learned_p_sentences(finals: dict[str, list[list[float]]], init: float = 3.0) -> list[str]:
    """pool -> each seed's final exponents (one per group) => sentences on how far they moved."""
    out = []
    for pool, runs in finals.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        lo, hi = min(min(r) for r in runs), max(max(r) for r in runs)
        spread = sum(max(r) - min(r) for r in runs) / len(runs)
        groups = len(runs[0])
        text = (f"{pool}: final p over {len(runs)} seeds in [{lo:.2f}, {hi:.2f}] (init {init:g}); "
                + (f"across its {groups} groups the exponents differ by {spread:.2f} on average." if groups > 1
                   else "one exponent for all channels."))
        if groups > 1 and spread < 0.5:
            text += (" With exponents this close to each other, grouped pooling computes nearly what single-p GeM "
                     "computes at this budget.")
        out.append(text)
    return out


def _final_p(train_dir: Path) -> list[float]:
    from .plots import read_log

    log = train_dir / "log.jsonl"
    rows = [r for r in read_log(log) if isinstance(r.get("ggem_p"), list)] if log.is_file() else []
    return [float(v) for v in rows[-1]["ggem_p"]] if rows else []


def run_study(cfg: DemoConfig, *, force: bool = False, log: Callable[[str], None] = print) -> dict:
    t_all = time.perf_counter()
    root, out = Path(cfg.root).resolve(), Path(cfg.study.out)
    out.mkdir(parents=True, exist_ok=True)
    prepare_corpora(cfg.corpora, root, cfg.limit_for, log)
    shards = train_shards(root, cfg.train_corpora)
    runs: list[tuple[str, int, Path]] = []
    headlines: dict[str, dict[str, float]] = {}  # run -> headline metric -> value
    seconds: dict[str, float] = {}
    analyses: dict[str, list[dict]] = {}  # pool -> each seed's `mmrl analyze` of its trained model
    total = len(cfg.study.pools) * len(cfg.study.seeds)
    try:
        previous = json.loads((out / "study.json").read_text(encoding="utf-8")).get("seconds", {})
    except (OSError, ValueError):
        previous = {}
    for pool in cfg.study.pools:
        for seed in cfg.study.seeds:
            name = f"{pool}-seed{seed}"
            log(f"study run {len(runs) + 1}/{total}: {name}")
            t0 = time.perf_counter()
            extra = dict(cfg.study.overrides(), pool=pool, seed=seed)
            if pool not in ("gem", "ggem", "cgem"):
                extra["pool_kwargs"] = {}
            tcfg = cfg.train_config(shards, out / name / "train", extra=extra, prefix="study.train.")
            _, train_reused = run_training(tcfg, force, log)
            entries, eval_reused = evaluate(str(out / name / "train" / "model"), Path(cfg.suite), root,
                     out / "eval" / name, only=cfg.study.only or cfg.only, batch_size=cfg.eval_batch_size,
                     workers=cfg.eval_workers, log=log, force=force, exclude=cfg.study.exclude)
            # a reused run keeps the time measured when it ran (study.json of that invocation)
            reused = train_reused and eval_reused
            seconds[name] = previous.get(name, time.perf_counter() - t0) if reused else time.perf_counter() - t0
            runs.append((pool, seed, out / "eval" / name))
            headlines[name] = _headline_values(entries)
            analysis = analyze_for_report(out / name / "train" / "model", root, out / name / "analysis", log)
            if analysis is not None:
                analyses.setdefault(pool, []).append(analysis)
    # one table, exactly what `mmrl eval table runs/study/eval/*` prints
    columns = collect([str(d) for _, _, d in runs])
    table = build_table(columns)
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "table.csv", build_table(columns, fmt="csv"))
    values: dict[str, dict[str, list[float]]] = {}
    for pool, seed, _ in runs:
        for metric, v in headlines[f"{pool}-seed{seed}"].items():
            values.setdefault(metric, {}).setdefault(pool, []).append(v)
    stats = compare_pools(values)
    plot = plot_study({m: {p: (100 * s.mean, 100 * s.std, s.n) for p, s in per.items()} for m, per in stats.items()},
                      out / "study.png")
    finals: dict[str, list[list[float]]] = {}
    for pool, seed, _ in runs:
        if pool in ("gem", "ggem", "cgem"):
            finals.setdefault(pool, []).append(_final_p(out / f"{pool}-seed{seed}" / "train"))
    sentences = (verdict_sentences(stats) + ["", "Learned exponents:", ""]
                 + [f"- {t}" for t in learned_p_sentences(finals)])
    runtime = time.perf_counter() - t_all
    per_run = sorted(seconds.values())
    lines = ["# Pooling study", "",
             f"Poolings {', '.join(cfg.study.pools)}; seeds {', '.join(map(str, cfg.study.seeds))}; the demo's recipe "
             f"and budget for each (overrides: {cfg.study.overrides() or 'none'}).", "",
             "## Verdict", ""] + sentences + [
             "", "Intervals are mean ± one sample standard deviation over seeds; \"beyond the seed spread\" means "
             "the two intervals do not overlap.", "",
             "## Head-wise dependence", "",
             "Mean off-diagonal dependence between the head-aligned channel groups of each trained model's own "
             "pooled features (`mmrl analyze` on the held-out Twemoji images), over seeds:", ""]
    lines += dependence_lines(dependence_values(analyses)) + [
             "", "## Headline metrics", "", "![pooling study](study.png)", "",
             "## Every metric (`mmrl eval table " + " ".join(str(d) for _, _, d in runs) + "`)", "", table,
             "## Runtime", "",
             f"{len(runs)} runs took {sum(per_run) / 60:.1f} min of training and evaluation (median "
             f"{per_run[len(per_run) // 2] / 60:.1f} min per run, slowest {per_run[-1] / 60:.1f} min) on "
             f"{os.cpu_count()} cores; this invocation took {runtime / 60:.1f} min (finished runs are reused).", ""]
    atomic_write_text(out / "study.md", "\n".join(lines))
    result = {"runs": [f"{p}-seed{s}" for p, s, _ in runs], "seconds": seconds, "runtime_s": runtime,
              "stats": {m: {p: vars(s) for p, s in per.items()} for m, per in stats.items()},
              "verdict": sentences, "dependence": dependence_values(analyses), "table": str(out / "table.md"),
              "plot": str(plot)}
    atomic_write_text(out / "study.json", json.dumps(result, indent=1) + "\n")
    log(f"study: {out / 'study.md'} ({runtime / 60:.1f} min)")
    return result
