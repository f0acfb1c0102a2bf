"""Raw samples -> training batches: decode, preprocess, tokenize, collate.

Decode
    The image is the sample's first ``jpg``/``jpeg``/``png``/``webp`` entry, the caption its
    ``txt`` (or, with ``multi_caption``, one of the ``"captions"`` of its ``json``, drawn at
    random). A JPEG larger than the model input is decoded at reduced scale with PIL's draft
    mode (libjpeg's DCT scaling: 1/2, 1/4 or 1/8, never below the requested size), which skips
    most of the inverse DCT and colour conversion. The requested size is the first resize's
    target, enlarged for a ``RandomResizedCrop`` whose smallest crop would otherwise be
    upscaled by more than 10 % (for open_clip's ``scale=(0.9, 1.0)`` it is the input size).
    Images become RGB with transparency composited onto white (:func:`mmrl.data.images.to_rgb`).

Preprocess (:func:`plan_transform`)
    The transform is any callable ``PIL.Image -> Tensor[3, H, W]`` (open_clip's). When it is a
    torchvision ``Compose`` that ends in ``ToTensor`` (+ ``Normalize``) -- every open_clip
    transform does -- that tail is fused into one pass per batch (uint8 -> normalised float32,
    written straight into the batch tensor, in shared memory inside a DataLoader worker),
    instead of a float tensor per image, a normalised copy and a ``torch.stack``:

    * ``"tensor"`` plan (``fast_resize=True``, the default) -- when the geometric steps are
      only ``RandomResizedCrop`` / ``Resize`` / ``CenterCrop`` with bilinear or bicubic
      interpolation (plus the photometric steps of :mod:`mmrl.data.augment`), they run on the
      uint8 image as a channels-last tensor with torch's antialiased uint8 kernels, which
      follow PIL's filters (outputs agree with PIL's to a few 8-bit levels, see tests) and are
      several times faster. ``RandomResizedCrop`` boxes are drawn from the same distribution
      as torchvision's ``get_params`` but with Python's ``random`` (:func:`inception_crop_box`),
      so the augmentation is unchanged.
    * ``"pil"`` plan -- the steps before ``ToTensor`` run unchanged on the PIL image (exact
      open_clip output, up to float rounding); used with ``fast_resize=False`` or any other
      PIL step (colour jitter, ...).
    * ``"generic"`` plan -- any other callable: called per image, results stacked.

Randomness
    Each batch is built under its own seed, derived from ``(seed, rank, step)``: torch's,
    Python's and NumPy's global generators are set for the duration (and restored after), so
    a random augmentation gives the same batch for the same step whichever worker builds it.
"""
from __future__ import annotations

import contextlib
import io
import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .augment import RandomLowResolution
from .images import to_rgb
from .wds_stages import StreamStats, derive_seed, group_id, sample_group, sample_json

__all__ = ["IMAGE_KEYS", "ImagePlan", "plan_transform", "inception_crop_box", "decode_image", "json_captions",
           "sample_caption", "BatchBuilder"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_MAX_DRAFT_UPSCALE = 1.1  # a draft-decoded crop may be enlarged by at most 10 %
_TENSOR_MODES = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
def decode_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode to RGB; a JPEG whose sides are both at least twice ``draft_size`` is decoded at
    the smallest DCT scale that keeps both sides >= ``draft_size``."""
    img = Image.open(io.BytesIO(data))
    if draft_size and img.format == "JPEG" and min(img.size) >= 2 * draft_size:
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    return to_rgb(img)


def json_captions(sample: dict) -> list[str]:
    """The non-blank strings of a raw sample's json ``captions`` list (``[]`` without one)."""
    captions = sample_json(sample).get("captions")
    if not isinstance(captions, list):
        return []
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def sample_caption(sample: dict, rng: random.Random | None = None, multi_caption: bool = False) -> str | None:
    """The caption of a raw sample, or None when it has none (missing or blank)."""
    if multi_caption:
        captions = json_captions(sample)
        if captions:
            return (rng or random).choice(captions)
    text = sample.get("txt")
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text.strip() or None


# --------------------------------------------------------------------------------------------
# preprocessing plans
# --------------------------------------------------------------------------------------------
_warned_readonly = False


def _uint8_chw(img: Image.Image) -> torch.Tensor:
    """A ``[1, C, H, W]`` uint8 view (channels-last strides) of an 8-bit PIL image (one copy)."""
    global _warned_readonly
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"image mode {img.mode} is not 8-bit")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if not _warned_readonly:  # torch warns once that PIL's buffer is read-only; we never write to it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = torch.from_numpy(arr)
        _warned_readonly = True
    else:
        t = torch.from_numpy(arr)
    return t.permute(2, 0, 1).unsqueeze(0)


def _alloc(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """A float32 tensor; in shared memory when it will cross the worker -> main-process queue
    (as torch's ``default_collate`` does), so the DataLoader does not copy it again."""
    if shared:
        try:
            storage = torch.empty(0)._typed_storage()._new_shared(math.prod(shape))
            return torch.empty(0).new(storage).resize_(*shape)
        except (AttributeError, RuntimeError):  # private API moved: fall back to a plain tensor
            pass
    return torch.empty(shape)


def _resized_hw(h: int, w: int, size, max_size: int | None) -> tuple[int, int]:
    """torchvision ``Resize`` output size (int size: the shorter side; pair: exact)."""
    if isinstance(size, int):
        size = [size]
    if len(size) == 2:
        return int(size[0]), int(size[1])
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = int(size[0]), int(size[0] * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = list(size)
    return (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))


def inception_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                      rng=random) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop with area fraction ~ U(scale) and aspect ratio
    log-uniform in ``ratio`` -- the distribution of torchvision's
    ``RandomResizedCrop.get_params`` (10 tries, then the largest central crop within
    ``ratio``) -- drawn with Python floats from ``rng`` instead of ~20 one-element torch ops."""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _tensor_op(t) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The uint8-tensor equivalent of one torchvision geometric step, or None."""
    if isinstance(t, T.RandomResizedCrop) and t.interpolation in _TENSOR_MODES:
        size, mode = _pair(t.size), _TENSOR_MODES[t.interpolation]
        own_params = type(t).get_params is T.RandomResizedCrop.get_params  # not overridden

        def random_resized_crop(x):
            if own_params:
                i, j, h, w = inception_crop_box(x.shape[-2], x.shape[-1], t.scale, t.ratio)
            else:
                i, j, h, w = t.get_params(x, t.scale, t.ratio)
            return F.interpolate(x[..., i:i + h, j:j + w], size=size, mode=mode, antialias=True)
        return random_resized_crop
    if isinstance(t, T.Resize) and t.interpolation in _TENSOR_MODES:
        mode = _TENSOR_MODES[t.interpolation]

        def resize(x):
            h, w = x.shape[-2:]
            out = _resized_hw(h, w, t.size, t.max_size)
            return x if out == (h, w) else F.interpolate(x, size=out, mode=mode, antialias=True)
        return resize
    if isinstance(t, T.CenterCrop):
        return lambda x: TF.center_crop(x, list(_pair(t.size)))
    if isinstance(t, (T.RandomGrayscale, T.RandomInvert, RandomLowResolution)):
        return t  # photometric steps that take uint8 [..., 3, H, W] tensors as they are
    return None


def _is_rgb_convert(t) -> bool:
    """open_clip's RGB conversion steps (no-ops on our already-RGB images)."""
    if type(t).__name__ == "MaybeConvertMode":
        return getattr(t, "mode", "RGB") == "RGB"
    return getattr(t, "__name__", "") == "_convert_to_rgb"


def _draft_size_for(t) -> int | None:
    """The decode size a first geometric step allows (None: do not draft)."""
    if isinstance(t, T.RandomResizedCrop):
        min_side = max(_pair(t.size)) / math.sqrt(max(min(t.scale), 1e-6))
        return max(1, math.ceil(min_side / _MAX_DRAFT_UPSCALE))
    if isinstance(t, T.Resize):
        return max(_pair(t.size)) if t.max_size is None else None
    return None


class ImagePlan:
    """How a decoded RGB image becomes one row of the batch tensor.

    ``row(img)`` runs per sample (inside the batch's seeded RNG context) and ``collate(rows)``
    once per batch. ``kind`` is ``"tensor"``, ``"pil"`` or ``"generic"`` (module docstring).
    """

    def __init__(self, kind: str, steps: Sequence[Callable], mean=None, std=None,
                 draft_size: int | None = None, transform: Callable | None = None, rgb_tail: bool = True):
        self.kind, self.steps, self.draft_size, self.transform = kind, list(steps), draft_size, transform
        self.rgb_tail = rgb_tail  # the transform converts to RGB right before ToTensor
        if kind != "generic":
            mean = torch.as_tensor(mean if mean is not None else (0.0, 0.0, 0.0), dtype=torch.float32).view(-1, 1, 1)
            std = torch.as_tensor(std if std is not None else (1.0, 1.0, 1.0), dtype=torch.float32).view(-1, 1, 1)
            self.scale = 1.0 / (255.0 * std)   # uint8 -> (x / 255 - mean) / std in one multiply-add
            self.shift = -mean / std

    def __repr__(self) -> str:
        return f"ImagePlan(kind={self.kind!r}, draft_size={self.draft_size}, steps={len(self.steps)})"

    def row(self, img: Image.Image):
        if self.kind == "generic":
            return self.transform(img)
        if self.kind == "pil":
            for step in self.steps:
                img = step(img)
            if self.rgb_tail and img.mode != "RGB":
                img = img.convert("RGB")
            return _uint8_chw(img)[0]
        x = _uint8_chw(img)
        for step in self.steps:
            x = step(x)
        return x[0]

    def collate(self, rows: list[torch.Tensor], shared: bool = False) -> torch.Tensor:
        shape = tuple(rows[0].shape)
        if any(tuple(r.shape) != shape for r in rows):
            raise ValueError(f"the image transform produced different shapes in one batch "
                             f"({sorted({tuple(r.shape) for r in rows})}); it must end in a fixed-size crop")
        out = _alloc((len(rows),) + shape, shared)
        if self.kind == "generic":
            return torch.stack(rows, 0, out=out)
        for i, r in enumerate(rows):
            torch.addcmul(self.shift, r, self.scale, out=out[i])
        return out


def plan_transform(transform: Callable, fast_resize: bool = True, image_size: int | None = None,
                   draft: bool = True) -> ImagePlan:
    """Analyse ``transform`` (see the module docstring). ``image_size`` is the draft size for
    transforms whose geometry cannot be read (None: no draft decoding for them)."""
    steps = list(getattr(transform, "transforms", None) or []) if isinstance(transform, T.Compose) else []
    mean = std = None
    if steps and isinstance(steps[-1], T.Normalize):
        norm = steps.pop()
        mean, std = norm.mean, norm.std
    if not steps or not isinstance(steps[-1], T.ToTensor):
        return ImagePlan("generic", [], draft_size=image_size if draft else None, transform=transform)
    steps.pop()
    # an RGB conversion right before ToTensor is done only when needed (images decode to RGB)
    rgb_tail = bool(steps) and _is_rgb_convert(steps[-1])
    if rgb_tail:
        steps.pop()
    draft_size = (_draft_size_for(steps[0]) if steps else None) or image_size
    draft_size = draft_size if draft else None
    if fast_resize:
        ops = [_tensor_op(s) for s in steps]
        if all(op is not None for op in ops):
            return ImagePlan("tensor", ops, mean, std, draft_size)
    return ImagePlan("pil", steps, mean, std, draft_size, rgb_tail=rgb_tail)


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Seed torch's CPU, Python's and NumPy's global generators; restore them afterwards."""
    gen = torch.default_generator
    saved = (gen.get_state(), random.getstate(), np.random.get_state())
    gen.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    try:
        yield
    finally:
        gen.set_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


class BatchBuilder:
    """Pulls raw samples until ``batch_size`` usable ones are found and builds the batch.

    Batch format (a dict)::

        image    FloatTensor [B, 3, H, W]  preprocessed (normalised) images
        text     LongTensor  [B, ctx]      tokenizer(captions)
        key      list[str]                 the samples' ``__key__``
        step     int                       global step of this batch (on this rank)
        group    LongTensor  [B]           only with ``group_key``: the samples' group ids
                                           (:func:`~mmrl.data.wds_stages.group_id` of the
                                           JSON field; a sample without one is its own group;
                                           with ``group_shared_aug`` the samples of a group in
                                           one batch share their random augmentation draws)
        skipped  dict[str, int]            skips since this worker's previous batch:
                                           no_image / no_caption / bad_image (samples),
                                           bad_shards (shards)
    """

    def __init__(self, plan: ImagePlan, tokenizer: Callable[[list[str]], torch.Tensor], batch_size: int, *,
                 seed: int, rank: int, stats: StreamStats, multi_caption: bool = False, shared: bool = False,
                 group_key: str | None = None, group_shared_aug: bool = False):
        self.plan, self.tokenizer, self.batch_size = plan, tokenizer, int(batch_size)
        self.seed, self.rank, self.stats = seed, rank, stats
        self.multi_caption, self.shared = multi_caption, shared
        self.group_key, self.group_shared_aug = group_key, group_shared_aug

    def _rows(self, samples: Iterator[dict], step: int):
        stats, plan = self.stats, self.plan
        rows, captions, keys, groups = [], [], [], []
        batch_seed = derive_seed(self.seed, "batch", self.rank, step)
        caption_rng = random.Random(batch_seed)
        with seeded_global_rngs(batch_seed):
            while len(rows) < self.batch_size:
                try:
                    raw = next(samples)
                except StopIteration:  # the sources are endless; this is a bug, not bad data
                    raise RuntimeError("the sample stream ended before the batch was complete") from None
                url = raw.get("__url__", "?")
                image_key = next((k for k in IMAGE_KEYS if k in raw), None)
                if image_key is None:
                    stats.skip("no_image", url, f"{raw.get('__key__')} has no image in {url}")
                    continue
                caption = sample_caption(raw, caption_rng, self.multi_caption)
                if caption is None:
                    stats.skip("no_caption", url, f"{raw.get('__key__')} has no caption in {url}")
                    continue
                group = sample_group(raw, self.group_key) if self.group_key else None
                try:
                    image = decode_image(raw[image_key], plan.draft_size)
                    if group is not None and self.group_shared_aug:  # the group's own random draws
                        with seeded_global_rngs(derive_seed(batch_seed, "group-aug", group)):
                            row = plan.row(image)
                    else:
                        row = plan.row(image)
                except Exception as exn:  # noqa: BLE001 -- any undecodable image is skipped
                    stats.skip("bad_image", url, f"{raw.get('__key__')}.{image_key} in {url}: {exn!r}")
                    continue
                stats.good()
                rows.append(row)
                captions.append(caption)
                keys.append(str(raw.get("__key__")))
                if self.group_key:
                    groups.append(f"group:{group}" if group is not None else f"sample:{url}#{raw.get('__key__')}")
        return rows, captions, keys, groups

    def skip_batch(self, samples: Iterator[dict], step: int) -> None:
        """Consume exactly the samples ``build`` would for ``step`` (resume replay); the skip
        counts it causes belong to batches before the resume point and are dropped."""
        self._rows(samples, step)
        self.stats.take_delta()
        self.stats.take_notes()

    def build(self, samples: Iterator[dict], step: int) -> dict[str, Any]:
        rows, captions, keys, groups = self._rows(samples, step)
        image = self.plan.collate(rows, shared=self.shared)
        text = self.tokenizer(captions)
        batch = {"image": image, "text": text, "key": keys, "step": step, "skipped": self.stats.take_delta(),
                 "notes": self.stats.take_notes()}
        if self.group_key:
            batch["group"] = torch.tensor([group_id(g) for g in groups], dtype=torch.long)
        return batch
