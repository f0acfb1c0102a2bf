"""``run_analysis``: load a model and images, analyse, write ``analysis.json``, plots and ``analysis.md``."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run_analysis", "write_analysis"]


def write_analysis(analysis: dict[str, Any], arrays: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write ``analysis.json``, the four plots and ``analysis.md`` under ``out``; name -> path."""
    from ..fileio import atomic_write_text
    from .plots import plot_activation_maps, plot_amplification, plot_dependence, plot_exponents
    from .report import render_analysis

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"exponents": plot_exponents(analysis["exponents"], out / "exponents.png"),
             "dependence": plot_dependence(analysis["dependence"], out / "dependence.png"),
             "maps": plot_activation_maps(arrays, out / "activation_maps.png"),
             "amplification": plot_amplification(analysis["amplification"], out / "amplification.png")}
    rel = {k: os.path.relpath(v, out) for k, v in files.items()}
    analysis["plots"] = rel
    files["json"] = atomic_write_text(out / "analysis.json", json.dumps(analysis, indent=1) + "\n")
    files["markdown"] = atomic_write_text(out / "analysis.md", render_analysis(analysis, rel))
    return files


def run_analysis(model: str, data: str, out: str | Path, *, pool: str | None = None, max_images: int = 500,
                 batch_size: int = 64, maps: int = 4, seed: int = 0, device: str = "cpu",
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """``mmrl analyze``: ``model`` a saved model folder or an architecture name (random init with ``pool``)."""
    from ..evaluation.context import load_eval_model
    from .images import image_source
    from .runner import analyze_model

    t0 = time.perf_counter()
    source = image_source(data, max_images)  # a bad data spec fails before the model loads
    em = load_eval_model(model, pool, seed=seed, device=device)
    analysis, arrays = analyze_model(em.model, em.preprocess, source, batch_size=batch_size, maps=maps,
                                     device=device, log=log)
    analysis["model"]["name"] = em.info.model
    analysis["model"]["source"] = em.info.pretrained
    files = write_analysis(analysis, arrays, Path(out))
    seconds = time.perf_counter() - t0
    log(f"analyze: wrote {files['json']} and {files['markdown']} ({seconds:.1f} s)")
    return {"analysis": analysis, "files": files, "seconds": seconds}
