"""``fashion-mnist``: Zalando's Fashion-MNIST (Debian ``dataset-fashion-mnist``, MIT) as
train/test image-folder classification sets.

Layout of ``root/fashion-mnist/``::

    train/<label>-<name>/<index>.png    60,000 28x28 grayscale PNGs (index in the source file)
    train/classnames.txt                the 10 display names in folder order
    test/...                            the same for the 10,000 test images

Folder names start with the label digit (``0-t-shirt-top``, ``1-trouser``, ..., ``9-ankle-boot``),
so the sorted folder order of ``torchvision.datasets.ImageFolder`` is Fashion-MNIST's own label
order, and contain no ``/`` (``T-shirt/top`` becomes ``t-shirt-top``); ``classnames.txt`` keeps
the display names (``T-shirt/top``).
"""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..progress import progress
from .common import Manifest, PrepareError, atomic_write_text, log, slug
from .debian import fetch_deb

__all__ = ["CLASSES", "class_folder", "read_idx", "prepare_fashion_mnist"]

PACKAGE = "dataset-fashion-mnist"
DATA = "usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": "train", "test": "t10k"}
_MAGIC = {3: 2051, 1: 2049}  # idx3 (images), idx1 (labels)


def class_folder(label: int) -> str:
    """``0`` -> ``"0-t-shirt-top"``: sorts in label order, safe as a folder name."""
    return f"{label}-{slug(CLASSES[label])}"


def read_idx(path: Path, dims: int) -> np.ndarray:
    """Read a gzipped IDX file: images (``dims=3``, 16-byte header) or labels (``dims=1``,
    8-byte header), checking the magic number and the sizes the header declares."""
    header = 4 + 4 * dims
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise PrepareError(f"{path}: not a readable gzip file ({err})") from err
    magic, *shape = np.frombuffer(data[:header], dtype=">u4")
    if magic != _MAGIC[dims]:
        raise PrepareError(f"{path}: magic number {magic}, expected {_MAGIC[dims]} for a {dims}-d IDX file")
    if len(data) - header != int(np.prod(shape)):
        raise PrepareError(f"{path}: {len(data) - header} data bytes, header declares shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _write_split(images: np.ndarray, labels: np.ndarray, out: Path, desc: str, width: int) -> dict[str, Any]:
    for label in range(len(CLASSES)):
        (out / class_folder(label)).mkdir(parents=True, exist_ok=True)
    for index in progress(range(len(images)), desc=desc, unit="img", mininterval=0.5):
        path = out / class_folder(int(labels[index])) / f"{index:0{width}d}.png"
        if not path.exists():
            Image.fromarray(images[index], mode="L").save(path, format="PNG")
    atomic_write_text(out / "classnames.txt", "".join(name + "\n" for name in CLASSES))
    counts = np.bincount(labels, minlength=len(CLASSES))
    return {"images": len(images), "classes": int((counts > 0).sum()),
            "per_class": {class_folder(k): int(n) for k, n in enumerate(counts)}}


def prepare_fashion_mnist(root: Path, out: Path, *, limit: int | None, workers: int | None,
                          manifest: Manifest) -> None:
    """Build ``out`` (= ``root/fashion-mnist``); fills ``manifest``. ``limit`` keeps the first
    ``limit`` images of each split; ``workers`` is unused (writing PNGs is I/O-bound)."""
    deb = fetch_deb(PACKAGE, root)
    manifest.sources.append(deb.source("MIT", "Fashion-MNIST (Zalando Research) IDX files"))
    for split, prefix in SPLITS.items():
        images = read_idx(deb.dir / DATA / f"{prefix}-images-idx3-ubyte.gz", 3)
        labels = read_idx(deb.dir / DATA / f"{prefix}-labels-idx1-ubyte.gz", 1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max() >= len(CLASSES):
            raise PrepareError(f"{deb.dir / DATA}: {split} has images {images.shape} and {len(labels)} labels "
                               f"up to {labels.max()}; expected 28x28 images with labels 0..9")
        width = len(str(len(images) - 1))  # of the whole split, so file names do not depend on limit
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        target = out / split
        if target.exists() and sum(1 for _ in target.rglob("*.png")) > len(images):
            shutil.rmtree(target)  # from a run with a larger limit; a smaller or interrupted one is reused
        stats = _write_split(images, labels, target, f"fashion-mnist: {split}", width)
        manifest.outputs[split] = {"kind": "imagefolder", "path": split, "classnames": f"{split}/classnames.txt",
                                   **stats}
        manifest.counts[f"{split}_images"] = stats["images"]
    manifest.counts["classes"] = len(CLASSES)
    log(f"fashion-mnist: {manifest.counts['train_images']:,} train and {manifest.counts['test_images']:,} "
        f"test images")

