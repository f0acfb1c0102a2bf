"""AdamW parameter groups and the warmup + cosine learning-rate schedule (per optimizer step)."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["param_groups", "no_weight_decay", "is_ggem_exponent", "make_optimizer", "warmup_cosine"]

_NO_DECAY_WORDS = ("bias", "ln_", "norm", "LayerNorm", "embedding", "logit_scale", "logit_bias")


def is_ggem_exponent(name: str) -> bool:
    return name.endswith("pooler.p")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms, embeddings, temperatures and GGeM exponents are not decayed."""
    return param.ndim < 2 or is_ggem_exponent(name) or any(w in name for w in _NO_DECAY_WORDS)


def param_groups(module: nn.Module, weight_decay: float, p_lr_mult: float = 1.0) -> list[dict]:
    """Groups ``decay`` / ``no_decay`` / ``ggem_p``, each with an ``lr_mult`` the schedule applies."""
    groups = {
        "decay": {"params": [], "weight_decay": weight_decay, "lr_mult": 1.0, "name": "decay"},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr_mult": 1.0, "name": "no_decay"},
        "ggem_p": {"params": [], "weight_decay": 0.0, "lr_mult": p_lr_mult, "name": "ggem_p"},
    }
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if is_ggem_exponent(name):
            groups["ggem_p"]["params"].append(param)
        elif no_weight_decay(name, param):
            groups["no_decay"]["params"].append(param)
        else:
            groups["decay"]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


def make_optimizer(module: nn.Module, lr: float, weight_decay: float, betas, eps: float, p_lr_mult: float = 1.0):
    groups = param_groups(module, weight_decay, p_lr_mult)
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
