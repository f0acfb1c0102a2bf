"""Image decoding and re-encoding for shards: EXIF orientation, alpha flattened onto white,
aspect-preserving downscale, JPEG encode."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

__all__ = ["EncodedImage", "ImageError", "encode_image", "to_rgb"]

# decompression-bomb guard: refuse images above ~90 megapixels instead of allocating gigabytes
Image.MAX_IMAGE_PIXELS = 90_000_000


class ImageError(Exception):
    """An image could not be used; ``reason`` is a short counter name for the stats."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class EncodedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB view of ``img``; transparent pixels (RGBA, LA, P with transparency) go onto white."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def encode_image(src: str | Path | bytes, max_size: int = 256, quality: int = 90) -> EncodedImage:
    """Decode ``src`` (path or bytes), orient, flatten, shrink so the longer side is at most
    ``max_size`` (never enlarged) and encode as JPEG. Raises :class:`ImageError`."""
    try:
        fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else open(src, "rb")
    except OSError as err:
        raise ImageError("failed_to_read", str(err)) from err
    try:
        with fp, Image.open(fp) as img:
            ow, oh = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees
                ow, oh = oh, ow
            if img.format == "JPEG" and max(img.size) > max_size:
                img.draft("RGB", (max_size, max_size))  # DCT-domain downscale: decode less
            img.load()
            img = to_rgb(ImageOps.exif_transpose(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageError("failed_to_decode", str(err)) from err
    if max(img.size) > max_size:
        scale = max_size / max(img.size)
        size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return EncodedImage(out.getvalue(), img.size[0], img.size[1], ow, oh)
