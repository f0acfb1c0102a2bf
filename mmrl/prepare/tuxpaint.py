"""``tuxpaint``: Tux Paint's stamps (Debian ``tuxpaint-stamps-default``, GPL-2) with their
human-written captions, as a held-out retrieval test set and a zero-shot set.

A stamp is ``stamps/<category>/.../<stem>.{png,svg}`` with ``<stem>.txt`` whose first line is
the English caption ("A chick inside an egg."; later lines are translations such as
``fr.utf8=...``, ignored, as are the ``.ogg``/``.wav`` sounds, which are not even unpacked).
One image per stamp: the PNG where a stamp has both (the two are the same drawing), the SVG
rendered with cairosvg otherwise; ``<stem>_mirror.png`` (a pre-mirrored copy) is skipped.
Transparent borders are cropped away (with a small margin) before flattening onto white, and
"colorable" stamps (their ``.dat`` says so; Tux Paint fills their shape with the chosen colour,
so many are drawn in white) are filled with black, Tux Paint's default colour.

Layout of ``root/tuxpaint/``::

    images/<category>__...__<stem>.jpg    alpha flattened onto white, longer side 256 px
    dataset_tuxpaint.json                 Karpathy format, every image in split "test"
    zeroshot/<category>/...jpg            the same images by top-level folder (hard links)
    zeroshot/classnames.txt               class names in sorted folder order

Captions are kept exactly as written, so several images can share one caption ("A sedan
car."); a text-to-image evaluator must count every image with that caption as a positive.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..deps import MissingDependency
from .common import (
    Manifest,
    PrepareError,
    RetrievalItem,
    evenly_spaced,
    log,
    parallel_map,
    save_image,
    write_imagefolder,
    write_karpathy,
)
from .debian import fetch_deb
from .svg import is_blank, load_cairosvg, render_svg

__all__ = ["Stamp", "read_caption", "find_stamps", "crop_to_content", "prepare_tuxpaint"]

PACKAGE = "tuxpaint-stamps-default"
STAMPS = "usr/share/tuxpaint/stamps"
MAX_SIZE = 256
_TRANSLATION = re.compile(r"^[A-Za-z_@]+\.utf8=")
_DISPLAY = {"naturalforces": "natural forces"}  # folder names that are not plain words


@dataclass(frozen=True)
class Stamp:
    stem: str  # path below stamps/ without suffix, e.g. "animals/birds/chick_in_egg"
    image: Path
    caption: str
    colorable: bool = False  # drawn in the user's colour: only the alpha channel matters

    @property
    def category(self) -> str:
        return self.stem.split("/", 1)[0]

    @property
    def filename(self) -> str:
        return self.stem.replace("/", "__") + ".jpg"


def read_caption(txt: Path) -> str:
    """The English caption: the first non-empty line that is not a ``xx.utf8=`` translation."""
    for line in txt.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip().lstrip("\ufeff")
        if line and not _TRANSLATION.match(line):
            return line
    return ""


def find_stamps(stamps_dir: Path) -> tuple[list[Stamp], Counter]:
    """Every captioned stamp under ``stamps_dir`` (sorted by stem) and counts of what was skipped."""
    skipped: Counter = Counter()
    images = {}
    for path in sorted(stamps_dir.rglob("*")):
        if path.suffix.lower() not in (".png", ".svg") or path.is_symlink() or not path.is_file():
            continue
        stem = path.relative_to(stamps_dir).with_suffix("").as_posix()
        if stem.endswith("_mirror"):
            skipped["mirror_copy"] += 1
            continue
        if stem in images:
            skipped["svg_with_png"] += 1
            if path.suffix.lower() == ".png":
                images[stem] = path  # prefer the PNG
            continue
        images[stem] = path
    stamps = []
    for stem, image in sorted(images.items()):
        txt = stamps_dir / f"{stem}.txt"
        caption = read_caption(txt) if txt.is_file() else ""
        if not caption:
            skipped["no_caption"] += 1
            continue
        dat = stamps_dir / f"{stem}.dat"
        options = dat.read_text(errors="replace").split() if dat.is_file() else []
        stamps.append(Stamp(stem, image, caption, colorable="colorable" in options))
    return stamps, skipped


def crop_to_content(img: Image.Image, margin: float = 0.04) -> Image.Image:
    """Cut away fully transparent borders (many stamps sit small on a large canvas), keeping a
    ``margin`` (fraction of the content's longer side) around what is drawn."""
    if img.mode not in ("RGBA", "LA", "PA"):
        return img
    box = img.getchannel("A").getbbox()
    if box is None:
        return img
    pad = round(margin * max(box[2] - box[0], box[3] - box[1]))
    return img.crop((max(0, box[0] - pad), max(0, box[1] - pad),
                     min(img.width, box[2] + pad), min(img.height, box[3] + pad)))


def _convert(task: tuple[str, str, bool]) -> tuple[str, str]:
    """Worker: one stamp image to a cropped JPEG on white. Returns ``(dst, status)``."""
    src, dst, colorable = task
    if Path(dst).exists():
        return dst, "cached"
    try:
        if src.lower().endswith(".svg"):
            # rendered larger than needed so that cropping the margins keeps enough pixels
            img = render_svg(Path(src).read_bytes(), 2 * MAX_SIZE, url=src, unsafe=True)
        else:
            with Image.open(src) as opened:
                opened.load()
                img = opened.convert("RGBA") if opened.mode in ("LA", "P", "PA") else opened.copy()
    except (PrepareError, MissingDependency):
        raise
    except Exception:  # noqa: BLE001 - any decoder or cairo failure skips the stamp
        return dst, "unreadable"
    if colorable:  # Tux Paint fills the shape with the chosen colour; black is its default
        img = img.convert("RGBA")
        img = Image.merge("RGBA", (*Image.new("RGB", img.size, (0, 0, 0)).split(), img.getchannel("A")))
    if is_blank(img):
        return dst, "blank"
    save_image(crop_to_content(img), Path(dst), max_size=MAX_SIZE)
    return dst, "ok"


def prepare_tuxpaint(root: Path, out: Path, *, limit: int | None, workers: int | None,
                     manifest: Manifest) -> None:
    """Build ``out`` (= ``root/tuxpaint``); fills ``manifest``."""
    deb = fetch_deb(PACKAGE, root, exclude=["*.ogg", "*.wav"])
    stamps_dir = deb.dir / STAMPS
    if not stamps_dir.is_dir():
        raise PrepareError(f"{stamps_dir}: missing from {PACKAGE} {deb.version}; expected the stamps folder")
    manifest.sources.append(deb.source("GPL-2", "Tux Paint stamps (PNG/SVG) and their English captions"))
    stamps, skipped = find_stamps(stamps_dir)
    stamps = evenly_spaced(stamps, limit)
    if any(s.image.suffix == ".svg" for s in stamps):
        load_cairosvg("the tuxpaint corpus (its SVG-only stamps)")
    images = out / "images"
    tasks = [(str(s.image), str(images / s.filename), s.colorable) for s in stamps]
    status = dict(parallel_map(_convert, tasks, workers=workers, desc="tuxpaint: images"))
    failed = Counter(v for v in status.values() if v not in ("ok", "cached"))
    kept = [s for s in stamps if status[str(images / s.filename)] in ("ok", "cached")]
    for stale in set(p.name for p in images.iterdir()) - {s.filename for s in kept}:
        (images / stale).unlink()  # from a run with another limit

    items = [RetrievalItem(s.filename, [s.caption], extra={"category": s.category, "stamp": s.stem}) for s in kept]
    kar = write_karpathy(out / "dataset_tuxpaint.json", "tuxpaint", items)
    manifest.outputs["retrieval"] = {"kind": "karpathy", "path": "dataset_tuxpaint.json", "images_dir": "images", **kar}
    samples = [(images / s.filename, s.category, s.filename) for s in kept]
    names = {s.category: _DISPLAY.get(s.category, s.category) for s in kept}
    zs = write_imagefolder(out / "zeroshot", samples, names)
    manifest.outputs["zeroshot"] = {"kind": "imagefolder", "path": "zeroshot",
                                    "classnames": "zeroshot/classnames.txt", **zs}
    manifest.counts.update({
        "images": len(kept), "png": sum(s.image.suffix == ".png" for s in kept),
        "svg": sum(s.image.suffix == ".svg" for s in kept), "unique_captions": len({s.caption for s in kept}),
        "colorable": sum(s.colorable for s in kept), "classes": zs["classes"],
        **{f"skipped_{k}": v for k, v in sorted((skipped + failed).items())},
    })
    log(f"tuxpaint: {len(kept)} stamps, {manifest.counts['unique_captions']} distinct captions, "
        f"{zs['classes']} categories")

