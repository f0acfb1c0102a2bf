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

import codecs
import csv
import io
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


def _decode_table(path: Path) -> str:
    """The file as text: UTF-8, with or without a byte-order mark; undecodable bytes name the row."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        row = data.count(b"\n", 0, err.start) + 1
        raise DataFormatError(f"{path}: row {row}: not UTF-8 (byte 0x{data[err.start]:02x} "
                              f"at column {err.start - line_start + 1})") from None


def _check_columns(path: Path, columns: Sequence[str], image_col: str, caption_col: str) -> None:
    for col, flag in ((image_col, "--image-col"), (caption_col, "--caption-col")):
        if col not in columns:
            raise DataFormatError(f"{path}: column {col!r} not found (columns: {list(columns)}; choose with {flag})")


def _read_delimited(path: Path, delimiter: str, image_col: str, caption_col: str, join_extra_fields: bool):
    """``(columns, rows)`` of a CSV/TSV file; a row with more fields than the header is an error
    (or, with ``join_extra_fields`` and the caption column last, has its extra fields joined into the caption)."""
    reader = csv.reader(io.StringIO(_decode_table(path), newline=""), delimiter=delimiter)
    try:
        return _delimited_rows(path, reader, delimiter, image_col, caption_col, join_extra_fields)
    except csv.Error as err:  # e.g. a NUL byte, or an unterminated quote at the end of the file
        raise DataFormatError(f"{path}: row {reader.line_num}: {err}") from None


def _delimited_rows(path: Path, reader, delimiter: str, image_col: str, caption_col: str, join_extra_fields: bool):
    columns = next(reader, [])
    _check_columns(path, columns, image_col, caption_col)
    if join_extra_fields and columns[-1] != caption_col:
        raise DataFormatError(f"{path}: --join-extra-fields needs the caption column last, "
                              f"but the header is ({', '.join(columns)})")
    rows: list[dict] = []
    line = reader.line_num
    for fields in reader:
        row_line, line = line + 1, reader.line_num  # a quoted field may span lines: report where the row starts
        if not fields:
            continue  # blank line
        if len(fields) > len(columns):
            if not join_extra_fields:
                raise DataFormatError(
                    f"{path}: row {row_line} has {len(fields)} fields, the header has {len(columns)} "
                    f"({', '.join(columns)}); quote captions that contain the delimiter, "
                    "or pass --join-extra-fields to join them into the caption")
            fields = fields[: len(columns) - 1] + [delimiter.join(fields[len(columns) - 1:])]
        rows.append(dict(zip(columns, fields)))  # a short row leaves its last columns unset
    return columns, rows


def read_table(path: str | Path, image_col: str = "image", caption_col: str = "caption", *,
               join_extra_fields: bool = False) -> list[ImageTextRecord]:
    """CSV (``,``), TSV (``.tsv``: tab) or parquet; relative image paths resolve against the file's folder.

    CSV/TSV are read as UTF-8 (a byte-order mark is accepted). A row with more fields than the header
    (an unquoted delimiter in a caption) is an error naming the row, unless ``join_extra_fields`` is set
    and the caption column is the last one: then the extra fields are joined back into the caption.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    if path.suffix.lower() == ".parquet":
        if join_extra_fields:
            raise DataFormatError(f"{path}: --join-extra-fields applies to CSV/TSV files only")
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataFormatError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        columns = table.column_names
        _check_columns(path, columns, image_col, caption_col)
        rows: Iterable[dict] = table.to_pylist()
    else:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        columns, rows = _read_delimited(path, delimiter, image_col, caption_col, join_extra_fields)
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
