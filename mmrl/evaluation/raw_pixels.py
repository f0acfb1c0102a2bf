"""The raw-pixel baseline: an "image tower" whose feature is the image itself.

``--model raw-pixels`` (or ``raw-pixels:SIZE``, default 32) evaluates the pixels as features:
each image is resized (shorter side, antialiased) and centre-cropped to ``SIZE x SIZE`` RGB,
flattened to a ``3 * SIZE * SIZE`` vector and mean-centred per image (the vector's own mean is
subtracted). Cosine similarity of two such vectors is the Pearson correlation of their pixels,
so image retrieval on it is the classic nearest-neighbour-on-pixels baseline and a linear probe
on it is logistic regression on pixels.

The vector is both the ``embedding`` (``encode_image``) and the ``pooled`` feature: the tower's
``_pool`` returns it and its projection is the identity, so :func:`.features.capture_pooled`
taps it like any open_clip tower. There is no text side: ``encode_text`` and the tokenizer
raise :class:`NoTextEncoder` (a ``ValueError``), and ``mmrl eval suite`` skips text tasks for
models whose ``has_text_encoder`` is false.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NAME", "DEFAULT_SIZE", "NoTextEncoder", "PixelTower", "RawPixelModel", "parse_raw_pixels",
           "raw_pixel_transform", "load_raw_pixels"]

NAME = "raw-pixels"
DEFAULT_SIZE = 32
_SPEC = re.compile(rf"^{NAME}(?::(\d+))?$")


class NoTextEncoder(ValueError):
    """The model has no text encoder (text tasks do not apply to it)."""


def parse_raw_pixels(spec: str) -> int | None:
    """The image size of a ``raw-pixels[:SIZE]`` spec, or ``None`` when ``spec`` is not one
    (``raw-pixels-run/`` and the like are ordinary paths)."""
    if spec != NAME and not spec.startswith(NAME + ":"):
        return None
    m = _SPEC.match(spec)
    if m is None or (m.group(1) is not None and int(m.group(1)) < 1):
        raise ValueError(f"{spec}: expected '{NAME}' or '{NAME}:SIZE' with SIZE a positive integer")
    return int(m.group(1)) if m.group(1) else DEFAULT_SIZE


class PixelTower(nn.Module):
    """Resize to ``size x size``, flatten, subtract each vector's mean.

    ``_pool`` maps ``[B, 3, H, W]`` images to ``([B, 3 * size * size], None)``, the open_clip
    tower's ``(pooled, tokens)`` contract; the forward is ``_pool`` with an identity projection."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)
        # a buffer, so that the weights fingerprint (feature cache, result files) names the size
        self.register_buffer("image_size", torch.tensor([self.size], dtype=torch.long))

    def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = x.float()
        if x.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        v = x.flatten(1)
        return v - v.mean(dim=1, keepdim=True), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(x)[0]


class RawPixelModel(nn.Module):
    """An open_clip-shaped model with a :class:`PixelTower` and no text encoder."""

    has_text_encoder = False

    def __init__(self, size: int = DEFAULT_SIZE):
        super().__init__()
        self.visual = PixelTower(size)

    @property
    def size(self) -> int:
        return self.visual.size

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The mean-centred pixel vector ``[B, 3 * size * size]`` (L2-normalised if asked)."""
        v = self.visual(image)
        return F.normalize(v, dim=-1) if normalize else v

    def encode_text(self, text: Any, normalize: bool = False) -> torch.Tensor:
        raise NoTextEncoder(f"{NAME} has no text encoder: text tasks (retrieval, zeroshot) do not apply to it")

    def forward(self, image: torch.Tensor | None = None, text: Any = None):
        if text is not None:
            self.encode_text(text)
        return self.encode_image(image, normalize=True) if image is not None else None


class _NoTokenizer:
    """Stands in for a tokenizer: any use is the same clear error as ``encode_text``."""

    def __call__(self, texts: Any, *args: Any, **kwargs: Any):
        raise NoTextEncoder(f"{NAME} has no text encoder (and no tokenizer): text tasks do not apply to it")


def raw_pixel_transform(size: int):
    """Shorter side to ``size`` (antialiased bilinear), centre crop, RGB, ``[0, 1]`` tensor (no
    mean / std normalisation: the pixel vector is mean-centred per image by the model)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(size),
        ToRGB(),
        T.ToTensor(),
    ])


class ToRGB:
    """PIL image to RGB mode (a no-op for RGB images; picklable for loader workers)."""

    def __call__(self, img):
        return img if getattr(img, "mode", "RGB") == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def load_raw_pixels(size: int, device: str | torch.device = "cpu"):
    """``(model, preprocess, tokenizer)`` of the raw-pixel baseline at ``size``."""
    model = RawPixelModel(size).to(device)
    model.eval()
    return model, raw_pixel_transform(size), _NoTokenizer()
