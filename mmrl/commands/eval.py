"""``mmrl eval``: one evaluation task (every task registered in :mod:`mmrl.evaluation.tasks`, its
flags derived from its options: :mod:`.task_flags`), a suite of them, or a table of results."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..fileio import atomic_write_text
from .registry import command

_SUITE_HELP = "run a YAML list of (task, dataset) entries"
_TABLE_HELP = "one markdown / CSV table from result folders (mean ± std over seeds)"


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and run")
    g.add_argument("--model", required=True, metavar="M",
                   help="a folder written by mmrl.save_model, an architecture NAME (random init), or "
                        "raw-pixels[:SIZE] (the raw-pixel baseline, default SIZE 32; image tasks only)")
    g.add_argument("--pool", default=None, metavar="KIND", help="pooling for an architecture NAME (default ggem)")
    g.add_argument("--seed", type=int, default=0, help="random-init seed for an architecture NAME (default 0)")
    g.add_argument("--out", default="results", metavar="DIR", help="result folder (default results/)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes (default: min(4, cores))")
    amp = g.add_mutually_exclusive_group()
    amp.add_argument("--amp", dest="amp", action="store_true", default=None, help="autocast (default on CUDA)")
    amp.add_argument("--no-amp", dest="amp", action="store_false", help="full precision (default on CPU)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="feature cache (default $MMRL_CACHE_DIR or ~/.cache/mmrl/features)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _suite_keys() -> str:
    """The entry keys of each task, for ``mmrl eval suite --help``."""
    import textwrap

    from ..evaluation.options import suite_keys
    from ..evaluation.tasks import tasks

    lines = textwrap.wrap("entry keys: task, hint, trained_on (true: a fit diagnostic), floor (true: decides a "
                          "quality floor), and per task its options (the `mmrl eval TASK` flags, '_' for '-'; a "
                          "--no-x flag is x: false); data paths are relative to the suite's root:", 100)
    for task in tasks().values():
        lines += textwrap.wrap(f"{task.name}: {', '.join(suite_keys(task.options))}", 100, initial_indent="  ",
                               subsequent_indent="    ")
    return "\n".join(lines)


def _arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluation.tasks import tasks
    from .task_flags import add_task_flags

    sub = p.add_subparsers(dest="action", metavar="TASK", required=True)
    for task in tasks().values():
        tp = sub.add_parser(task.name, help=task.help, description=task.description or task.help)
        add_task_flags(tp, task)
        _model_args(tp)

    s = sub.add_parser("suite", help=_SUITE_HELP, description=_SUITE_HELP, epilog=_suite_keys(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("file", metavar="FILE.yaml", help="suite file (eval/suites/transfer.yaml, eval/suites/demo.yaml)")
    s.add_argument("--root", default=None, help="data root (overrides the file's 'root')")
    s.add_argument("--only", default=None, help="run only entries whose name contains this (or of this task)")
    _model_args(s)

    t = sub.add_parser("table", help=_TABLE_HELP, description=_TABLE_HELP)
    t.add_argument("dirs", nargs="+", metavar="DIR", help="result folders, or LABEL=DIR; -seedN suffixes are "
                                                          "grouped into one column")
    t.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    t.add_argument("--metrics", default=None, help="comma-separated metric names (default: the main ones per task)")
    t.add_argument("--output", default=None, metavar="FILE", help="write the table here instead of stdout")


def _context(args: argparse.Namespace):
    import os

    from ..evaluation.context import RunOptions, default_device, load_eval_model
    from ..evaluation.features import default_cache_dir

    device = args.device or default_device()
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    opts = RunOptions(device=device, batch_size=args.batch_size, num_workers=workers, amp=args.amp,
                      progress=not args.no_progress, cache_dir=cache, out_dir=Path(args.out))
    em = load_eval_model(args.model, args.pool, seed=args.seed, device=device)
    return em, opts


def _report(path: Path, metrics: dict) -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"{path}: {shown}")


def _run(args: argparse.Namespace) -> int:
    action = args.action
    if action == "table":
        from ..evaluation.table import build_table, collect

        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
        text = build_table(collect(args.dirs), metrics, args.format)
        if args.output:
            atomic_write_text(args.output, text)
            print(f"wrote {args.output}")
        else:
            sys.stdout.write(text)
        return 0
    if action == "suite":
        from ..evaluation.suite import format_summary, load_suite, run_suite

        suite = load_suite(args.file, args.root)
        em, opts = _context(args)
        results = run_suite(em, opts, suite, only=args.only, log=lambda m: print(m, file=sys.stderr))
        print(format_summary(results))
        return 1 if any(r.status == "failed" for r in results) else 0
    from ..evaluation.tasks import get_task
    from .task_flags import task_options

    task = get_task(action)
    options = task_options(task, args)  # checked before the model loads
    em, opts = _context(args)
    path, metrics = task.run(em, opts, options)
    _report(path, metrics)
    return 0


@command("eval", "evaluate a model: one task (retrieval, zero-shot, linear probe, ...; `mmrl eval --help` lists "
                 "them), a suite of tasks, or a table of results", _arguments)
def cmd_eval(args: argparse.Namespace) -> int:
    return _run(args)
