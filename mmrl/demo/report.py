"""``runs/demo/report.md``: the demo's numbers beside its baselines, its plots and its files."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from ..evaluation import EntryResult, get_task
from .floor import FloorCheck
from .results import fmt_metric

__all__ = ["SECTIONS", "render_report"]

SECTIONS = ("## Summary", "## Data", "## Training", "## Results", "## Quality floor", "## Inside the pooling",
            "## Files", "## Timings")


def _title(task: str) -> str:
    """What the task is, in words (the registry's :attr:`~mmrl.evaluation.Task.title`)."""
    return get_task(task).title


def _machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{os.cpu_count()} cores, {device}, torch {torch.__version__}, Python {platform.python_version()}"


def _results_table(labels: Sequence[str], entries: dict[str, list[EntryResult]]) -> list[str]:
    head = "| evaluation set | task | metric | " + " | ".join(labels) + " |"
    lines = [head, "|" + "---|" * (3 + len(labels))]
    index = {label: {e.key: e for e in entries.get(label, [])} for label in labels}
    for e in entries[labels[0]]:
        if e.status != "ok":
            lines.append(f"| {e.name} | {_title(e.task)} | {e.status}: {e.message} |"
                         + " |" * len(labels))
            continue
        for key, label in ((m.key, m.label) for m in get_task(e.task).shown):
            if key not in e.metrics:
                continue
            cells = []
            for lab in labels:
                other = index[lab].get(e.key)
                cells.append(fmt_metric(other.metrics.get(key) if other and other.status == "ok" else None, key))
            lines.append(f"| {_set_name(e)} | {_title(e.task)} | {label} | " + " | ".join(cells) + " |")
    return lines


def _set_name(e: EntryResult) -> str:
    return f"{e.name} (training items)" if e.trained_on else e.name


def _fit_table(labels: Sequence[str], entries: dict[str, list[EntryResult]]) -> list[str]:
    """Headline metric of the sets of training items, per model: the fit diagnostic."""
    seen = [e for e in entries[labels[0]] if e.trained_on and e.status == "ok"]
    if not seen:
        return []
    index = {label: {e.key: e for e in entries.get(label, [])} for label in labels}
    lines = ["", "Sets of items the model trained on (the suite's `trained_on`; never floor sets). A trained model "
             "that does not clearly beat the baselines here does not fit its own training data in this budget: "
             "the held-out gaps above are then under-fitting, not poor transfer.", "",
             "| training-item set | task | metric | " + " | ".join(labels) + " |", "|" + "---|" * (3 + len(labels))]
    for e in seen:
        cells = [fmt_metric(index[lab][e.key].headline() if e.key in index[lab] else None) for lab in labels]
        lines.append(f"| {e.name} | {_title(e.task)} | {get_task(e.task).headline.label} | " + " | ".join(cells) + " |")
    return lines


def _floor_table(checks: list[FloorCheck], beside: Sequence[str]) -> list[str]:
    """One row per floor set; the baselines ``beside`` the floor get a column each (value and gap)."""
    head = "| evaluation set | task | metric | trained | best floor baseline | gap | "
    lines = [head + "".join(f"{b} (gap) | " for b in beside) + "verdict |", "|---|---|---|---|---|---|" +
             "---|" * len(beside) + "---|"]
    for c in checks:
        best = c.best_baseline
        base = f"{fmt_metric(c.baselines[best])} ({best})" if best else "–"
        gap = "–" if c.gap is None else f"{100 * c.gap:+.1f}"
        verdict = "pass" if c.passed else ("no baseline" if best is None else "**FAIL**")
        others = ""
        for b in beside:
            value = c.beside.get(b)
            others += "– | " if value is None or c.trained is None else \
                f"{fmt_metric(value)} ({100 * (c.trained - value):+.1f}) | "
        lines.append(f"| {c.name} | {_title(c.task)} | {c.metric} | {fmt_metric(c.trained)} | "
                     f"{base} | {gap} | {others}{verdict} |")
    return lines


def _beside_lines(checks: list[FloorCheck], beside: Sequence[str], margin: float) -> list[str]:
    """A sentence per baseline beside the floor: on how many floor sets the trained model is ahead by the margin."""
    lines = []
    for b in beside:
        compared = [c for c in checks if b in c.beside and c.trained is not None]
        if not compared:
            continue
        behind = [c for c in compared if c.trained - c.beside[b] < margin]
        lines.append(f"Against *{b}* (beside the floor, not part of it) the trained model is ahead by at least "
                     f"{100 * margin:.0f} points on {len(compared) - len(behind)} of {len(compared)} sets"
                     + (f"; not on "
                        f"{', '.join(f'{c.name} ({c.task}, {100 * (c.trained - c.beside[b]):+.1f})' for c in behind)}."
                        if behind else "."))
    return lines


def _baseline_text(cfg, shown: Sequence[str]) -> str:
    """What each baseline in the report is, with the suite entries its ``baseline_exclude`` leaves out."""
    about = {
        "untrained": "*untrained* is the same architecture untrained: every weight at random initialisation (the "
                     "recipe's seed; no pretrained weights loaded)",
        "pretrained-init": "*pretrained-init* is the recipe's model at step 0, what training starts from: its "
                           "pretrained parts (a locked text tower, a pretrained stem) loaded, the rest random",
        "raw-pixels": f"*raw-pixels* represents an image by its {cfg.raw_pixel_size}x{cfg.raw_pixel_size} RGB pixels "
                      "(nearest neighbour for image retrieval, logistic regression for the linear probe; it has no "
                      "text side)",
    }

    def text(b: str) -> str:
        skipped = cfg.baseline_exclude.get(b)
        return about[b] + (f" (entries left out, `baseline_exclude`: {', '.join(skipped)})" if skipped else "")

    return ("; ".join(text(b) for b in shown if b in about) or "none") + "."


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def render_report(*, cfg, tcfg, description, suite, summary: dict, records: list[dict], manifests: dict[str, dict],
                  entries: dict[str, list[EntryResult]], checks: list[FloorCheck], plots: dict[str, Path],
                  timings: dict[str, float], out: Path, files: list[Path], train_reused: bool,
                  measured: dict[str, float] | None = None, analysis: dict | None = None) -> str:
    """The report's markdown (every section of :data:`SECTIONS`, in order)."""
    labels = ["trained"] + [b for b in cfg.baselines if b in entries]
    floor_labels = [b for b in labels[1:] if b in cfg.floor_baselines]
    beside = [b for b in labels[1:] if b not in cfg.floor_baselines]
    failed = [c for c in checks if not c.passed]
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731 - links relative to the report
    text_tower = description.text_tower + (
        (", locked (LiT)" + (", text features cached" if tcfg.cache_text else "")) if tcfg.lock_text else ", trained")
    lines = [
        "# mmrl demo report", "",
        f"Generated {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} by `mmrl demo` "
        f"on {_machine()}.", "",
        "## Summary", "",
        f"A {tcfg.model} CLIP with **{tcfg.pool}** pooling ({text_tower}) trained for {summary.get('step')} steps of "
        f"{tcfg.batch_size} image-text pairs on {', '.join(cfg.train_corpora)} and evaluated on data it never saw: "
        f"{suite.description or 'its suite'} (`{suite.name}` suite, `{cfg.suite}`).", "",
    ]
    if checks:
        verdict = (f"**Quality floor met**: the trained model beats every floor baseline "
                   f"({', '.join(floor_labels)}) by at least "
                   f"{100 * cfg.floor_margin:.0f} points on all {len(checks)} checked sets."
                   if not failed else
                   f"**Quality floor NOT met** on {len(failed)} of {len(checks)} checked sets "
                   f"({', '.join(f'{c.name} ({c.task})' for c in failed)}): "
                   f"margin below {100 * cfg.floor_margin:.0f} points.")
        lines += [verdict, ""] + [x + "\n" for x in _beside_lines(checks, beside, cfg.floor_margin)]
    # data
    lines += ["## Data", "", "| corpus | counts | prepared in |", "|---|---|---|"]
    for name, man in manifests.items():
        counts = man.get("counts", {})
        shown = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in counts.items()
                          if not isinstance(v, dict))
        lines.append(f"| {name} | {shown} | {man.get('seconds', 0):.0f} s |")
    if cfg.prepare_limit:
        lines += ["", f"Corpora capped at {cfg.prepare_limit} source items each (`prepare_limit`): a CI-sized run."]
    # training
    last = records[-1] if records else {}
    rates = [r["samples_per_s"] for r in records if isinstance(r.get("samples_per_s"), (int, float))]
    aug = tcfg.aug
    lines += ["", "## Training", "",
              f"- recipe: `{rel(Path(tcfg.output_dir).parent / (Path(tcfg.output_dir).name + '.yaml'))}` "
              f"(the demo config's `train:` section), run in `{rel(Path(tcfg.output_dir))}`"
              + (" (reused: finished earlier with the same recipe)" if train_reused else ""),
              f"- model `{tcfg.model}`, pooling `{tcfg.pool}` {tcfg.pool_kwargs or ''}, text tower {text_tower}",
              f"- image tower: {description.image_tower}",
              f"- {summary.get('step')} steps x batch {tcfg.batch_size}, lr {tcfg.lr:g} "
              f"(warmup {tcfg.warmup_steps}, cosine), weight decay {tcfg.weight_decay:g}, "
              f"GGeM p lr x{tcfg.p_lr_mult:g}, {tcfg.precision}, ZeRO-{tcfg.zero_stage}",
              f"- augmentation: crop scale {tuple(aug.scale)}, grayscale p={aug.grayscale:g}, invert p={aug.invert:g}, "
              f"low resolution p={aug.low_res:g} (side {tuple(aug.low_res_size)})",
              *_grouping_lines(tcfg, last),
              f"- final loss {summary.get('final_loss', float('nan')):.3f}, "
              f"logit scale {last.get('logit_scale', float('nan')):.2f}, "
              f"median {sorted(rates)[len(rates) // 2] if rates else float('nan'):.0f} samples/s, "
              f"skipped samples {summary.get('skipped_samples', 0)}",
              "", f"![loss curve]({rel(plots['loss'])})", "", f"![learned p per group]({rel(plots['pooling_p'])})", ""]
    # results
    lines += ["## Results", "",
              "Recall and accuracy in percent. Baselines: " + _baseline_text(cfg, labels[1:]), ""]
    lines += _results_table(labels, entries)
    lines += ["", f"![Recall@K per evaluation set]({rel(plots['recalls'])})", ""]
    # floor
    lines += ["## Quality floor", "",
              f"Headline metric per set; pass when trained - best floor baseline "
              f"({', '.join(floor_labels) or 'none'}) >= {100 * cfg.floor_margin:.0f} points"
              + (f"; {', '.join(beside)}: shown beside the floor with the trained model's gap, "
                 f"not part of it." if beside
                 else "."), ""]
    lines += _floor_table(checks, beside) if checks else ["No floor set was evaluated."]
    lines += _fit_table(labels, entries)
    lines += ["", "## Inside the pooling", ""] + analysis_lines(analysis, rel)
    # files
    lines += ["", "## Files", ""]
    lines += [f"- `{rel(p)}`" for p in files]
    # timings
    lines += ["", "## Timings", "", "| phase | wall time |", "|---|---|"]
    lines += [f"| {k} | {_fmt_seconds(v)} |" for k, v in timings.items()]
    if measured and measured is not timings:
        lines += ["", "This run reused the finished training run; the run that trained it took:", "",
                  "| phase | wall time |", "|---|---|"]
        lines += [f"| {k} | {_fmt_seconds(v)} |" for k, v in measured.items()]
    return "\n".join(lines) + "\n"


def analysis_lines(analysis: dict | None, rel) -> list[str]:
    """The trained model's ``mmrl analyze`` (exponents, dependence per pool kind, maps), ``rel``: path -> link."""
    if analysis is None:
        return ["Not analysed: the held-out Twemoji images were not prepared (`mmrl prepare emoji`)."]
    from ..analysis.report import dependence_table, exponent_sentences

    files = {k: rel(Path(v)) for k, v in analysis["files"].items()}
    folder = Path(analysis["files"]["markdown"]).parent
    plot = lambda name: rel(folder / analysis["plots"][name])  # noqa: E731 - links relative to the report
    return [f"`mmrl analyze` of the trained model on {analysis['data']['images']} held-out Twemoji images "
            f"({analysis['seconds']['total']:.1f} s; details in [{files['markdown']}]({files['markdown']})).", "",
            *exponent_sentences(analysis["exponents"]), "",
            f"Dependence between the {analysis['model']['heads']} head-aligned channel groups of the pooled features, "
            "each pooling applied to the trained model's tokens (mean off-diagonal value; lower: less dependent):", "",
            *dependence_table(analysis["dependence"]), "",
            f"![exponents]({plot('exponents')})", "", f"![dependence]({plot('dependence')})", "",
            f"![activation maps]({plot('maps')})", "", f"![channel amplification]({plot('amplification')})"]


def _grouping_lines(tcfg, last: dict) -> list[str]:
    """The grouped-batch part of the recipe (mmrl.train.group_loss), when there is one."""
    data = tcfg.data
    if not data.group_key:
        return []
    terms = ", ".join(f"{k.replace('_', ' ')} {last[k]:.3f}" for k in ("clip_loss", "image_loss")
                      if isinstance(last.get(k), (int, float)))
    return [f"- batches of `{data.group_key}` groups of {data.group_size}"
            f"{' sharing their augmentation' if data.group_shared_aug else ''}: multi-positive CLIP loss"
            + (f" + {tcfg.image_loss_weight:g} x image-image term (temperature {tcfg.image_loss_temperature:g})"
               if tcfg.image_loss_weight > 0 else "")
            + (f"; last logged {terms}" if terms else "")
            + ("; one caption template drawn per use" if data.multi_caption else "")]
