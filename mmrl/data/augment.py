"""Training-time image augmentations beyond open_clip's crop: grayscale, polarity inversion and
low resolution, each applied with its own probability.

Why these three: the demo trains on colour emoji drawn dark-on-white at 64 px and is asked to
recognise, zero-shot, 28 px grayscale product photos drawn light-on-dark (Fashion-MNIST). A
model that has only ever seen the first domain ties its features to colour, polarity and fine
detail; these augmentations make it invariant to all three without showing it any evaluation
data. They are the usual photometric augmentations of self-supervised recipes (SimCLR's random
grayscale), plus inversion and a downsample-upsample round trip.

Every step works on PIL images and on uint8 ``[..., 3, H, W]`` tensors, so the loader's fast
tensor path keeps working (:mod:`mmrl.data.batching`). Randomness comes from torch's global
generator, which the loader seeds per batch (same batch for the same step, whichever worker).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

__all__ = ["AugConfig", "RandomLowResolution", "build_train_transform"]


@dataclass
class AugConfig:
    scale: tuple[float, float] = (0.9, 1.0)      # RandomResizedCrop area range (open_clip's default)
    grayscale: float = 0.0                       # probability of converting to 3-channel grayscale
    invert: float = 0.0                          # probability of inverting (255 - x)
    low_res: float = 0.0                         # probability of a downsample-upsample round trip
    low_res_size: tuple[int, int] = (16, 32)     # side length drawn uniformly from this range

    def validate(self, prefix: str = "") -> None:
        from ..config import ConfigError

        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"config key '{prefix}scale': expected 0 < min <= max <= 1, got {self.scale!r}")
        for name in ("grayscale", "invert", "low_res"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ConfigError(f"config key '{prefix}{name}': expected a probability in [0, 1], got {p!r}")
        a, b = self.low_res_size
        if not 1 <= a <= b:
            raise ConfigError(f"config key '{prefix}low_res_size': expected 1 <= min <= max, got {self.low_res_size!r}")


class RandomLowResolution(torch.nn.Module):
    """With probability ``p``: shrink to a side drawn from ``size`` (shorter side, aspect kept)
    and resize back (bicubic, antialiased) -- the detail lost in a low-resolution photo."""

    def __init__(self, p: float, size: tuple[int, int] = (16, 32)):
        super().__init__()
        self.p, self.size = float(p), (int(size[0]), int(size[1]))

    def forward(self, img: Any) -> Any:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return img
        side = int(torch.randint(self.size[0], self.size[1] + 1, ()))
        if isinstance(img, Image.Image):
            w, h = img.size
            small = _shrunk(h, w, side)
            if small == (h, w):
                return img
            return img.resize(small[::-1], Image.BICUBIC).resize((w, h), Image.BICUBIC)
        h, w = img.shape[-2:]
        small = _shrunk(h, w, side)
        if small == (h, w):
            return img
        x = img.unsqueeze(0) if img.dim() == 3 else img
        down = F.interpolate(x.float(), size=small, mode="bicubic", antialias=True, align_corners=False)
        up = F.interpolate(down, size=(h, w), mode="bicubic", antialias=False, align_corners=False)
        if img.dtype == torch.uint8:
            up = up.round_().clamp_(0, 255).to(torch.uint8)
        return up.squeeze(0) if img.dim() == 3 else up

    def extra_repr(self) -> str:
        return f"p={self.p}, size={self.size}"


def _shrunk(h: int, w: int, side: int) -> tuple[int, int]:
    if min(h, w) <= side:
        return h, w
    if h <= w:
        return side, max(1, round(w * side / h))
    return max(1, round(h * side / w)), side


def build_train_transform(base: T.Compose, aug: AugConfig) -> T.Compose:
    """``base`` (open_clip's train transform) with ``aug.scale`` on its RandomResizedCrop and
    the photometric steps inserted right after the crop (before the RGB conversion/ToTensor)."""
    steps = list(base.transforms)
    out = []
    for t in steps:
        if isinstance(t, T.RandomResizedCrop):
            t = T.RandomResizedCrop(t.size, scale=tuple(aug.scale), ratio=t.ratio, interpolation=t.interpolation,
                                    antialias=True)
        out.append(t)
        if isinstance(t, T.RandomResizedCrop):
            if aug.low_res > 0:
                out.append(RandomLowResolution(aug.low_res, aug.low_res_size))
            if aug.grayscale > 0:
                out.append(T.RandomGrayscale(aug.grayscale))
            if aug.invert > 0:
                out.append(T.RandomInvert(aug.invert))
    return T.Compose(out)
