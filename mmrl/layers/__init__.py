"""Small single-purpose layers (timm style): pooling and its functional twins, ViT stems (conv, pretrained)."""
from .conv_stem import ConvStem
from .generalized_mean import ChannelGeM, GeM, GGeM, clamp_p, ggem, ggem_reference
from .pools import AttnPool, AvgPool, MaxPool, TokenPool, build_pool, list_pools, register_pool
from .pretrained_stem import PretrainedStem

__all__ = [
    "ggem", "ggem_reference", "clamp_p", "GGeM", "GeM", "ChannelGeM",
    "TokenPool", "AvgPool", "MaxPool", "AttnPool", "build_pool", "list_pools", "register_pool",
    "ConvStem", "PretrainedStem",
]
