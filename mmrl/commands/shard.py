"""``mmrl shard build`` and ``mmrl shard check``."""
from __future__ import annotations

import argparse
import json
import os

from .registry import command


def _arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="write shards from a table, a folder, COCO or Karpathy annotations",
                       description="Write img2dataset-layout webdataset shards "
                                   "(jpg/txt/json, *_stats.json, sizes.json).")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", metavar="FILE", help="CSV/TSV/parquet of local image paths and captions")
    src.add_argument("--folder", metavar="DIR", help="images with same-stem .txt captions")
    src.add_argument("--coco", metavar="FILE", help="COCO captions JSON (captions_train2014.json style)")
    src.add_argument("--karpathy", metavar="FILE",
                     help="Karpathy split file (dataset_coco.json, dataset_flickr30k.json)")
    b.add_argument("--images", metavar="ROOT", help="image root for --coco / --karpathy")
    b.add_argument("--splits", default="train,restval", help="Karpathy splits to include (default: train,restval)")
    b.add_argument("--out", required=True, metavar="DIR", help="output folder")
    b.add_argument("--max-size", type=int, default=256, help="longer image side after resizing (default 256)")
    b.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default 10000)")
    b.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    b.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    b.add_argument("--image-col", default="image", help="table column with image paths (default image)")
    b.add_argument("--caption-col", default="caption", help="table column with captions (default caption)")
    b.add_argument("--join-extra-fields", action="store_true",
                   help="CSV/TSV whose caption column is the last one: join a row's extra fields (unquoted "
                        "delimiters in the caption) back into the caption instead of failing")
    b.add_argument("--force", action="store_true",
                   help="rebuild every shard, ignoring finished shards already in --out")
    b.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("check", help="read every shard and image; (re)write sizes.json",
                       description="Read every shard, decode every image, check image+caption per sample.")
    c.add_argument("shards", help="folder, glob or brace pattern (a::b for several)")
    c.add_argument("--from-stats", action="store_true", help="only build sizes.json from *_stats.json (tars unopened)")
    c.add_argument("--max-listed", type=int, default=10, help="bad samples listed per shard (default 10)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--no-progress", action="store_true")


def _records(args: argparse.Namespace):
    from ..data import sources

    if args.csv:
        return sources.read_table(args.csv, args.image_col, args.caption_col,
                                  join_extra_fields=args.join_extra_fields)
    if args.join_extra_fields:
        raise ValueError("--join-extra-fields applies to --csv tables only")
    if args.folder:
        return sources.read_folder(args.folder)
    if not args.images:
        raise ValueError("--images ROOT is required with --coco and --karpathy")
    if args.coco:
        return sources.read_coco(args.coco, args.images)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    return sources.read_karpathy(args.karpathy, args.images, splits)


def _build(args: argparse.Namespace) -> int:
    from ..data.shards import build_shards, format_summary

    if os.path.exists(args.out) and not os.path.isdir(args.out):  # before reading a possibly large input
        raise ValueError(f"--out {args.out}: is a file, not a folder")
    records = _records(args)
    if not records:
        raise ValueError("the input has no records")
    summary = build_shards(records, args.out, max_size=args.max_size, shard_size=args.shard_size,
                           workers=args.workers, quality=args.quality, progress=not args.no_progress,
                           force=args.force)
    print(format_summary(summary))
    return 0


def _check(args: argparse.Namespace) -> int:
    from ..data.check import check_shards, sizes_from_stats

    if args.from_stats:
        sizes = sizes_from_stats(args.shards)
        print(f"{args.shards}/sizes.json: {len(sizes)} shards, {sum(sizes.values()):,} samples (from *_stats.json)")
        return 0
    reports = check_shards(args.shards, progress=not args.no_progress)
    if args.json:
        print(json.dumps([r.__dict__ for r in reports], indent=1))
    else:
        width = max(len(r.path) for r in reports)
        print(f"{'shard':<{width}}  {'good':>8}  {'bad':>6}  status")
        for r in reports:
            print(f"{r.path:<{width}}  {r.samples:>8}  {len(r.bad):>6}  {'ok' if r.ok else r.error}")
            for bad in r.bad[: args.max_listed]:
                print(f"    bad sample {bad['key']}: {bad['reason']}")
    unreadable = [r for r in reports if not r.ok]
    good, bad = sum(r.samples for r in reports), sum(len(r.bad) for r in reports)
    print(f"{len(reports)} shards, {good:,} good samples, {bad:,} bad samples, {len(unreadable)} unreadable shards")
    return 1 if unreadable else 0


@command("shard", "build and check webdataset shards (img2dataset layout)", _arguments)
def cmd_shard(args: argparse.Namespace) -> int:
    return _build(args) if args.action == "build" else _check(args)
