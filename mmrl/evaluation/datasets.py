"""Image datasets for evaluation: image lists, image folders and the named transfer datasets.

An *image folder* is ``ROOT/<class folder>/<image>`` (``torchvision.datasets.ImageFolder``:
class index = position of the folder in sorted order); an optional ``ROOT/classnames.txt``
holds a readable name per class, one a line, in that order (what ``mmrl prepare`` writes).

A *named dataset* is one of the paper's transfer suite, read from a local root with
``download=False`` -- nothing is downloaded. When its files are not there,
:class:`DatasetMissing` says where to put them, and ``mmrl eval suite`` reports it as skipped.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DatasetMissing", "ImageListDataset", "image_folder", "read_classnames_file", "clean_classname",
    "NamedDataset", "NAMED_DATASETS", "build_named", "ClassificationData", "classification_data",
    "dataset_fingerprint", "Subsample", "default_split",
]

_SPLIT_NAMES = {"train", "test", "val", "valid", "validation", "trainval"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DatasetMissing(FileNotFoundError):
    """The dataset's files are not where they should be; ``hint`` says where to put them."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message + (f"; {hint}" if hint else ""))
        self.hint = hint


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        if img.mode in ("RGBA", "LA", "P"):  # flatten transparency onto white (icons, stamps)
            rgba = img.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return img.convert("RGB")


class ImageListDataset(Dataset):
    """``(transform(image), index)`` for a list of image files (retrieval image sets)."""

    def __init__(self, paths: Sequence[Path], transform: Callable | None = None):
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = _load_rgb(self.paths[i])
        return (self.transform(img) if self.transform else img), i

    def describe(self, i: int) -> str:
        return str(self.paths[i])


def image_folder(root: str | Path, transform: Callable | None = None):
    """``torchvision.datasets.ImageFolder`` over ``root`` with clear errors for bad layouts."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found (expected ROOT/<class>/<image> files)")
    if not any(p.is_dir() for p in root.iterdir()):
        raise ValueError(f"{root}: no class folders (expected ROOT/<class>/<image> files)")
    try:
        return ImageFolder(str(root), transform=transform, loader=_load_rgb)
    except (FileNotFoundError, RuntimeError) as err:
        raise ValueError(f"{root}: not an image-folder dataset ({err})") from err


def read_classnames_file(path: str | Path, n_classes: int | None = None) -> list[str]:
    """One class name per line (blank lines ignored); checked against ``n_classes``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: class-names file not found")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n_classes is not None and len(names) != n_classes:
        raise ValueError(f"{path}: {len(names)} class names for {n_classes} class folders "
                         f"(one name a line, in the sorted order of the folders)")
    return names


def clean_classname(folder: str) -> str:
    """A readable name from a folder name: ``001.Black_footed_Albatross`` -> ``Black footed Albatross``,
    ``0-t-shirt-top`` -> ``t shirt top``."""
    name = re.sub(r"^\d+[.\-_ ]+", "", folder)
    return re.sub(r"[_\-]+", " ", name).strip() or folder


# --- named datasets -------------------------------------------------------------------------------

@dataclass
class NamedDataset:
    """A transfer dataset: how to build a split from ``root`` and where its files must be.

    ``kind`` is ``torchvision`` (a ``torchvision.datasets`` class with ``download=False``) or
    ``folder`` (``root/<folder>/<split>/<class>/<image>`` image folders). ``classnames`` names
    the key of CLIP_benchmark's ``en_classnames.json`` (or ``imagenet`` for open_clip's list);
    ``templates`` the key of its templates file."""

    name: str
    kind: str
    layout: str
    splits: tuple[str, str] = ("train", "test")
    folder: str = ""
    build: Callable[[Path, str, Callable | None], Any] | None = None
    classnames: str | None = None
    templates: str | None = None
    clean: Callable[[str], str] | None = None


def _tv(cls_name: str, **fixed):
    def build(root: Path, split: str, transform):
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        kwargs = dict(fixed)
        if cls_name in ("CIFAR10", "CIFAR100", "MNIST"):
            kwargs["train"] = split == "train"
        else:
            kwargs["split"] = split
        return cls(root=str(root), transform=transform, download=False, **kwargs)
    return build


def _clevr(root: Path, split: str, transform):
    from torchvision.datasets import CLEVRClassification

    # labels are object counts 3..10 -> classes "three".."ten" (VTAB clevr_count_all)
    return CLEVRClassification(str(root), split=split, transform=transform, download=False,
                               target_transform=lambda count: count - 3)


NAMED_DATASETS: dict[str, NamedDataset] = {d.name: d for d in [
    NamedDataset("cifar10", "torchvision", "ROOT/cifar-10-batches-py/ (cifar-10-python.tar.gz, extracted)",
                 build=_tv("CIFAR10"), templates="cifar10"),
    NamedDataset("cifar100", "torchvision", "ROOT/cifar-100-python/ (cifar-100-python.tar.gz, extracted)",
                 build=_tv("CIFAR100"), templates="cifar100"),
    NamedDataset("food101", "torchvision", "ROOT/food-101/{images,meta}/ (food-101.tar.gz, extracted)",
                 build=_tv("Food101"), templates="food101", clean=lambda c: c.replace("_", " ")),
    NamedDataset("cars", "torchvision", "ROOT/stanford_cars/ (torchvision StanfordCars layout: devkit, cars_train, "
                 "cars_test, cars_test_annos_withlabels.mat)", build=_tv("StanfordCars"), templates="cars"),
    NamedDataset("dtd", "torchvision", "ROOT/dtd/dtd/{images,labels}/ (dtd-r1.0.1.tar.gz, extracted; partition 1)",
                 build=_tv("DTD"), templates="dtd"),
    NamedDataset("eurosat", "folder", "ROOT/eurosat/{train,test}/<class>/*.jpg (EuroSAT RGB split into train/test "
                 "image folders)", folder="eurosat", classnames="eurosat", templates="eurosat"),
    NamedDataset("resisc45", "folder", "ROOT/resisc45/{train,test}/<class>/*.jpg (NWPU-RESISC45 split into "
                 "train/test image folders)", folder="resisc45", templates="resisc45",
                 clean=lambda c: c.replace("_", " ")),
    NamedDataset("gtsrb", "torchvision", "ROOT/gtsrb/GTSRB/{Training,Final_Test}/ (torchvision GTSRB layout)",
                 build=_tv("GTSRB"), classnames="gtsrb", templates="gtsrb"),
    NamedDataset("stl10", "torchvision", "ROOT/stl10_binary/ (stl10_binary.tar.gz, extracted)",
                 build=_tv("STL10"), templates="stl10"),
    NamedDataset("clevr_count", "torchvision", "ROOT/clevr/CLEVR_v1.0/{images,scenes}/ (CLEVR_v1.0.zip, extracted); "
                 "test = CLEVR's val split, as in VTAB", splits=("train", "val"), build=_clevr,
                 classnames="clevr_count_all", templates="clevr_count_all"),
    NamedDataset("fer2013", "folder", "ROOT/fer2013/{train,test}/<emotion>/*.jpg (the Kaggle image-folder release)",
                 folder="fer2013", classnames="fer2013", templates="fer2013"),
    NamedDataset("cub200", "folder", "ROOT/cub200/{train,test}/<NNN.Class_name>/*.jpg (CUB-200-2011 images split by "
                 "train_test_split.txt)", folder="cub200", templates=None, clean=clean_classname),
    NamedDataset("mnist", "torchvision", "ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
                 build=_tv("MNIST"), classnames="mnist", templates="mnist"),
    NamedDataset("imagenet1k", "folder", "ROOT/imagenet1k/{train,val}/<wnid>/*.JPEG (ILSVRC-2012 image folders; "
                 "test = val)", splits=("train", "val"), folder="imagenet1k", classnames="imagenet",
                 templates="imagenet"),
]}


def build_named(name: str, root: str | Path, split: str, transform: Callable | None = None):
    """Split ``split`` of named dataset ``name`` under ``root`` (never downloads)."""
    spec = NAMED_DATASETS.get(name)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; named datasets: {', '.join(NAMED_DATASETS)} "
                         f"(or pass an image-folder path)")
    root = Path(root)
    hint = f"put it at {spec.layout.replace('ROOT', str(root))}"
    if spec.kind == "folder":
        path = root / spec.folder / split
        if not path.is_dir():
            raise DatasetMissing(f"{name}: {path} not found", hint)
        return image_folder(path, transform)
    try:
        return spec.build(root, split, transform)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        detail = str(err).split(". You can use download=True")[0].rstrip(".")  # torchvision's wording
        raise DatasetMissing(f"{name}: not found under {root} ({detail})", hint) from err


def default_split(data: str, role: str = "test") -> str:
    """The ``role`` (``train`` or ``test``) split of ``data``: a named dataset's own (ImageNet's
    test split is ``val``), ``train`` / ``test`` for an image folder."""
    spec = NAMED_DATASETS.get(data) if not Path(data).exists() else None
    if spec is None:
        return role
    return spec.splits[0] if role == "train" else spec.splits[1]


def _base_classes(ds) -> list[str] | None:
    classes = getattr(ds, "classes", None)
    return list(classes) if classes else None


@dataclass
class ClassificationData:
    """A classification split with its class names and where they came from."""

    dataset: Any
    classnames: list[str]
    classnames_source: str
    templates_key: str | None
    name: str
    root: str
    split: str


def classification_data(data: str, split: str, transform: Callable | None = None, *, root: str | None = None,
                        classnames_file: str | None = None, name: str | None = None) -> ClassificationData:
    """Resolve ``data`` -- an image-folder path or a named dataset (under ``root``, default
    ``datasets``) -- to split ``split`` with class names. Class names come from
    ``classnames_file`` if given, else the folder's ``classnames.txt``, else (named datasets)
    CLIP_benchmark's cleaned names / open_clip's ImageNet names, else the class folders' or the
    dataset's own names."""
    from .prompts import packaged_classnames

    spec = NAMED_DATASETS.get(data) if not Path(data).exists() else None
    if spec is not None:
        base_root = Path(root or "datasets")
        ds = build_named(data, base_root, split, transform)
        folder = base_root / spec.folder / split if spec.kind == "folder" else None
        label, where = name or data, str(base_root)
    else:
        folder = Path(data)
        if not folder.exists():
            raise FileNotFoundError(f"{data}: neither an image folder (ROOT/<class>/<image>) nor a named dataset "
                                    f"({', '.join(NAMED_DATASETS)})")
        ds = image_folder(folder, transform)
        label = name or (folder.resolve().parent.name if folder.name.lower() in _SPLIT_NAMES else folder.name)
        where = str(folder)
    base = _base_classes(ds)
    n = len(base) if base is not None else None
    if classnames_file:
        names, source = read_classnames_file(classnames_file, n), str(classnames_file)
    elif folder is not None and (folder / "classnames.txt").is_file():
        names, source = read_classnames_file(folder / "classnames.txt", n), str(folder / "classnames.txt")
    elif spec is not None and spec.classnames:
        names, source = packaged_classnames(spec.classnames)
        if n is not None and len(names) != n:
            raise ValueError(f"{data}: {len(names)} packaged class names ({source}) for {n} classes")
    elif base is None:
        raise ValueError(f"{data}: the dataset has no class names; pass --classnames FILE")
    elif spec is not None:
        names = [spec.clean(c) for c in base] if spec.clean else list(base)
        source = "dataset classes" + (" (cleaned)" if spec.clean else "")
    else:
        names, source = [clean_classname(c) for c in base], "class folder names"
    return ClassificationData(ds, names, source, spec.templates if spec else None, label, where, split)


class Subsample(Dataset):
    """Items ``indices`` of ``base``, in that order (a train subsample); ``targets`` are the
    base's labels of those items, and its fingerprint is the base's plus the indices."""

    def __init__(self, base, indices: Sequence[int], targets: Sequence[int] | None = None):
        self.base = base
        self.indices = [int(i) for i in indices]
        self.targets = list(targets) if targets is not None else None
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]

    def describe(self, i: int) -> str:
        return describe_item(self.base, self.indices[i])


def dataset_fingerprint(ds) -> str:
    """A key that changes when the dataset's files or transform change: file paths, sizes and
    modification times for file-backed datasets, else the dataset's description."""
    h = hashlib.sha256()
    h.update(type(ds).__name__.encode())
    if isinstance(ds, Subsample):
        h.update(dataset_fingerprint(ds.base).encode())
        h.update(",".join(map(str, ds.indices)).encode())
        return h.hexdigest()
    h.update(repr(getattr(ds, "transform", None)).encode())
    files = None
    if isinstance(ds, ImageListDataset):
        files = ds.paths
    elif hasattr(ds, "samples"):
        files = [s[0] for s in ds.samples]
        h.update(repr([s[1] for s in ds.samples]).encode())
    if files is not None:
        for f in files:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        h.update(repr(ds).encode())
        h.update(str(len(ds)).encode())
    return h.hexdigest()


def describe_item(ds, i: int) -> str:
    """The file behind item ``i`` where known (for error messages)."""
    if hasattr(ds, "describe"):
        return ds.describe(i)
    if hasattr(ds, "samples"):
        return str(ds.samples[i][0])
    return f"{type(ds).__name__} item {i}"


def labels_of(ds) -> torch.Tensor | None:
    """Integer labels without loading images, where the dataset exposes them."""
    for attr in ("targets", "_labels", "labels"):
        values = getattr(ds, attr, None)
        if values is not None and len(values) == len(ds):
            try:
                return torch.as_tensor(list(values), dtype=torch.long)
            except (TypeError, ValueError):
                return None
    return None
