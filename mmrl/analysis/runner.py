"""``mmrl analyze``: what a ViT tower's pooling learned, measured on images.

One forward pass per batch collects the tower's output tokens (and the last block's input, for the
class token's attention); every pool kind is then applied to those *same* tokens, so the comparison
between kinds isolates the pooling:

* ``tok`` (class token), ``avg``, ``gem`` (one exponent: the mean of the model's), ``ggem`` (one per
  head-aligned group: the model's exponents, averaged per group when it has more) and the model's own
  pooler when it is another kind. A model without exponents (``tok`` / ``avg`` / ...) is compared with
  GeM/GGeM at ``p = 3`` (GeM's usual initial value). ``ln_post`` is applied as in the tower.
* per pool kind, the ``G x G`` dependence between the ``G`` head-aligned channel groups (``C / G``
  channels each) of the pooled features: unbiased HSIC (Gaussian kernel, median bandwidth), linear CKA
  (streamed, exact) and debiased linear CKA; the mean off-diagonal value summarises each;
* the model's exponents with, per group, the share of its pooled activations clamped at ``eps`` and
  their mean; per channel the ratio of the generalized mean to the plain mean of the same clamped
  tokens (>= 1 by the power-mean inequality: how much the exponent amplifies that channel);
* for the first few images, per group the token shares of ``sum x^p`` (:mod:`.token_weights`) beside
  average pooling's uniform weights and the class token's last-block attention (heads averaged).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..layers.generalized_mean import GGeM, ggem
from .estimators import (
    CovarianceAccumulator,
    block_cka,
    gaussian_gram,
    hsic_unbiased_gram,
    off_diagonal_mean,
    u_centre,
)
from .images import ImageSource
from .token_weights import token_shares

__all__ = ["TokenTap", "reference_exponents", "analyze_model", "DEFAULT_P"]

DEFAULT_P = 3.0  # GeM's usual initial exponent: the comparison point for a model without exponents


class TokenTap:
    """Runs a ViT tower up to its pooling: ``(tokens, last_block_input)`` where ``tokens`` is what the
    pooler sees (``[B, 1 + N, C]``, after ``ln_post`` unless the tower normalises after pooling)."""

    def __init__(self, visual: nn.Module):
        for name in ("_embeds", "transformer", "ln_post"):
            if not hasattr(visual, name):
                raise ValueError(f"mmrl analyze needs an open_clip ViT image tower (its {name!r} is missing)")
        self.visual = visual
        self.after_pool = bool(getattr(visual, "final_ln_after_pool", False))

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        visual, seen = self.visual, {}
        last = visual.transformer.resblocks[-1]
        handle = last.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
        try:
            x = visual.transformer(visual._embeds(images))
        finally:
            handle.remove()
        return (x if self.after_pool else visual.ln_post(x)), seen.get("x")

    def post(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(pooled) if self.after_pool else pooled

    def own(self, tokens: torch.Tensor) -> torch.Tensor:
        pooler = self.visual.pooler
        return self.post(pooler(tokens if getattr(pooler, "uses_class_token", False) else tokens[:, 1:]))

    def class_attention(self, block_input: torch.Tensor | None) -> torch.Tensor | None:
        """The class token's attention over the patch tokens in the last block, heads averaged ``[B, N]``."""
        block = self.visual.transformer.resblocks[-1]
        attn = getattr(block, "attn", None)
        if block_input is None or not isinstance(attn, nn.MultiheadAttention) or not attn.batch_first:
            return None
        y = block.ln_1(block_input)
        _, weights = attn(y, y, y, need_weights=True, average_attn_weights=True)
        return weights[:, 0, 1:]


def _heads(visual: nn.Module) -> int:
    return int(visual.transformer.resblocks[0].attn.num_heads)


def reference_exponents(pooler: nn.Module, channels: int, heads: int) -> dict[str, Any]:
    """The model's exponents (``None`` without) and those the ``gem`` / ``ggem`` comparisons use."""
    if isinstance(pooler, GGeM):
        p = pooler.effective_p().detach().double().cpu()
        eps = float(pooler.eps)
    else:
        p, eps = None, 1e-6
    per_channel = (p if p is not None else torch.tensor([DEFAULT_P], dtype=torch.float64))
    per_channel = per_channel.repeat_interleave(channels // per_channel.numel())
    return {"model": p, "eps": eps, "channel": per_channel, "gem": per_channel.mean().reshape(1),
            "ggem": per_channel.reshape(heads, channels // heads).mean(1)}


def _pool_fns(tap: TokenTap, ref: dict[str, Any], own_kind: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    eps = ref["eps"]
    fns = {
        "tok": lambda t: tap.post(t[:, 0]),
        "avg": lambda t: tap.post(t[:, 1:].mean(1)),
        "gem": lambda t: tap.post(ggem(t[:, 1:], ref["gem"].to(t), eps)),
        "ggem": lambda t: tap.post(ggem(t[:, 1:], ref["ggem"].to(t), eps)),
    }
    n_model = ref["model"].numel() if ref["model"] is not None else 0
    same = {"tok": True, "avg": True, "gem": n_model == 1, "ggem": n_model == ref["ggem"].numel()}
    if same.get(own_kind, False):
        fns[own_kind] = tap.own  # the model's own module: the same maths with its exact exponents
    else:  # another kind (cgem, max, attn, ggem with other groups): its own row
        fns[f"{own_kind} (model)" if own_kind in fns else own_kind] = tap.own
    return fns


def _dependence(features: torch.Tensor, cov: CovarianceAccumulator, heads: int) -> dict[str, Any]:
    n, c = features.shape
    groups = features.double().reshape(n, heads, c // heads)
    grams = [gaussian_gram(groups[:, g]) for g in range(heads)]
    ucentred = [u_centre(groups[:, g] @ groups[:, g].T) for g in range(heads)]  # debiased linear CKA's
    norms = [float((u * u).sum().sqrt()) for u in ucentred]
    hsic = torch.zeros(heads, heads, dtype=torch.float64)
    debiased = torch.eye(heads, dtype=torch.float64)
    for g in range(heads):
        for h in range(g, heads):
            hsic[g, h] = hsic[h, g] = hsic_unbiased_gram(grams[g], grams[h])
            if h > g and norms[g] * norms[h] > 0:
                debiased[g, h] = debiased[h, g] = float((ucentred[g] * ucentred[h]).sum()) / (norms[g] * norms[h])
    cka = block_cka(cov.centred(), heads)
    return {"hsic": hsic.tolist(), "cka": cka.tolist(), "cka_debiased": debiased.tolist(),
            "hsic_offdiag_mean": off_diagonal_mean(hsic), "cka_offdiag_mean": off_diagonal_mean(cka),
            "cka_debiased_offdiag_mean": off_diagonal_mean(debiased)}


def _batches(source: ImageSource, preprocess, batch_size: int):
    names, tensors, raw = [], [], []
    for name, image in source.items():
        names.append(name)
        tensors.append(preprocess(image))
        raw.append(image)
        if len(tensors) == batch_size:
            yield names, torch.stack(tensors), raw
            names, tensors, raw = [], [], []
    if tensors:
        yield names, torch.stack(tensors), raw


@torch.no_grad()
def analyze_model(model: nn.Module, preprocess, source: ImageSource, *, pool_kind: str | None = None,
                  batch_size: int = 64, maps: int = 4, device: str = "cpu",
                  log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(analysis, arrays)``: the JSON-ready analysis, and what the plots need (images, token maps) with the
    pooled features of every pool kind (``arrays["features"]``)."""
    t0 = time.perf_counter()
    visual = getattr(model, "visual", model)
    if not hasattr(visual, "pooler"):
        raise ValueError("mmrl analyze needs an mmrl image tower (visual.pooler); this model has none")
    was_training = visual.training
    visual.eval()
    tap = TokenTap(visual)
    heads = _heads(visual)
    own_kind = pool_kind or getattr(visual, "pool_type", type(visual.pooler).__name__)
    channels = int(visual.transformer.width)
    ref = reference_exponents(visual.pooler, channels, heads)
    fns = _pool_fns(tap, ref, own_kind)
    eps = ref["eps"]
    n_model = ref["model"].numel() if ref["model"] is not None else heads
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in fns}
    covs = {k: CovarianceAccumulator() for k in fns}
    clamped = torch.zeros(n_model, dtype=torch.float64)
    act_sum = torch.zeros(n_model, dtype=torch.float64)
    ratio_sum = torch.zeros(channels, dtype=torch.float64)
    seen, count = 0, 0
    arrays: dict[str, Any] = {"images": [], "names": [], "shares": [], "cls_attention": [],
                              "grid": tuple(getattr(visual, "grid_size", (0, 0)))}
    try:
        for names, images, raw in _batches(source, preprocess, batch_size):
            tokens, block_in = tap(images.to(device))
            for kind, fn in fns.items():
                pooled = fn(tokens).double().cpu()
                feats[kind].append(pooled)
                covs[kind].update(pooled)
            patches = tokens[:, 1:].double().cpu()
            b, n, _ = patches.shape
            per = patches.reshape(b * n, n_model, channels // n_model)
            clamped += (per < eps).double().mean(-1).sum(0)
            act_sum += per.mean(-1).sum(0)
            gm = ggem(patches, ref["channel"], eps)
            ratio_sum += (gm / patches.clamp_min(eps).mean(1)).sum(0)
            seen += b * n
            count += b
            if len(arrays["images"]) < maps:
                k = min(maps - len(arrays["images"]), b)
                _, grouped = token_shares(patches[:k], ref["ggem"], eps)
                arrays["shares"].append(grouped)
                attn = tap.class_attention(block_in[:k] if block_in is not None else None)
                if attn is not None:
                    arrays["cls_attention"].append(attn.double().cpu())
                arrays["images"] += raw[:k]
                arrays["names"] += names[:k]
            log(f"analyze: {count} images")
    finally:
        visual.train(was_training)
    if count < 4:
        raise ValueError(f"{source.spec}: {count} readable images; the dependence estimators need at least 4")
    t_collect = time.perf_counter() - t0
    arrays["features"] = {kind: torch.cat(feats[kind]) for kind in fns}  # [n, C] per pool kind, float64
    dependence = {kind: _dependence(arrays["features"][kind], covs[kind], heads) for kind in fns}
    ratio = ratio_sum / count
    order = torch.argsort(ratio, descending=True)
    per_group = [{"group": g, "p": None if ref["model"] is None else float(ref["model"][g]),
                  "clamped_share": float(clamped[g] / seen), "mean_activation": float(act_sum[g] / seen)}
                 for g in range(n_model)]
    arrays["shares"] = torch.cat(arrays["shares"]) if arrays["shares"] else None
    arrays["cls_attention"] = torch.cat(arrays["cls_attention"]) if arrays["cls_attention"] else None
    analysis = {
        "data": {"spec": source.spec, "kind": source.kind, "images": count, "skipped": source.skipped,
                 "skipped_examples": source.skipped_examples},
        "model": {"pool": own_kind, "channels": channels, "heads": heads, "group_channels": channels // heads,
                  "tokens": n},
        "exponents": {"kind": own_kind, "groups": n_model, "eps": eps,
                      "p": None if ref["model"] is None else ref["model"].tolist(), "per_group": per_group,
                      "compared_with": {"gem": ref["gem"].tolist(), "ggem": ref["ggem"].tolist()},
                      "default_p_used": ref["model"] is None},
        "dependence": dependence,
        "amplification": {"ratio": ratio.tolist(), "order": order.tolist(), "mean": float(ratio.mean()),
                          "max": float(ratio.max()), "min": float(ratio.min())},
        "maps": {"images": arrays["names"], "grid": list(arrays["grid"]),
                 "cls_attention": arrays["cls_attention"] is not None},
        "seconds": {"forward": t_collect, "total": time.perf_counter() - t0},
    }
    return analysis, arrays
