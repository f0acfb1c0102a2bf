"""Readers that turn the input formats users bring into :class:`ImageTextRecord` lists.

* a CSV / TSV / parquet table of local image paths and captions (``read_table``);
* a folder of images with same-stem ``.txt`` captions (``read_folder``);
* COCO captions JSON, ``captions_train2014.json`` style (``read_coco``);
* Karpathy split files, ``dataset_coco.json`` / ``dataset_flickr30k.json`` (``read_karpathy``).

URLs are img2dataset's job (see ``data_prep/cc3m.md``); its output is already in the shard layout.
Every reader fails with one :class:`DataFormatError` line naming the file, the field and what
was expected. Records keep the input order, so shard keys are deterministic.
"""
from __future__ import annotations

import csv
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

from .records import ImageTextRecord

__all__ = ["DataFormatError", "IMAGE_EXTENSIONS", "read_table", "read_folder", "read_coco", "read_karpathy"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataFormatError(ValueError):
    """Malformed input: the message names the file, the field and what was expected."""


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{path}: not valid JSON ({err})") from None


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def read_table(path: str | Path, image_col: str = "image", caption_col: str = "caption") -> list[ImageTextRecord]:
    """CSV (``,``), TSV (``.tsv``: tab) or parquet; relative image paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataFormatError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        columns = table.column_names
        rows: Iterable[dict] = table.to_pylist()
    else:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = reader.fieldnames or []
            rows = list(reader)
    for col, flag in ((image_col, "--image-col"), (caption_col, "--caption-col")):
        if col not in columns:
            raise DataFormatError(f"{path}: column {col!r} not found (columns: {list(columns)}; choose with {flag})")
    base = path.parent
    source = f"table:{path.name}"
    records = []
    for i, row in enumerate(rows):
        image = row.get(image_col)
        caption = row.get(caption_col)
        captions = [str(caption).strip()] if caption is not None and str(caption).strip() else []
        records.append(ImageTextRecord(_resolve(base, str(image or "")), captions, source, {"row": i}))
    return records


def read_folder(root: str | Path) -> list[ImageTextRecord]:
    """Images under ``root`` (recursively, sorted) with captions in same-stem ``.txt`` files."""
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(f"{root}: not a folder")
    records = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        txt = image.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
        rel = str(image.relative_to(root))
        records.append(ImageTextRecord(str(image), [caption] if caption else [], f"folder:{root.name}", {"path": rel}))
    return records


def _need(obj: dict, key: str, kind, path: Path, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise DataFormatError(f"{path}: {where} has no field {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise DataFormatError(f"{path}: {where}.{key} should be {getattr(kind, '__name__', kind)}, "
                              f"got {type(value).__name__}")
    return value


def read_coco(annotations: str | Path, images_root: str | Path) -> list[ImageTextRecord]:
    """COCO captions JSON: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.

    One record per image (in ``images`` order) holding all its captions.
    """
    path = Path(annotations)
    data = _load_json(path)
    images = _need(data, "images", list, path, "top level")
    anns = _need(data, "annotations", list, path, "top level")
    captions: OrderedDict[int, list[str]] = OrderedDict()
    files = {}
    for i, img in enumerate(images):
        image_id = _need(img, "id", (int, str), path, f"images[{i}]")
        files[image_id] = _need(img, "file_name", str, path, f"images[{i}]")
        captions[image_id] = []
    for i, ann in enumerate(anns):
        image_id = _need(ann, "image_id", (int, str), path, f"annotations[{i}]")
        caption = _need(ann, "caption", str, path, f"annotations[{i}]")
        if image_id not in captions:
            raise DataFormatError(f"{path}: annotations[{i}].image_id {image_id!r} is not in images")
        if caption.strip():
            captions[image_id].append(caption.strip())
    root = Path(images_root)
    return [
        ImageTextRecord(str(root / files[image_id]), caps, f"coco:{path.name}", {"image_id": image_id})
        for image_id, caps in captions.items()
    ]


def read_karpathy(path: str | Path, images_root: str | Path,
                  splits: Sequence[str] = ("train", "restval")) -> list[ImageTextRecord]:
    """Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``, ...).

    Image path: ``images_root / filepath / filename`` (``filepath`` is absent for Flickr).
    COCO's training set is ``train`` + ``restval``; evaluation uses ``test`` (or ``val``).
    """
    path = Path(path)
    data = _load_json(path)
    images = _need(data, "images", list, path, "top level")
    wanted = set(splits)
    known = {"train", "val", "test", "restval"}
    if not wanted <= known:
        raise DataFormatError(f"{path}: unknown split(s) {sorted(wanted - known)}; expected some of {sorted(known)}")
    root = Path(images_root)
    records = []
    for i, img in enumerate(images):
        where = f"images[{i}]"
        split = _need(img, "split", str, path, where)
        if split not in wanted:
            continue
        filename = _need(img, "filename", str, path, where)
        sentences = _need(img, "sentences", list, path, where)
        caps = [_need(s, "raw", str, path, f"{where}.sentences[{j}]").strip() for j, s in enumerate(sentences)]
        meta = {"split": split, "imgid": img.get("imgid", i)}
        if "cocoid" in img:
            meta["cocoid"] = img["cocoid"]
        image = root / img.get("filepath", "") / filename
        records.append(ImageTextRecord(str(image), [c for c in caps if c], f"karpathy:{path.name}", meta))
    return records
