"""Helpers shared by the corpus recipes: errors, manifests, atomic writes, image files,
Karpathy retrieval JSON, image-folder classification sets and a parallel map with progress."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from ..data.images import to_rgb
from ..fileio import atomic_write, atomic_write_text
from ..progress import progress

__all__ = [
    "PrepareError", "log", "pip_source", "stable_hash", "evenly_spaced", "atomic_write_text",
    "atomic_write_json", "save_image", "pad_to_square", "link_or_copy", "slug", "caption_tokens", "RetrievalItem",
    "write_karpathy", "write_imagefolder", "parallel_map", "Manifest", "done_manifest", "MANIFEST",
]

T = TypeVar("T")
R = TypeVar("R")

MANIFEST = "manifest.json"


class PrepareError(ValueError):
    """A recipe cannot run: a download failed or a source file is malformed (a missing Python
    package is a :class:`mmrl.deps.MissingDependency`).

    A ``ValueError`` so that the ``mmrl`` CLI prints it as one ``error:`` line."""


def log(message: str) -> None:
    """One progress line on stderr (stdout is left to the CLI's result line)."""
    print(f"mmrl prepare: {message}", file=sys.stderr, flush=True)


def pip_source(dist: str, licence: str, what: str, **extra: Any) -> dict[str, Any]:
    """Manifest entry for an installed PyPI distribution."""
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"name": dist, "client": "pip", "version": version, "license": licence, "what": what, **extra}


def stable_hash(text: str) -> int:
    """A process- and platform-independent 64-bit hash (Python's ``hash`` is salted per run)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def evenly_spaced(items: Sequence[T], limit: int | None) -> list[T]:
    """All ``items``, or ``limit`` of them spread evenly over the sequence (deterministic)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    step = len(items) / limit
    return [items[math.floor(i * step)] for i in range(limit)]


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def save_image(img: Image.Image, path: Path, *, max_size: int | None = None, flatten: bool = True,
               quality: int = 90) -> tuple[int, int]:
    """Save ``img`` atomically as PNG or JPEG (by suffix): alpha flattened onto white when
    ``flatten`` (always for JPEG), longer side shrunk to ``max_size``. Returns the saved size."""
    if flatten or path.suffix.lower() in (".jpg", ".jpeg"):
        img = to_rgb(img)
    if max_size and max(img.size) > max_size:
        scale = max_size / max(img.size)
        size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        atomic_write(path, lambda tmp: img.save(tmp, format="JPEG", quality=quality))
    else:
        atomic_write(path, lambda tmp: img.save(tmp, format="PNG", optimize=False))
    return img.size


def pad_to_square(img: Image.Image) -> Image.Image:
    """Centre ``img`` on a square canvas of its longer side: transparent where it has alpha (it is
    flattened onto white later), white otherwise. Nothing of the picture is lost or rescaled."""
    side = max(img.size)
    if img.width == img.height:
        return img
    if img.mode not in ("RGBA", "LA", "PA"):
        img = img.convert("RGB")
    canvas = Image.new(img.mode if img.mode != "PA" else "RGBA", (side, side),
                       (255, 255, 255) if img.mode == "RGB" else 0)
    canvas.paste(img.convert(canvas.mode), ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no extra disk), copying where links are not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def slug(text: str) -> str:
    """A safe, readable folder or file name: ``"T-shirt/top"`` -> ``"t-shirt-top"``,
    ``"Animals & Nature"`` -> ``"animals-and-nature"``."""
    text = text.lower().replace("&", " and ")
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return text or "unnamed"


def caption_tokens(caption: str) -> list[str]:
    """Karpathy-style tokens: lower-cased alphanumeric words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", caption.lower())


@dataclass
class RetrievalItem:
    """One image of a retrieval test set: its file (relative to the dataset JSON's folder
    through ``filepath``/``filename``) and its captions."""

    filename: str
    captions: list[str]
    filepath: str = "images"
    extra: dict[str, Any] = field(default_factory=dict)


def write_karpathy(path: Path, dataset: str, items: Sequence[RetrievalItem]) -> dict[str, int]:
    """Write a Karpathy-format ``dataset_*.json`` (every image in split ``test``) and return
    its counts. Image ids and sentence ids are consecutive from 0 in ``items`` order."""
    images, sentid = [], 0
    for imgid, item in enumerate(items):
        if not item.captions:
            raise ValueError(f"{path}: image {item.filename!r} has no caption")
        sentences = []
        for raw in item.captions:
            sentences.append({"raw": raw, "tokens": caption_tokens(raw), "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append({"filepath": item.filepath, "filename": item.filename, "split": "test", "imgid": imgid,
                       "sentids": [s["sentid"] for s in sentences], "sentences": sentences, **item.extra})
    atomic_write_json(path, {"dataset": dataset, "images": images})
    return {"images": len(images), "captions": sentid}


def write_imagefolder(out: Path, samples: Sequence[tuple[Path, str, str]],
                      display: dict[str, str]) -> dict[str, int]:
    """Lay out a zero-shot classification set: ``out/<class folder>/<file>`` (hard links to
    ``samples``' ``(image, class folder, file name)``) and ``out/classnames.txt`` with the
    human-readable name of each folder, one a line, in sorted folder order (the class indices
    of ``torchvision.datasets.ImageFolder``). Classes without images get no folder."""
    if out.exists():
        shutil.rmtree(out)
    folders = sorted({folder for _, folder, _ in samples})
    for src, folder, name in samples:
        link_or_copy(src, out / folder / name)
    atomic_write_text(out / "classnames.txt", "".join(display[f] + "\n" for f in folders))
    return {"images": len(samples), "classes": len(folders)}


def _call(fn_and_task):
    fn, task = fn_and_task
    return fn(task)


def parallel_map(fn: Callable[[T], R], tasks: Sequence[T], *, workers: int | None, desc: str,
                 unit: str = "img") -> Iterator[R]:
    """``fn`` over ``tasks`` in worker processes (results in completion order) with progress on
    stderr (``mmrl.progress``: a bar on a terminal, periodic lines otherwise). ``fn`` must be a
    module-level function; ``workers=1`` runs in this process."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    with progress(total=len(tasks), desc=desc, unit=unit, mininterval=0.5) as bar:
        if workers == 1:
            for task in tasks:
                yield fn(task)
                bar.update()
            return
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        with ctx.Pool(workers) as pool:
            for result in pool.imap_unordered(_call, ((fn, t) for t in tasks), chunksize=chunk):
                yield result
                bar.update()


@dataclass
class Manifest:
    """``root/NAME/manifest.json``: what a recipe produced (paths relative to ``root/NAME``),
    its counts, and the source packages with versions and licences.

    ``options`` holds the choices that change the output (``limit``, the recipe version); a
    manifest whose options equal the requested ones marks the corpus as already prepared."""

    recipe: str
    options: dict[str, Any]
    sources: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def write(self, out: Path) -> Path:
        """Check every listed output exists, then write the manifest last, atomically."""
        for name, entry in self.outputs.items():
            if not (out / entry["path"]).exists():
                raise RuntimeError(f"{out / entry['path']}: output {name!r} is listed but missing")
        data = {
            "recipe": self.recipe, "options": self.options,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - self.started, 1),
            "counts": self.counts, "outputs": self.outputs, "sources": self.sources, "notes": self.notes,
        }
        path = out / MANIFEST
        atomic_write_json(path, data)
        return path


def done_manifest(out: Path, options: dict[str, Any]) -> Path | None:
    """``out/manifest.json`` if it records a finished run with these ``options`` whose outputs
    are all still there, else ``None``."""
    path = out / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("options") != options:
        return None
    outputs: Iterable[dict[str, Any]] = (data.get("outputs") or {}).values()
    if not all((out / entry.get("path", "\0")).exists() for entry in outputs):
        return None
    return path
