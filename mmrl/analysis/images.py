"""The images ``mmrl analyze`` reads: an image folder (flat or ``ROOT/<class>/<image>``, read
recursively in sorted order) or webdataset shards (a ``.tar``, a brace/glob spec, a folder of
``.tar`` files, ``::``-joined sources; read in order). An image that does not decode is skipped
and counted; a source with no image is one error line."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

__all__ = ["ImageSource", "image_source"]


@dataclass
class ImageSource:
    """``items()`` yields ``(name, PIL image)`` up to ``limit``; ``skipped`` counts undecodable ones."""

    spec: str
    kind: str  # "folder" | "shards"
    limit: int
    paths: list[Path] = field(default_factory=list)
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def items(self) -> Iterator[tuple[str, Image.Image]]:
        reader: Callable[[], Iterator[tuple[str, Image.Image | None, str]]]
        reader = self._folder if self.kind == "folder" else self._shards
        count = 0
        for name, image, problem in reader():
            if count >= self.limit:
                return
            if image is None:
                self.skipped += 1
                if len(self.skipped_examples) < 3:
                    self.skipped_examples.append(f"{name}: {problem}")
                continue
            count += 1
            yield name, image

    def _folder(self):
        from ..evaluation.datasets import ImageListDataset

        ds = ImageListDataset(self.paths)
        for i, path in enumerate(self.paths):
            try:
                image, _ = ds[i]
            except Exception as err:  # noqa: BLE001 - skipped and counted
                yield str(path), None, f"{type(err).__name__}: {err}"
                continue
            yield str(path), image, ""

    def _shards(self):
        from ..data.batching import IMAGE_KEYS, decode_image
        from ..data.images import to_rgb
        from ..data.wds_stages import StreamStats, stream_samples
        from ..train.val_set import val_shards

        shards = val_shards(self.spec)
        stats = StreamStats(max_consecutive_bad_samples=1 << 30, max_consecutive_bad_shards=len(shards) + 1)
        for sample in stream_samples(shards, stats):
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            name = f"{sample.get('__url__')}:{sample.get('__key__')}"
            if key is None:
                continue  # not an image sample
            try:
                image = to_rgb(decode_image(sample[key]))
            except Exception as err:  # noqa: BLE001 - skipped and counted
                yield name, None, f"{type(err).__name__}: {err}"
                continue
            yield name, image, ""


def _is_shard_spec(data: str) -> bool:
    path = Path(data)
    if "::" in data or "{" in data or data.endswith(".tar") or "://" in data:
        return True
    return path.is_dir() and any(path.glob("*.tar"))


def image_source(data: str, limit: int) -> ImageSource:
    """Resolve ``data`` (see the module doc); ``limit`` caps the images read."""
    from ..evaluation.datasets import IMAGE_EXTENSIONS

    if limit < 4:
        raise ValueError(f"--max-images: the dependence estimators need at least 4 images, got {limit}")
    if _is_shard_spec(data):
        return ImageSource(data, "shards", limit)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"{data}: no such image folder or shard file")
    if not path.is_dir():
        raise ValueError(f"{data}: expected an image folder or webdataset shards (.tar)")
    paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"{data}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder or its subfolders")
    return ImageSource(data, "folder", limit, paths)
