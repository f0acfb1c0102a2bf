"""AdamW parameter groups (weight decay, GGeM exponents, layer-wise lr decay) and the warmup + cosine
learning-rate schedule (per optimizer step)."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["param_groups", "layer_decay_scales", "no_weight_decay", "is_ggem_exponent", "make_optimizer",
           "warmup_cosine"]

_NO_DECAY_WORDS = ("bias", "ln_", "norm", "LayerNorm", "embedding", "logit_scale", "logit_bias")


def is_ggem_exponent(name: str) -> bool:
    return name.endswith("pooler.p")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms, embeddings, temperatures and GGeM exponents are not decayed."""
    return param.ndim < 2 or is_ggem_exponent(name) or any(w in name for w in _NO_DECAY_WORDS)


def layer_decay_scales(module: nn.Module, layer_decay: float) -> dict[str, tuple[int, float]]:
    """Layer-wise lr decay (BEiT, as timm's ``param_groups_layer_decay``) over the image tower:
    parameter name -> (layer id, lr scale) for every parameter of ``module``'s ``visual`` tower.

    The layers are the tower's ``group_matcher`` groups (``timm.models.group_parameters``): for a
    ViT of ``L`` blocks, 0 the embeddings, ``i + 1`` block ``i``, ``L + 1`` the head (``ln_post``,
    pooler, ``proj``); layer ``k`` gets ``layer_decay ** (L + 1 - k)``: the head the full lr, block
    ``i`` ``d ** (L - i)``, the embeddings ``d ** (L + 1)``. Parameters outside the tower (text
    tower, temperature) are not in the map: they keep the full lr.
    """
    from timm.models import group_parameters

    towers = [(n, m) for n, m in module.named_modules() if n.rsplit(".", 1)[-1] == "visual"]
    if len(towers) != 1 or not hasattr(towers[0][1], "group_matcher"):
        raise ValueError("lr_layer_decay needs one image tower ('visual') with a group_matcher(); "
                         f"found {[n for n, _ in towers]}")
    prefix, tower = towers[0]
    layers = group_parameters(tower, tower.group_matcher(), reverse=True)
    top = max(layers.values())
    return {f"{prefix}.{name}": (k, layer_decay ** (top - k)) for name, k in layers.items()}


def param_groups(module: nn.Module, weight_decay: float, p_lr_mult: float = 1.0,
                 layer_decay: float = 1.0) -> list[dict]:
    """Groups ``decay`` / ``no_decay`` / ``ggem_p``, each with an ``lr_mult`` the schedule applies.

    With ``layer_decay < 1`` the image tower's embeddings and blocks get groups of their own,
    ``{kind}_layer{k}`` with ``lr_mult`` the layer's scale (:func:`layer_decay_scales`; GGeM's
    exponents, in the head, keep ``p_lr_mult``); parameters at the full lr stay in the three groups,
    and ``layer_decay == 1`` gives exactly those. Frozen parameters are left out.
    """
    scales = layer_decay_scales(module, layer_decay) if layer_decay != 1.0 else {}
    base = {"decay": weight_decay, "no_decay": 0.0, "ggem_p": 0.0}
    mults = {"decay": 1.0, "no_decay": 1.0, "ggem_p": p_lr_mult}
    groups = {kind: {"params": [], "weight_decay": base[kind], "lr_mult": mults[kind], "name": kind} for kind in base}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if is_ggem_exponent(name):
            kind = "ggem_p"
        elif no_weight_decay(name, param):
            kind = "no_decay"
        else:
            kind = "decay"
        layer, scale = scales.get(name, (None, 1.0))
        key = kind if scale == 1.0 else f"{kind}_layer{layer}"
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": base[kind], "lr_mult": mults[kind] * scale, "name": key}
        groups[key]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


def make_optimizer(module: nn.Module, lr: float, weight_decay: float, betas, eps: float, p_lr_mult: float = 1.0,
                   layer_decay: float = 1.0):
    """AdamW over :func:`param_groups`, each group at ``lr * lr_mult`` (a ``LambdaLR`` then scales every
    group's initial lr by the same factor, so the ratios hold through warmup and decay)."""
    groups = param_groups(module, weight_decay, p_lr_mult, layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    # a torch optimizer handed to DeepSpeed: no fused-Adam JIT build, same maths on CPU and GPU
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Multiplier of the base LR at optimizer step ``s``: linear warmup to 1, then cosine to 0."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
