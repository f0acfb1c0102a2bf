"""``openclipart``: public-domain clip art (Debian ``openclipart-svg``) with noisy alt-text-like
captions, as webdataset training shards.

Each regular ``.svg`` under ``usr/share/openclipart/svg/<category>/`` (symbolic links, which
duplicate files into a second category, are skipped) is rendered with cairosvg (``unsafe=True``:
the files declare XML entities; external references are never fetched) into a 256 px RGBA PNG
cache, and captioned from its own metadata: the first ``<dc:title>`` (the work's title; later
ones name the publisher and author) plus the ``<dc:subject>`` keywords, e.g.
``"Full Moon: moon, astronomy, space"``. Files that fail to render or render blank are skipped
and counted.

Layout of ``root/openclipart/``::

    train/          webdataset shards (img2dataset layout; .json carries category, title, keywords)
    _render/...png  rendered images (cache)
"""
from __future__ import annotations

import html
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .common import Manifest, PrepareError, evenly_spaced, log, parallel_map, stable_hash
from .debian import fetch_deb
from .svg import RenderTask, load_cairosvg, render_file

__all__ = ["ClipMeta", "read_metadata", "clip_caption", "prepare_openclipart"]

PACKAGE = "openclipart-svg"
SVG_DIR = "usr/share/openclipart/svg"
BOX = 256
SHARD_SIZE = 1000
MAX_KEYWORDS = 8
_TITLE = re.compile(r"<dc:title(?:\s[^>]*)?>(.*?)</dc:title>", re.S)
_SUBJECT = re.compile(r"<dc:subject(?:\s[^>]*)?>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li(?:\s[^>]*)?>(.*?)</rdf:li>", re.S)
_TAG = re.compile(r"<[^>]+>")
_NOISE_KEYWORDS = {"", "unsorted", "hash", "svg", "clip art", "clipart", "image", "media", "png", "public domain"}


@dataclass
class ClipMeta:
    title: str
    keywords: list[str]
    title_from_filename: bool = False


def _text(fragment: str) -> str:
    return " ".join(html.unescape(_TAG.sub(" ", fragment)).split())


def _title_from_name(path: Path) -> str:
    stem = re.sub(r"_\d+$", "", path.stem)  # "full_moon_dan_gerhards_01" -> "full_moon_dan_gerhards"
    return " ".join(stem.replace("_", " ").replace("-", " ").split())


def read_metadata(text: str, path: Path) -> ClipMeta:
    """Title and keywords of one OpenClipart file (``text`` is its content)."""
    titles = [_text(t) for t in _TITLE.findall(text)]
    agents = {t.lower() for t in titles[1:]}  # publisher, creator, rights holder
    keywords: list[str] = []
    subject = _SUBJECT.search(text)
    if subject:
        items = _LI.findall(subject.group(1)) or subject.group(1).split(",")
        for item in items:
            for word in _text(item).split(","):
                word = " ".join(word.replace("_", " ").lower().split())
                if word not in _NOISE_KEYWORDS and word not in agents and word not in keywords:
                    keywords.append(word)
    if titles and titles[0]:
        return ClipMeta(titles[0], keywords[:MAX_KEYWORDS])
    return ClipMeta(_title_from_name(path), keywords[:MAX_KEYWORDS], title_from_filename=True)


def clip_caption(meta: ClipMeta) -> str:
    """``"Full Moon: moon, astronomy, space"`` (keywords repeating the title are left out)."""
    title_words = meta.title.lower()
    extra = [k for k in meta.keywords if k != title_words]
    return f"{meta.title}: {', '.join(extra)}" if extra else meta.title


def _process(task: tuple[str, str, str]) -> tuple[str, str, ClipMeta | None, str]:
    """Worker: metadata and render of one file. Returns ``(rel, status, meta, detail)``."""
    src, dst, rel = task
    try:
        text = Path(src).read_bytes().decode("utf-8", errors="replace")
    except OSError as err:
        return rel, "unreadable", None, str(err)
    meta = read_metadata(text, Path(src))
    result = render_file(RenderTask(src, dst, BOX, unsafe=True))
    return rel, result.status, meta, result.detail


def prepare_openclipart(root: Path, out: Path, *, limit: int | None, workers: int | None,
                        manifest: Manifest) -> None:
    """Build ``out`` (= ``root/openclipart``); fills ``manifest``."""
    from ..data import ImageTextRecord
    from ..data.shards import build_shards

    load_cairosvg("the openclipart corpus")
    deb = fetch_deb(PACKAGE, root)
    svg_dir = deb.dir / SVG_DIR
    if not svg_dir.is_dir():
        raise PrepareError(f"{svg_dir}: missing from {PACKAGE} {deb.version}; expected the SVG folder")
    manifest.sources.append(deb.source("public domain (Creative Commons Public Domain Dedication)",
                                       "OpenClipart SVG drawings and their metadata"))
    files = sorted(p for p in svg_dir.rglob("*.svg") if p.is_file() and not p.is_symlink())
    links = sum(1 for p in svg_dir.rglob("*.svg") if p.is_symlink())
    files = evenly_spaced(files, limit)
    tasks = []
    for path in files:
        rel = path.relative_to(svg_dir).as_posix()
        tasks.append((str(path), str(out / "_render" / (rel[:-4] + ".png")), rel))

    status: Counter = Counter()
    records = []
    no_title = 0
    for rel, state, meta, _detail in parallel_map(_process, tasks, workers=workers, desc="openclipart: rendering"):
        status[state] += 1
        if state not in ("ok", "cached") or meta is None:
            continue
        no_title += meta.title_from_filename
        records.append(ImageTextRecord(
            str(out / "_render" / (rel[:-4] + ".png")), [clip_caption(meta)], "openclipart",
            {"file": rel, "category": rel.split("/", 1)[0], "title": meta.title, "keywords": meta.keywords}))
    records.sort(key=lambda r: stable_hash(f"order:{r.meta['file']}"))
    summary = build_shards(records, out / "train", shard_size=SHARD_SIZE, workers=workers,
                           desc="openclipart: sharding")
    manifest.outputs["train"] = {"kind": "webdataset", "path": "train", "shards": summary["shards"],
                                 "samples": summary["samples"], "failures": summary["failures"]}
    manifest.counts.update({
        "files": len(files), "samples": summary["samples"], "skipped_symlinks": links,
        "skipped_blank": status["blank"], "skipped_render_error": status["error"] + status["unreadable"],
        "title_from_filename": no_title,
    })
    if status["error"]:
        manifest.notes.append(f"{status['error']} files could not be rendered by cairosvg")
    log(f"openclipart: {summary['samples']:,} samples in {summary['shards']} shards "
        f"({status['blank']} blank, {status['error'] + status['unreadable']} unrenderable files skipped)")
