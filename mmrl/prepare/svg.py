"""SVG rasterising with cairosvg (system libcairo), in parallel worker processes.

Every render is fitted into a ``box`` x ``box`` square (aspect ratio kept) and never touches the
network: references inside a file may only be ``data:`` URLs or local files; anything else
(``http:`` images, for instance) is replaced by an empty picture.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data.images import to_rgb
from ..deps import MissingDependency, require
from .common import PrepareError, save_image

__all__ = ["RenderTask", "RenderResult", "load_cairosvg", "render_svg", "render_file", "is_blank"]

_EMPTY_SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"></svg>'


def load_cairosvg(feature: str = "SVG rendering"):
    """Import cairosvg, or fail with how to get it (for ``feature``) and the cairo library it loads."""
    try:
        return require("cairosvg", feature=feature)
    except OSError as err:  # cairocffi could not dlopen libcairo
        raise PrepareError(f"cairosvg could not load the system cairo library ({err}): "
                           f"apt-get install libcairo2") from err


def _local_fetcher(url: str, resource_type: str) -> bytes:
    """cairosvg ``url_fetcher``: ``data:`` URLs and local files only, never the network."""
    from cairosvg.url import fetch

    if url.startswith("data:"):
        return fetch(url, resource_type)
    if url.startswith("file://"):
        try:
            return Path(url[len("file://"):].split("#", 1)[0]).read_bytes()
        except OSError:
            return _EMPTY_SVG
    return _EMPTY_SVG


class _SizeProbe:
    """The attributes ``cairosvg.helpers.size`` reads from a surface, to resolve the document's
    own width/height (with units) before choosing the output size."""

    dpi = 96
    font_size = 16.0  # 12pt at 96 dpi, cairosvg's default
    context_width = None
    context_height = None


def _natural_size(tree) -> tuple[float, float]:
    from cairosvg.helpers import node_format

    try:
        width, height, _ = node_format(_SizeProbe(), tree)
        return float(width or 0), float(height or 0)
    except (ValueError, TypeError, ZeroDivisionError):
        return 0.0, 0.0


def render_svg(data: bytes, box: int, *, url: str | None = None, unsafe: bool = False) -> Image.Image:
    """Render SVG ``data`` to an RGBA image whose longer side is ``box`` pixels.

    ``unsafe`` lets the parser resolve XML entities (OpenClipart files declare them). Raises
    ``ValueError`` (or cairosvg's parse errors) for files that cannot be rendered."""
    load_cairosvg()
    from cairosvg.parser import Tree
    from cairosvg.surface import PNGSurface

    tree = Tree(bytestring=data, url=url, unsafe=unsafe, url_fetcher=_local_fetcher)
    width, height = _natural_size(tree)
    if width <= 0 or height <= 0:
        size = {"output_width": box, "output_height": box}
    elif width >= height:
        size = {"output_width": box}
    else:
        size = {"output_height": box}
    out = io.BytesIO()
    surface = PNGSurface(tree, out, 96, **size)
    surface.finish()
    img = Image.open(io.BytesIO(out.getvalue()))
    img.load()
    return img.convert("RGBA")


def is_blank(img: Image.Image) -> bool:
    """True when nothing is drawn: fully transparent, or one flat colour once flattened onto white."""
    rgba = img.convert("RGBA")
    if rgba.getextrema()[3][1] == 0:
        return True
    low, high = to_rgb(rgba).convert("L").getextrema()
    return low == high


@dataclass(frozen=True)
class RenderTask:
    """Render ``src`` (an SVG file) into ``dst`` (``.png`` keeps alpha unless ``flatten``;
    ``.jpg`` is always flattened onto white)."""

    src: str
    dst: str
    box: int
    unsafe: bool = False
    flatten: bool = False


@dataclass(frozen=True)
class RenderResult:
    task: RenderTask
    status: str  # "ok", "cached", "blank" or "error"
    detail: str = ""


def render_file(task: RenderTask) -> RenderResult:
    """Worker: render one file unless ``dst`` already exists. Never raises for a bad file."""
    dst = Path(task.dst)
    if dst.exists():
        return RenderResult(task, "cached")
    try:
        data = Path(task.src).read_bytes()
        img = render_svg(data, task.box, url=task.src, unsafe=task.unsafe)
    except (PrepareError, MissingDependency):
        raise
    except Exception as err:  # noqa: BLE001 - any parser/cairo failure is a skipped file
        return RenderResult(task, "error", f"{type(err).__name__}: {err}"[:300])
    if is_blank(img):
        return RenderResult(task, "blank")
    save_image(img, dst, flatten=task.flatten)
    return RenderResult(task, "ok")
