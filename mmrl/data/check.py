"""Verify shards: read every tar, decode every image, check every sample has image and caption.

Also (re)writes ``sizes.json`` -- from the good-sample counts, or, with ``from_stats``, from
img2dataset's / mmrl's ``*_stats.json`` files without opening a tar.
"""
from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand
from PIL import Image

from ..fileio import atomic_write_text
from ..progress import progress as progress_bar
from .remote import is_remote
from .shards import write_sizes

__all__ = ["ShardReport", "expand_shards", "check_shards", "sizes_from_stats"]

NO_SHARDS = "no shards found (expected *.tar files)"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt",)


@dataclass
class ShardReport:
    path: str
    samples: int = 0           # good samples
    bad: list[dict] = field(default_factory=list)
    error: str | None = None  # the tar itself could not be read (fully)

    @property
    def ok(self) -> bool:
        return self.error is None


def expand_shards(spec: str) -> list[str]:
    """A folder (its ``*.tar``), a glob, or a brace pattern; ``::`` joins several. Local files only:
    a URL or ``pipe:`` command is a ValueError (check shards where they are stored)."""
    paths: list[str] = []
    for part in spec.split("::"):
        if is_remote(part):
            raise ValueError(f"{part}: shard check reads local shard files, not URLs or pipe: commands; run it where "
                             f"the shards are stored and publish the sizes.json it writes next to them")
        if os.path.isdir(part):
            paths.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
            continue
        for item in braceexpand(part):
            matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
            paths.extend(matches)
    if not paths:
        raise FileNotFoundError(f"{spec}: {NO_SHARDS}")
    return paths


def _split_name(name: str):
    base = os.path.basename(name)
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    return os.path.join(os.path.dirname(name), stem), ext.lower()


def _check_sample(key: str, files: dict[str, bytes]) -> str | None:
    image_key = next((k for k in IMAGE_KEYS if k in files), None)
    if image_key is None:
        return "missing_image"
    caption_key = next((k for k in CAPTION_KEYS if k in files), None)
    if caption_key is None:
        return "missing_caption"
    if not files[caption_key].decode("utf-8", errors="replace").strip():
        return "empty_caption"
    try:
        with Image.open(io.BytesIO(files[image_key])) as img:
            img.load()
    except Exception:  # any decoder failure makes the sample unusable
        return "undecodable_image"
    return None


def check_shard(path: str) -> ShardReport:
    report = ShardReport(path)
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    order: list[str] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if key is None:
                    continue
                if key not in samples:
                    order.append(key)
                samples[key][ext] = tar.extractfile(member).read()
            end_of_members = tar.offset
        # tarfile stops quietly at a cut between members; a complete archive ends in two zero blocks
        with open(path, "rb") as f:
            f.seek(end_of_members)
            if path.endswith(".tar") and f.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
                report.error = "unreadable: truncated (no end-of-archive marker)"
    except (tarfile.TarError, OSError, EOFError) as err:
        report.error = f"unreadable: {err}"
    for key in order:
        problem = _check_sample(key, samples[key])
        if problem:
            report.bad.append({"key": key, "reason": problem})
        else:
            report.samples += 1
    return report


def check_shards(spec: str, write_sizes_json: bool = True, progress: bool = True) -> list[ShardReport]:
    """Check every shard of ``spec``; writes ``sizes.json`` (good samples) in each shard folder.

    A spec that names no existing shard (a mistyped folder) raises :class:`FileNotFoundError` and
    writes nothing; a named shard that does not exist is reported unreadable but gets no
    ``sizes.json`` entry, so no folder is created and no count is overwritten with zero."""
    paths = expand_shards(spec)
    if not any(os.path.isfile(p) for p in paths):
        raise FileNotFoundError(f"{spec}: {NO_SHARDS}")
    reports = [check_shard(p) for p in progress_bar(paths, desc="checking shards", unit="shard", enabled=progress)]
    if write_sizes_json:
        by_dir: dict[str, dict[str, int]] = defaultdict(dict)
        for r in reports:
            if not os.path.isfile(r.path):
                continue
            by_dir[os.path.dirname(os.path.abspath(r.path))][os.path.basename(r.path)] = r.samples
        for folder, sizes in by_dir.items():
            target = Path(folder) / "sizes.json"
            try:  # keep the counts of shards outside this check
                merged = {**json.loads(target.read_text()), **sizes}
            except (OSError, json.JSONDecodeError):
                merged = sizes
            atomic_write_text(target, json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
    return reports


def sizes_from_stats(folder: str | Path) -> dict[str, int]:
    """``sizes.json`` from the ``*_stats.json`` files (img2dataset's ``successes``), tars unopened."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    if not any(folder.glob("*_stats.json")):
        raise FileNotFoundError(f"{folder}: no *_stats.json files (img2dataset writes one per shard)")
    return write_sizes(folder)
