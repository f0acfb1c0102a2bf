"""Reading parameters out of a DeepSpeed engine whatever the ZeRO stage and precision.

Under ZeRO-3 a parameter outside forward is an empty placeholder; reading it needs a
collective gather that every rank joins. The helpers here are such collectives for stage 3
(and plain reads otherwise): call them on all ranks, in the same order.

With bf16/fp16 the module holds rounded copies; the optimizer keeps the fp32 master weights
that training actually updates (a GGeM exponent of 3.0 moves by less than a bf16 step, 1/64, for
many steps). :func:`master_values` reads those: through DeepSpeed's ``safe_get_full_fp32_param``
(ZeRO 1-3 and DeepSpeed's BF16_Optimizer) or, for ZeRO 0 with bf16/fp16 and a torch optimizer
(DeepSpeed's unfused mixed-precision optimizer, which that helper does not know), from the
optimizer's ``fp16_groups`` / ``fp32_groups`` pairs.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["gathered_values", "master_values", "full_state_dict"]


def gathered_values(params: list[nn.Parameter], zero_stage: int) -> list[torch.Tensor]:
    """Full fp32 CPU copies of ``params`` (the module's values)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return [p.detach().float().cpu().clone() for p in params]
    return [p.detach().float().cpu().clone() for p in params]


def _paired_masters(engine) -> dict[int, torch.Tensor]:
    """``id(module parameter) -> fp32 master`` for optimizers keeping per-parameter pairs."""
    opt = getattr(engine, "optimizer", None)
    low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if not isinstance(low, list) or not isinstance(high, list) or len(low) != len(high):
        return {}
    pairs = {}
    for lo_group, hi_group in zip(low, high):
        if not isinstance(lo_group, list) or not isinstance(hi_group, list) or len(lo_group) != len(hi_group):
            return {}
        for lo, hi in zip(lo_group, hi_group):
            if isinstance(hi, torch.Tensor) and hi.shape == lo.shape:
                pairs[id(lo)] = hi
    return pairs


def master_values(engine, params: list[nn.Parameter], zero_stage: int) -> list[torch.Tensor]:
    """Full fp32 CPU copies of ``params``: the optimizer's fp32 master weights of trainable
    parameters where DeepSpeed keeps them (bf16/fp16, ZeRO), else the module's values."""
    from deepspeed.utils import safe_get_full_fp32_param

    values = gathered_values(params, zero_stage)
    paired = _paired_masters(engine)
    for i, param in enumerate(params):
        if not param.requires_grad:
            continue
        master = paired.get(id(param))
        if master is None:
            try:
                master = safe_get_full_fp32_param(param)
            except (AttributeError, AssertionError, RuntimeError):
                master = None
        if master is not None:
            values[i] = master.detach().float().cpu().clone()
    return values


def full_state_dict(engine, module, zero_stage: int) -> dict[str, torch.Tensor]:
    """The wrapped model's consolidated state dict (open_clip keys), from the fp32 master
    weights where DeepSpeed keeps them (:func:`master_values`), else from the module."""
    names, params = zip(*module.named_parameters())
    values = dict(zip(names, master_values(engine, list(params), zero_stage)))
    return module.export_state_dict(values)
