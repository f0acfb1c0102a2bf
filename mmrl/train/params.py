"""Reading parameters out of a DeepSpeed engine whatever the ZeRO stage.

Under ZeRO-3 a parameter outside forward is an empty placeholder; reading it needs a
collective gather that every rank joins. Both helpers here are such collectives for stage 3
(and plain reads otherwise): call them on all ranks, in the same order.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["gathered_values", "full_state_dict"]


def gathered_values(params: list[nn.Parameter], zero_stage: int) -> list[torch.Tensor]:
    """Full fp32 CPU copies of ``params``."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return [p.detach().float().cpu().clone() for p in params]
    return [p.detach().float().cpu().clone() for p in params]


def full_state_dict(engine, module, zero_stage: int) -> dict[str, torch.Tensor]:
    """The wrapped model's consolidated state dict (open_clip keys), from the fp32 master
    weights where DeepSpeed keeps them (bf16/fp16 or ZeRO), else from the module."""
    from deepspeed.utils import safe_get_full_fp32_param

    names, params = zip(*module.named_parameters())
    values = dict(zip(names, gathered_values(list(params), zero_stage)))
    for name, param in zip(names, params):
        if param.requires_grad:
            try:
                master = safe_get_full_fp32_param(param)
            except (AttributeError, AssertionError, RuntimeError):
                master = None
            if master is not None:
                values[name] = master.detach().float().cpu().clone()
    return module.export_state_dict(values)
