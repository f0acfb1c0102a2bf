"""How much each token counts in a generalized-mean pooled value (activation maps).

For clamped tokens ``x = clamp(t, eps)`` ``[B, N, C]`` and exponents ``p`` ``[G]`` (channel ``c`` in group
``c // (C / G)``, as :mod:`mmrl.layers.generalized_mean`):

* :func:`token_shares` -- token ``n``'s share of the sum of ``x^p``: per channel ``x[n, c]^p / sum_m
  x[m, c]^p``, per group the same over the group's channels together. Since the pooled value is
  1-homogeneous, ``sum_n x[n] * df/dx[n] = f``: the per-channel share is token ``n``'s exact part of the
  pooled value (``x[n] * df/dx[n] / f``). At ``p = 1`` it is the token's share of the plain sum.
* :func:`token_weights` -- the pooled value's sensitivity to each token, normalised: per channel
  ``x[n, c]^(p-1) / sum_m x[m, c]^(p-1)`` (``df/dx[n]`` over its sum), per group the mean of its channels'.
  At ``p = 1`` every token weighs ``1 / N``: average pooling's uniform weights.

Both sum to 1 over the tokens, per channel and per group; computed in float64 and stably (the power is
taken of ``x / max_n x``).
"""
from __future__ import annotations

import torch

__all__ = ["token_shares", "token_weights"]


def _prepared(tokens: torch.Tensor, p: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    if tokens.dim() != 3:
        raise ValueError(f"token maps: expected tokens of shape [B, N, C], got {tuple(tokens.shape)}")
    p = torch.as_tensor(p, dtype=torch.float64).reshape(-1)
    channels, groups = tokens.shape[-1], p.numel()
    if groups == 0 or channels % groups:
        raise ValueError(f"token maps: {groups} exponents do not divide {channels} channels")
    x = tokens.detach().to(torch.float64).clamp_min(eps)
    return x / x.amax(dim=1, keepdim=True), p.repeat_interleave(channels // groups), groups


def _per_group(values: torch.Tensor, groups: int) -> torch.Tensor:
    b, n, c = values.shape
    return values.reshape(b, n, groups, c // groups).sum(-1)


def token_shares(tokens: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_channel [B, N, C], per_group [B, N, G])`` shares of ``sum x^p``."""
    r, pc, groups = _prepared(tokens, p, eps)
    # scale by the group's max so channels of one group are compared on the same footing
    b, n, c = r.shape
    x = tokens.detach().to(torch.float64).clamp_min(eps)
    gmax = x.reshape(b, n, groups, c // groups).amax(dim=(1, 3), keepdim=True)
    powered = (x.reshape(b, n, groups, c // groups) / gmax).pow(pc.reshape(groups, c // groups)).reshape(b, n, c)
    per_channel = r.pow(pc)
    per_channel = per_channel / per_channel.sum(1, keepdim=True)
    grouped = _per_group(powered, groups)
    return per_channel, grouped / grouped.sum(1, keepdim=True)


def token_weights(tokens: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_channel [B, N, C], per_group [B, N, G])`` normalised sensitivities ``x^(p-1)``."""
    r, pc, groups = _prepared(tokens, p, eps)
    per_channel = r.pow(pc - 1.0)
    per_channel = per_channel / per_channel.sum(1, keepdim=True)
    return per_channel, _per_group(per_channel, groups) / (per_channel.shape[-1] // groups)
