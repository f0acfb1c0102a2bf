"""Image-caption retrieval annotation files, detected by content.

============== ========================================================================= =========
format         schema                                                                    e.g.
============== ========================================================================= =========
``karpathy``   ``{"dataset", "images": [{"filepath"?, "filename", "split", "sentences":  ``dataset_coco.json``,
               [{"raw", "tokens", "sentid", ...}], "cocoid"?, "imgid"}]}``;              ``dataset_flickr30k.json``
               one split kept
``coco``       COCO captions: ``{"images": [{"id", "file_name"}], "annotations":         ``coco_test_karpathy.json``
               [{"image_id", "id", "caption"}]}`` (CLIP_benchmark's Karpathy             (CLIP_benchmark)
               split files)
``csv``        header ``image,caption``, one row per caption (pandas CSV quoting)        ``flickr30k_test_karpathy.txt``
``blip``       ``[{"image": path, "caption": [str, ...] | str}]`` (BLIP/ALBEF)           ``coco_karpathy_test.json``
============== ========================================================================= =========

Every caption of an image is one caption entry whose positive is that image. A file is
*recognised* as a standard test set -- COCO 5K (Karpathy test), Flickr30k 1K, Flickr8k 1K --
from the Karpathy ``dataset`` field with the ``test`` split, or from CLIP_benchmark's / BLIP's
file names; its image and caption counts are then checked against :data:`EXPECTED_COUNTS`.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EXPECTED_COUNTS", "RetrievalAnnotations", "read_annotations", "resolve_images", "check_counts",
    "AnnotationError",
]

# (images, captions) of the standard test splits (CLIP_benchmark#7/#48: count all captions,
# use the Karpathy test split)
EXPECTED_COUNTS: dict[str, tuple[int, int]] = {
    "coco-5k": (5000, 25010),
    "flickr30k-1k": (1000, 5000),
    "flickr8k-1k": (1000, 5000),
}
BENCHMARK_DATASET = {"coco-5k": "mscoco_captions", "flickr30k-1k": "flickr30k", "flickr8k-1k": "flickr8k"}
_FILENAMES = {  # CLIP_benchmark's and BLIP's names of the test files
    "coco_test_karpathy.json": "coco-5k", "coco_karpathy_test.json": "coco-5k",
    "flickr30k_test_karpathy.txt": "flickr30k-1k", "flickr30k_test.json": "flickr30k-1k",
    "flickr8k_test_karpathy.txt": "flickr8k-1k",
}
_KARPATHY_DATASETS = {"coco": "coco-5k", "flickr30k": "flickr30k-1k", "flickr8k": "flickr8k-1k"}
_IMAGE_NAME = re.compile(r"^(.+?\.(?:jpe?g|png|webp|bmp|gif|tiff?))\s*,(.*)$", re.IGNORECASE)


class AnnotationError(ValueError):
    """A malformed or unsupported annotation file (the message names the file)."""


@dataclass
class RetrievalAnnotations:
    """Captions grouped by image, in file order.

    ``images`` are paths relative to the image root; ``caption_image[j]`` is the index of the
    image caption ``j`` belongs to. ``image_ids`` / ``caption_ids`` are the file's ids (COCO
    image and annotation ids for the ``coco`` format; Karpathy ``cocoid``/``imgid`` and
    ``sentid`` otherwise; ``None`` where the format has none)."""

    path: Path
    format: str
    name: str
    split: str | None
    images: list[str]
    captions: list[str]
    caption_image: list[int]
    image_ids: list[Any] = field(default_factory=list)
    caption_ids: list[Any] | None = None
    benchmark: str | None = None
    coco_caption_ids: bool = False  # caption_ids are COCO annotation ids (eccv_caption / CxC)
    image_dirs: list[str] = field(default_factory=list)  # alternative sub-folders to look in

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def captions_per_image(self) -> tuple[int, int]:
        counts = [0] * self.n_images
        for i in self.caption_image:
            counts[i] += 1
        return (min(counts), max(counts)) if counts else (0, 0)


def _fail(path: Path, problem: str) -> AnnotationError:
    return AnnotationError(f"{path}: {problem}")


def read_annotations(path: str | Path, split: str | None = "test", name: str | None = None) -> RetrievalAnnotations:
    """Parse ``path`` (format detected from its content). ``split`` selects the Karpathy split
    (``None`` or ``"all"``: every image); the other formats are already one split."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise _fail(path, f"cannot read as UTF-8 text ({err})") from err
    head = text.lstrip()[:1]
    if head in ("{", "["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise _fail(path, f"not valid JSON ({err})") from err
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            first = next((im for im in data["images"] if isinstance(im, dict)), {})
            if "sentences" in first:
                ann = _karpathy(path, data, split)
            elif isinstance(data.get("annotations"), list):
                ann = _coco(path, data)
            else:
                raise _fail(path, "JSON with 'images' but neither Karpathy 'sentences' nor COCO 'annotations'")
        elif isinstance(data, list):
            ann = _blip(path, data)
        else:
            raise _fail(path, "unrecognised JSON: expected a Karpathy split file, COCO captions or a BLIP list")
    else:
        ann = _csv(path, text)
    if not ann.images:
        raise _fail(path, f"no images{f' in split {split!r}' if ann.format == 'karpathy' and split else ''}")
    if name:
        ann.name = name
    return ann


def _req(path: Path, obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise _fail(path, f"{where} lacks field {key!r}")
    return obj[key]


def _karpathy(path: Path, data: dict[str, Any], split: str | None) -> RetrievalAnnotations:
    dataset = str(data.get("dataset") or path.stem)
    images, captions, owner, image_ids, caption_ids = [], [], [], [], []
    splits = set()
    for n, im in enumerate(data["images"]):
        where = f"images[{n}]"
        filename = _req(path, im, "filename", where)
        im_split = im.get("split")
        splits.add(im_split)
        if split not in (None, "all") and im_split != split:
            continue
        sentences = _req(path, im, "sentences", where)
        if not isinstance(sentences, list):
            raise _fail(path, f"{where}.sentences is not a list")
        idx = len(images)
        images.append(f"{im['filepath']}/{filename}" if im.get("filepath") else str(filename))
        image_ids.append(im.get("cocoid", im.get("imgid", filename)))
        for m, sent in enumerate(sentences):
            raw = sent.get("raw") if isinstance(sent, dict) else None
            if raw is None and isinstance(sent, dict) and isinstance(sent.get("tokens"), list):
                raw = " ".join(sent["tokens"])
            if not isinstance(raw, str):
                raise _fail(path, f"{where}.sentences[{m}] has no 'raw' caption")
            captions.append(raw)
            owner.append(idx)
            caption_ids.append(sent.get("sentid"))
    if split not in (None, "all") and not images:
        present = ", ".join(sorted(str(s) for s in splits))
        raise _fail(path, f"no images in split {split!r} (splits present: {present})")
    benchmark = _KARPATHY_DATASETS.get(dataset) if split == "test" else None
    name = BENCHMARK_DATASET.get(benchmark, dataset)
    return RetrievalAnnotations(path, "karpathy", name, split, images, captions, owner, image_ids,
                                caption_ids, benchmark, image_dirs=[""])


def _coco(path: Path, data: dict[str, Any]) -> RetrievalAnnotations:
    images, image_ids, index = [], [], {}
    for n, im in enumerate(data["images"]):
        image_id = _req(path, im, "id", f"images[{n}]")
        images.append(str(_req(path, im, "file_name", f"images[{n}]")))
        if image_id in index:
            raise _fail(path, f"images[{n}]: duplicate image id {image_id!r}")
        index[image_id] = n
        image_ids.append(image_id)
    per_image: list[list[tuple[Any, str]]] = [[] for _ in images]
    for n, ann in enumerate(data["annotations"]):
        image_id = _req(path, ann, "image_id", f"annotations[{n}]")
        caption = _req(path, ann, "caption", f"annotations[{n}]")
        if image_id not in index:
            raise _fail(path, f"annotations[{n}] refers to image id {image_id!r}, which is not in 'images'")
        if not isinstance(caption, str):
            raise _fail(path, f"annotations[{n}].caption is not a string")
        per_image[index[image_id]].append((ann.get("id"), caption))
    captions, owner, caption_ids = [], [], []
    for i, caps in enumerate(per_image):
        for cid, cap in caps:
            captions.append(cap)
            owner.append(i)
            caption_ids.append(cid)
    m = re.match(r"coco_(\w+)_karpathy", path.stem)
    benchmark = _FILENAMES.get(path.name)
    name = BENCHMARK_DATASET.get(benchmark) or ("mscoco_captions" if m else path.stem)
    coco_ids = all(isinstance(c, int) for c in caption_ids) and all(isinstance(i, int) for i in image_ids)
    return RetrievalAnnotations(path, "coco", name, m.group(1) if m else None, images, captions, owner, image_ids,
                                caption_ids, benchmark, coco_caption_ids=coco_ids, image_dirs=["", "val2014"])


def _blip(path: Path, data: list[Any]) -> RetrievalAnnotations:
    index: OrderedDict[str, int] = OrderedDict()
    captions, owner = [], []
    for n, item in enumerate(data):
        image = _req(path, item, "image", f"[{n}]")
        caps = _req(path, item, "caption", f"[{n}]")
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise _fail(path, f"[{n}].caption must be a string or a list of strings")
        i = index.setdefault(str(image), len(index))
        for cap in caps:
            captions.append(cap)
            owner.append(i)
    benchmark = _FILENAMES.get(path.name)
    images = list(index)
    return RetrievalAnnotations(path, "blip", BENCHMARK_DATASET.get(benchmark, path.stem),
                                "test" if benchmark else None, images, captions, owner, images, None, benchmark,
                                image_dirs=[""])


def _csv(path: Path, text: str) -> RetrievalAnnotations:
    lines = text.splitlines()
    header = [h.strip().lower() for h in next(csv.reader([lines[0]]))] if lines else []
    if header != ["image", "caption"]:
        raise _fail(path, "unrecognised format: not JSON, and the first line is not the CSV header 'image,caption'")
    index: OrderedDict[str, int] = OrderedDict()
    captions, owner = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        m = _IMAGE_NAME.match(line.strip())
        if not m:
            raise _fail(path, f"line {lineno}: expected 'IMAGE_FILE,caption'")
        image, caption = m.group(1), m.group(2).strip()
        if caption.startswith('"'):  # pandas quotes captions holding commas or quotes
            try:
                caption = next(csv.reader(io.StringIO(caption)))[0]
            except (csv.Error, StopIteration, IndexError):
                pass
        i = index.setdefault(image, len(index))
        captions.append(caption)
        owner.append(i)
    m = re.match(r"(flickr30k|flickr8k)_(\w+?)_karpathy", path.stem)
    benchmark = _FILENAMES.get(path.name)
    name = BENCHMARK_DATASET.get(benchmark) or (m.group(1) if m else path.stem)
    images = list(index)
    return RetrievalAnnotations(path, "csv", name, m.group(2) if m else None, images, captions, owner, images, None,
                                benchmark, image_dirs=[""])


def check_counts(ann: RetrievalAnnotations) -> str | None:
    """Raise if a recognised standard test set has the wrong number of images or captions;
    return a description of the check (``None`` for files that are not recognised)."""
    if ann.benchmark is None:
        return None
    want_images, want_captions = EXPECTED_COUNTS[ann.benchmark]
    if (ann.n_images, ann.n_captions) != (want_images, want_captions):
        raise _fail(ann.path, f"recognised as the {ann.benchmark} test set, which has {want_images:,} images and "
                              f"{want_captions:,} captions, but found {ann.n_images:,} images and "
                              f"{ann.n_captions:,} captions (wrong split or a partial file?); "
                              f"pass --no-count-check to evaluate it anyway")
    return f"{ann.benchmark}: {want_images:,} images / {want_captions:,} captions (asserted)"


def resolve_images(ann: RetrievalAnnotations, root: str | Path | None = None) -> list[Path]:
    """Absolute image paths: under ``root`` (default: the annotation file's folder), also
    trying the format's usual sub-folders (``val2014/`` for COCO captions, as CLIP_benchmark
    lays it out). Raises ``FileNotFoundError`` naming the file and the first missing image."""
    base = Path(root) if root is not None else ann.path.parent
    if not base.is_dir():
        raise FileNotFoundError(f"{ann.path}: image folder {base} does not exist (pass --images ROOT)")
    chosen = base
    for sub in ann.image_dirs or [""]:
        candidate = base / sub if sub else base
        if (candidate / ann.images[0]).is_file():
            chosen = candidate
            break
    paths = [chosen / name for name in ann.images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{ann.path}: {len(missing):,} of {len(paths):,} images not found under {chosen} "
                                f"(first missing: {missing[0]}); pass --images ROOT, the folder the annotation's "
                                f"image paths are relative to")
    return paths
