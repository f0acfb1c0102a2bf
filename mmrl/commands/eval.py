"""``mmrl eval``: retrieval, zero-shot, linear probe, image retrieval, cross-style retrieval, suites and
result tables."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .registry import command

_TASK_HELP = {
    "retrieval": "image-text retrieval on COCO / Flickr30k-style annotations (Karpathy JSON, COCO captions, CSV)",
    "zeroshot": "zero-shot classification of an image folder or a named dataset",
    "linear-probe": "logistic-regression probe on frozen image features (regularisation swept on a val split)",
    "image-retrieval": "image-to-image retrieval: Recall@1/2/4/8 and MAP@R over labelled images",
    "cross-retrieval": "cross-style image-to-image retrieval between two folders of the same identities "
                       "(Recall@1/5/10 both ways)",
    "suite": "run a YAML list of (task, dataset) entries",
    "table": "one markdown / CSV table from result folders (mean ± std over seeds)",
}


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


def _arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="TASK", required=True)

    r = sub.add_parser("retrieval", help=_TASK_HELP["retrieval"], description=_TASK_HELP["retrieval"])
    r.add_argument("--annotations", required=True, metavar="FILE",
                   help="dataset_coco.json / dataset_flickr30k.json (Karpathy), coco_test_karpathy.json, "
                        "flickr30k_test_karpathy.txt, or BLIP's *_test.json; detected by content")
    r.add_argument("--images", default=None, metavar="ROOT",
                   help="folder the annotation's image paths are relative to (default: the file's folder)")
    r.add_argument("--split", default="test", help="Karpathy split (default test; 'all' for every image)")
    r.add_argument("--name", default=None, help="dataset name in the result (default: from the file)")
    r.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10], metavar="K", help="default 1 5 10")
    r.add_argument("--no-count-check", action="store_true",
                   help="do not assert the image/caption counts of a recognised COCO 5K / Flickr 1K test file")
    r.add_argument("--duplicate-captions", choices=("auto", "own", "shared"), default="auto",
                   help="identical caption texts under several images: 'own' = each caption's positive is its own "
                        "image (CLIP_benchmark; used for recognised COCO/Flickr tests), 'shared' = every image with "
                        "that text is a positive (default elsewhere)")
    r.add_argument("--fold-size", type=int, default=None,
                   help="also report fold-averaged recalls over folds of this many images (COCO 5K: 1000, automatic)")
    r.add_argument("--no-eccv", action="store_true", help="skip ECCV Caption / CxC metrics")
    _model_args(r)

    z = sub.add_parser("zeroshot", help=_TASK_HELP["zeroshot"], description=_TASK_HELP["zeroshot"])
    z.add_argument("--data", required=True, metavar="ROOT", help="image folder (ROOT/<class>/<image>) or a named "
                                                                 "dataset (cifar10, imagenet1k, ...)")
    z.add_argument("--root", default=None, help="where named datasets live (default datasets/)")
    z.add_argument("--split", default=None, help="split of a named dataset (default: its test split)")
    z.add_argument("--classnames", default=None, metavar="FILE",
                   help="one class name a line, in sorted folder order (default ROOT/classnames.txt if present)")
    z.add_argument("--templates", default=None, metavar="FILE", help="one template a line with {c} for the class")
    z.add_argument("--name", default=None, help="dataset name in the result")
    _model_args(z)

    lp = sub.add_parser("linear-probe", help=_TASK_HELP["linear-probe"], description=_TASK_HELP["linear-probe"])
    lp.add_argument("--train", required=True, metavar="ROOT", help="training image folder or named dataset")
    lp.add_argument("--test", required=True, metavar="ROOT", help="test image folder or named dataset")
    lp.add_argument("--root", default=None, help="where named datasets live (default datasets/)")
    lp.add_argument("--features", choices=("pooled", "embedding"), default="pooled",
                    help="pooled = pool output before visual.proj (default); embedding = normalised encode_image")
    lp.add_argument("--val-proportion", type=float, default=0.2, help="validation share of train (default 0.2)")
    lp.add_argument("--probe-seed", type=int, default=0, help="seed of the validation split (default 0)")
    lp.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit (default 1000)")
    lp.add_argument("--train-limit", type=int, default=None, metavar="N",
                    help="probe on a class-stratified subsample of at most N training images (seeded by "
                         "--probe-seed, drawn before encoding; default: all)")
    lp.add_argument("--name", default=None, help="dataset name in the result")
    _model_args(lp)

    ir = sub.add_parser("image-retrieval", help=_TASK_HELP["image-retrieval"],
                        description=_TASK_HELP["image-retrieval"])
    ir.add_argument("--data", required=True, metavar="ROOT", help="labelled image folder or named dataset")
    ir.add_argument("--root", default=None, help="where named datasets live (default datasets/)")
    ir.add_argument("--split", default=None, help="split of a named dataset (default: its test split)")
    ir.add_argument("--features", choices=("embedding", "pooled"), default="embedding",
                    help="embedding = encode_image (default); pooled = before visual.proj; both L2-normalised")
    ir.add_argument("--name", default=None, help="dataset name in the result")
    _model_args(ir)

    cr = sub.add_parser("cross-retrieval", help=_TASK_HELP["cross-retrieval"],
                        description=_TASK_HELP["cross-retrieval"] + ". An image's identity is its file stem, or "
                        "the 'concept' of its entry in a labels.json beside the folder; identities present in "
                        "only one folder are left out.")
    cr.add_argument("--query", required=True, metavar="DIR", help="query image folder")
    cr.add_argument("--gallery", required=True, metavar="DIR", help="gallery image folder")
    cr.add_argument("--root", default=None, help="folder --query / --gallery are relative to (default: as given)")
    cr.add_argument("--name", default=None, help="dataset name in the result (default QUERY-GALLERY)")
    cr.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10], metavar="K", help="default 1 5 10")
    _model_args(cr)

    s = sub.add_parser("suite", help=_TASK_HELP["suite"], description=_TASK_HELP["suite"])
    s.add_argument("file", metavar="FILE.yaml", help="suite file (eval/suites/transfer.yaml, eval/suites/demo.yaml)")
    s.add_argument("--root", default=None, help="data root (overrides the file's 'root')")
    s.add_argument("--only", default=None, help="run only entries whose name contains this (or of this task)")
    _model_args(s)

    t = sub.add_parser("table", help=_TASK_HELP["table"], description=_TASK_HELP["table"])
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
                      progress=not args.no_progress and sys.stderr.isatty(), cache_dir=cache, out_dir=Path(args.out))
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
            Path(args.output).write_text(text, encoding="utf-8")
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
    em, opts = _context(args)
    if action == "retrieval":
        from ..evaluation.retrieval import parse_ks, run_retrieval

        path, metrics = run_retrieval(em, opts, args.annotations, images=args.images, split=args.split,
                                      name=args.name, count_check=not args.no_count_check,
                                      duplicate_captions=args.duplicate_captions, fold_size=args.fold_size,
                                      eccv=not args.no_eccv, recall_k=parse_ks(args.recall_k))
    elif action == "zeroshot":
        from ..evaluation.zeroshot import run_zeroshot

        path, metrics = run_zeroshot(em, opts, args.data, root=args.root, split=args.split or _test_split(args.data),
                                     classnames=args.classnames, templates=args.templates, name=args.name)
    elif action == "linear-probe":
        from ..evaluation.linear_probe import LinearProbeOptions, run_linear_probe

        options = LinearProbeOptions(features=args.features, val_proportion=args.val_proportion,
                                     seed=args.probe_seed, max_iter=args.max_iter)
        path, metrics = run_linear_probe(em, opts, args.train, args.test, root=args.root,
                                         train_split=_train_split(args.train), test_split=_test_split(args.test),
                                         name=args.name, options=options, train_limit=args.train_limit)
    elif action == "cross-retrieval":
        from ..evaluation.cross_retrieval import run_cross_retrieval
        from ..evaluation.retrieval import parse_ks

        path, metrics = run_cross_retrieval(em, opts, args.query, args.gallery, root=args.root, name=args.name,
                                            recall_k=parse_ks(args.recall_k))
    else:
        from ..evaluation.image_retrieval import run_image_retrieval

        path, metrics = run_image_retrieval(em, opts, args.data, root=args.root,
                                            split=args.split or _test_split(args.data), features=args.features,
                                            name=args.name)
    _report(path, metrics)
    return 0


def _test_split(data: str) -> str:
    from ..evaluation.datasets import NAMED_DATASETS

    spec = NAMED_DATASETS.get(data)
    return spec.splits[1] if spec and not Path(data).exists() else "test"


def _train_split(data: str) -> str:
    from ..evaluation.datasets import NAMED_DATASETS

    spec = NAMED_DATASETS.get(data)
    return spec.splits[0] if spec and not Path(data).exists() else "train"


@command("eval", "evaluate a model: retrieval, zero-shot, linear probe, image and cross-style retrieval, suites, "
                 "tables", _arguments)
def cmd_eval(args: argparse.Namespace) -> int:
    return _run(args)
