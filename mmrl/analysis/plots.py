"""The plots of ``mmrl analyze`` (matplotlib, headless Agg backend); each writes one PNG and returns its path."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..figures import pyplot, save_png

__all__ = ["plot_exponents", "plot_dependence", "plot_activation_maps", "plot_amplification"]


def _pyplot():
    return pyplot("drawing mmrl analyze's plots")


def _save(fig, path: Path) -> Path:
    return save_png(fig, path, dpi=100)


def plot_exponents(exponents: dict[str, Any], path: Path) -> Path:
    """Each group's exponent (or, without exponents, the comparison ``p``) and its clamped share."""
    plt = _pyplot()
    groups = exponents["per_group"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(6.0, 0.25 * len(groups) + 4), 3))
    xs = [g["group"] for g in groups]
    if exponents["p"] is not None:
        ax1.bar(xs, exponents["p"], color="#1f77b4")
        ax1.set_title(f"learned p per group ({exponents['kind']})")
    else:
        ax1.text(0.5, 0.5, f"{exponents['kind']}: no exponents", ha="center", va="center")
    ax1.set_xlabel("group")
    ax2.bar(xs, [100 * g["clamped_share"] for g in groups], color="#d62728")
    ax2.set_title("activations clamped at eps (%)")
    ax2.set_xlabel("group")
    return _save(fig, path)


def plot_dependence(dependence: dict[str, dict[str, Any]], path: Path) -> Path:
    """HSIC and linear CKA heatmaps (rows), one column per pool kind."""
    plt = _pyplot()
    kinds = list(dependence)
    fig, axes = plt.subplots(2, len(kinds), figsize=(2.6 * len(kinds), 5.2), squeeze=False)
    for row, (key, label) in enumerate((("hsic", "HSIC"), ("cka", "linear CKA"))):
        top = max(max(max(r) for r in dependence[k][key]) for k in kinds) or 1.0
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            im = ax.imshow(dependence[kind][key], vmin=0, vmax=top, cmap="viridis")
            ax.set_title(f"{kind}: {label}\noff-diag {dependence[kind][key + '_offdiag_mean']:.3g}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=list(axes[row]), shrink=0.8)
    return _save(fig, path)


def _upsample(weights: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    import torch.nn.functional as F

    w = weights.reshape(1, 1, *grid).float()
    return F.interpolate(w, size=size, mode="bilinear", align_corners=False)[0, 0]


def plot_activation_maps(arrays: dict[str, Any], path: Path, size: int = 96) -> Path:
    """Per image: the image, average pooling's uniform weights, the class token's attention and each
    group's token shares of ``sum x^p``, upsampled onto the image (one colour scale per image)."""
    plt = _pyplot()
    images, shares, attn = arrays["images"], arrays["shares"], arrays["cls_attention"]
    grid = tuple(arrays["grid"])
    groups = shares.shape[-1]
    cols = 3 + groups
    fig, axes = plt.subplots(len(images), cols, figsize=(1.4 * cols, 1.5 * len(images)), squeeze=False)
    n_tok = shares.shape[1]
    for i, image in enumerate(images):
        shown = image.convert("RGB").resize((size, size))
        panels = [("uniform (avg)", torch.full((n_tok,), 1.0 / n_tok))]
        panels.append(("class-token attn", attn[i] if attn is not None else None))
        panels += [(f"group {g}", shares[i, :, g]) for g in range(groups)]
        top = max(float(w.max()) for _, w in panels if w is not None)
        axes[i][0].imshow(shown)
        axes[i][0].set_title("image" if i == 0 else "", fontsize=7)
        for j, (title, w) in enumerate(panels, start=1):
            ax = axes[i][j]
            if w is not None:
                ax.imshow(shown, alpha=0.35)
                ax.imshow(_upsample(w, grid, (size, size)).numpy(), cmap="magma", vmin=0, vmax=top, alpha=0.75)
            if i == 0:
                ax.set_title(title, fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, path)


def plot_amplification(amplification: dict[str, Any], path: Path) -> Path:
    """Per channel, sorted: generalized mean / plain mean of the same clamped tokens."""
    plt = _pyplot()
    ratio = [amplification["ratio"][c] for c in amplification["order"]]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(len(ratio)), ratio, color="#2ca02c")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("channel (sorted)")
    ax.set_ylabel("GGeM / average")
    ax.set_title("channel amplification (mean over images)")
    return _save(fig, path)
