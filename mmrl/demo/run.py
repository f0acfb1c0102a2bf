"""``mmrl demo``: prepare the real corpora, train a small GGeM CLIP on CPU with ``mmrl train``,
evaluate it and its baselines with the demo suite, and write ``<out>/report.md`` with plots and
result JSONs. Every step reuses finished work (see :mod:`mmrl.demo.steps`)."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from ..evaluation import get_task, load_suite
from ..fileio import atomic_write_text
from .config import DemoConfig
from .floor import floor_checks
from .plots import plot_loss, plot_pooling_p, plot_recalls, read_log
from .report import render_report
from .results import recall_curves
from .steps import (
    BaselineJob,
    build_initial,
    describe_recipe,
    evaluate,
    evaluation_done,
    prepare_corpora,
    run_training,
    train_shards,
)

__all__ = ["run_demo", "DemoOutcome", "analyze_for_report", "HELDOUT_IMAGES"]

HELDOUT_IMAGES = "emoji/heldout/twemoji/images"  # the images `mmrl analyze` looks at (under the data root)


class DemoOutcome(dict):
    """``report`` (path), ``passed`` (quality floor), ``checks``, ``timings``."""


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def analyze_for_report(model: Path, root: Path, out: Path, log: Callable[[str], None]) -> dict | None:
    """``mmrl analyze`` of ``model`` on the held-out Twemoji images into ``out`` (None when they are absent)."""
    from ..analysis import run_analysis

    images = root / HELDOUT_IMAGES
    if not images.is_dir():
        log(f"analysis skipped: no held-out images in {images} (mmrl prepare emoji --root {root})")
        return None
    result = run_analysis(str(model), str(images), out, max_images=1000, log=lambda m: None)
    log(f"analysis of {model}: {out / 'analysis.md'} ({result['seconds']:.1f} s)")
    return dict(result["analysis"], files={k: str(v) for k, v in result["files"].items()})


def run_demo(cfg: DemoConfig, *, force: bool = False, log: Callable[[str], None] = _log) -> DemoOutcome:
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    root, out = Path(cfg.root).resolve(), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    manifests = prepare_corpora(cfg.corpora, root, cfg.limit_for, log)
    timings["prepare corpora"] = time.perf_counter() - t0

    tcfg = cfg.train_config(train_shards(root, cfg.train_corpora), out / "train")
    description = describe_recipe(tcfg)
    baselines = {}
    if "untrained" in cfg.baselines:
        baselines["untrained"] = str(build_initial(tcfg, out / "untrained", log, pretrained=False))
    if "pretrained-init" in cfg.baselines:
        if description.pretrained_parts:
            baselines["pretrained-init"] = str(build_initial(tcfg, out / "pretrained-init", log, pretrained=True))
        else:
            log(f"pretrained-init baseline: {tcfg.model} has no pretrained parts (the untrained baseline is it)")
    if "raw-pixels" in cfg.baselines:
        baselines["raw-pixels"] = f"raw-pixels:{cfg.raw_pixel_size}"
    eval_args = dict(only=cfg.only, batch_size=cfg.eval_batch_size, workers=cfg.eval_workers)
    excludes = {label: list(cfg.baseline_exclude.get(label, ())) for label in baselines}
    job, pending = None, {}
    if cfg.baselines_alongside_training:  # only what is not evaluated yet (everything with --force)
        pending = {k: v for k, v in baselines.items()
                   if force or not evaluation_done(v, Path(cfg.suite), root, out / "eval" / k, only=cfg.only,
                                                   exclude=excludes[k])}
    if pending:
        job = BaselineJob(pending, Path(cfg.suite), root, out / "eval", force=force, threads=cfg.baseline_threads,
                          log_path=out / "logs" / "baselines.log", log=log, excludes=excludes, **eval_args)
    t0 = time.perf_counter()
    try:
        summary, reused_run = run_training(tcfg, force, log, threads=cfg.train_threads)
    except BaseException:
        if job is not None:
            job.stop()
        raise
    timings["train (reused)" if reused_run else "train"] = time.perf_counter() - t0
    if job is not None:
        t0 = time.perf_counter()
        for label, seconds in job.wait(log).items():
            timings[f"evaluate {label} (alongside training)"] = seconds
        timings["wait for the baselines"] = time.perf_counter() - t0

    models = {"trained": str(out / "train" / "model"), **baselines}
    entries = {}
    for label, spec in models.items():
        t0 = time.perf_counter()
        done_alongside = job is not None and label in pending
        entries[label], _ = evaluate(spec, Path(cfg.suite), root, out / "eval" / label, log=log,
                                     force=force and not done_alongside, exclude=excludes.get(label, ()), **eval_args)
        if not done_alongside:
            timings[f"evaluate {label}"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    analysis = analyze_for_report(Path(models["trained"]), root, out / "analysis", log)
    if analysis is not None:
        timings["analyze the trained model"] = time.perf_counter() - t0

    floor = {k: v for k, v in entries.items() if k in cfg.floor_baselines}
    beside = {k: v for k, v in entries.items() if k != "trained" and k not in floor}
    checks = floor_checks(entries["trained"], floor, cfg.floor_margin, beside=beside)
    records = read_log(out / "train" / "log.jsonl") if (out / "train" / "log.jsonl").is_file() else []
    plots_dir = out / "plots"
    init_p = (tcfg.pool_kwargs or {}).get("p_init", 3.0) if tcfg.pool in ("gem", "ggem", "cgem") else None
    curves = {}
    for e in entries["trained"]:
        if e.status != "ok" or get_task(e.task).recall_curve is None:
            continue
        per_model = {}
        for label, items in entries.items():
            match = next((x for x in items if x.key == e.key and x.status == "ok"), None)
            curve = recall_curves(match) if match is not None else {}
            if curve:
                per_model[label] = curve
        curves[f"{e.name} ({e.task})"] = per_model
    plots = {
        "loss": plot_loss(records, plots_dir / "loss.png", title=f"training loss ({tcfg.pool}, {tcfg.model})"),
        "pooling_p": plot_pooling_p(records, plots_dir / "ggem_p.png", init=init_p),
        "recalls": plot_recalls(curves, plots_dir / "recall_at_k.png"),
    }
    timings["total"] = time.perf_counter() - t_all
    # the run that trained keeps its measured times; a rerun that reused it reports both
    measured = timings
    if reused_run and (out / "demo.json").is_file():
        try:
            old = json.loads((out / "demo.json").read_text(encoding="utf-8"))
            measured = old.get("measured_timings") or old.get("timings") or timings
        except ValueError:
            pass
    files = sorted(p for p in (out / "eval").rglob("*.json") if ".mmrl" not in p.parts)
    files += sorted(plots.values()) + [out / "train" / "model"]
    if analysis is not None:
        files += [Path(analysis["files"][k]) for k in ("markdown", "json")]
    result = {
        "passed": all(c.passed for c in checks) and bool(checks),
        "checks": [dict(task=c.task, name=c.name, metric=c.metric, trained=c.trained, baselines=c.baselines,
                        gap=c.gap, passed=c.passed, beside=c.beside) for c in checks],
        "timings": timings,
        "measured_timings": measured,
        "train": summary,
        "model": models["trained"],
    }
    atomic_write_text(out / "demo.json", json.dumps(result, indent=1, allow_nan=True) + "\n")
    files.append(out / "demo.json")
    text = render_report(cfg=cfg, tcfg=tcfg, description=description, suite=load_suite(cfg.suite, root=root),
                         summary=summary, records=records,
                         manifests=manifests, entries=entries,
                         checks=checks, plots=plots, timings=timings, measured=measured, out=out, files=files,
                         train_reused=reused_run, analysis=analysis)
    report = atomic_write_text(out / "report.md", text)
    log(f"report: {report} ({'quality floor met' if result['passed'] else 'quality floor NOT met'}; "
        f"{timings['total'] / 60:.1f} min)")
    return DemoOutcome(report=report, **result)
