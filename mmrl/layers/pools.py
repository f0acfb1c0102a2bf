"""Token-pooling modules for ViT towers and their registry.

Every pooler maps ViT output tokens to one vector per image. Poolers whose
``uses_class_token`` is False receive the patch tokens only (``[B, N, C]``, class
token excluded); ``tok`` receives the full sequence (``[B, 1 + N, C]``).

Kinds (named like open_clip's ``pool_type`` where it has one):

======  =====================================================  ====================
kind    what                                                   parameters
======  =====================================================  ====================
tok     class token                                            none
avg     mean over patch tokens                                 none
max     max over patch tokens                                  none
gem     GeM, one exponent for all channels (GGeM, G=1)         ``p`` [1]
ggem    GGeM, one exponent per group of C/G channels,           ``p`` [G]
        G = number of attention heads unless ``groups`` given
cgem    channel-wise GeM (GGeM, G=C)                           ``p`` [C]
attn    open_clip's ``AttentionalPooler`` with one query       query, attention, LNs
======  =====================================================  ====================
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .generalized_mean import GGeM

__all__ = ["TokenPool", "AvgPool", "MaxPool", "AttnPool", "register_pool", "build_pool", "list_pools"]


class TokenPool(nn.Module):
    """The class token (index 0 of the full sequence)."""

    uses_class_token = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class AvgPool(nn.Module):
    """Mean over patch tokens."""

    uses_class_token = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class MaxPool(nn.Module):
    """Max over patch tokens."""

    uses_class_token = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=1)


class AttnPool(nn.Module):
    """open_clip's attentional pooler with a single learned query (output width = input width)."""

    uses_class_token = False

    def __init__(self, dim: int, heads: int):
        super().__init__()
        from open_clip.transformer import AttentionalPooler

        self.attn = AttentionalPooler(dim, dim, n_head=heads, n_queries=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)[:, 0]


GGeM.uses_class_token = False

PoolBuilder = Callable[..., nn.Module]
_POOLS: dict[str, PoolBuilder] = {}


def register_pool(kind: str):
    """Decorator registering ``fn(dim, heads, **kw) -> nn.Module`` under ``kind``."""

    def wrap(fn: PoolBuilder) -> PoolBuilder:
        if kind in _POOLS:
            raise ValueError(f"pool kind {kind!r} is already registered")
        _POOLS[kind] = fn
        return fn

    return wrap


def _no_options(kind: str, kw: dict) -> None:
    if kw:
        raise ValueError(f"pool {kind!r} takes no options, got {sorted(kw)}")


@register_pool("tok")
def _tok(dim: int, heads: int, **kw) -> nn.Module:
    _no_options("tok", kw)
    return TokenPool()


@register_pool("avg")
def _avg(dim: int, heads: int, **kw) -> nn.Module:
    _no_options("avg", kw)
    return AvgPool()


@register_pool("max")
def _max(dim: int, heads: int, **kw) -> nn.Module:
    _no_options("max", kw)
    return MaxPool()


@register_pool("gem")
def _gem(dim: int, heads: int, **kw) -> nn.Module:
    if kw.pop("groups", 1) != 1:
        raise ValueError("pool 'gem' has exactly one group; use 'ggem' for several")
    return GGeM(dim, groups=1, **kw)


@register_pool("ggem")
def _ggem(dim: int, heads: int, groups: int | None = None, **kw) -> nn.Module:
    return GGeM(dim, groups=heads if groups is None else groups, **kw)


@register_pool("cgem")
def _cgem(dim: int, heads: int, **kw) -> nn.Module:
    if kw.pop("groups", dim) != dim:
        raise ValueError("pool 'cgem' has one group per channel; use 'ggem' for other group counts")
    return GGeM(dim, groups=dim, **kw)


@register_pool("attn")
def _attn(dim: int, heads: int, **kw) -> nn.Module:
    _no_options("attn", kw)
    return AttnPool(dim, heads)


def list_pools() -> list[str]:
    return list(_POOLS)


def build_pool(kind: str, dim: int, heads: int, **kw) -> nn.Module:
    """Build the pooler ``kind`` for tokens of width ``dim`` in a tower with ``heads`` heads."""
    if kind not in _POOLS:
        raise ValueError(f"unknown pool kind {kind!r}; expected one of {list_pools()}")
    return _POOLS[kind](dim, heads, **kw)
