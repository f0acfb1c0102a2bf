"""Matplotlib for mmrl's plots: the Agg backend (no display needed), PNGs written atomically.

matplotlib is an optional dependency (the ``demo`` extra): without it, one error line names it
(:func:`mmrl.deps.require`)."""
from __future__ import annotations

import io
from pathlib import Path

from .deps import require
from .fileio import atomic_write_bytes

__all__ = ["pyplot", "save_png"]


def pyplot(feature: str):
    """``matplotlib.pyplot`` on the Agg backend; ``feature`` names what needs it in the missing-package error."""
    matplotlib = require("matplotlib", feature=feature)
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` as a PNG (all or nothing) and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
