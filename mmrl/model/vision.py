"""ViT image towers that pool with the mmrl pooling registry (GGeM and friends).

:class:`PooledVisionTransformer` is an ``open_clip.transformer.VisionTransformer``:
same parameters, same state-dict keys, same ``forward`` / ``forward_intermediates``
/ ``lock`` / grad checkpointing; only ``_global_pool`` changes. The pooler lives at
``visual.pooler`` (GGeM's exponents are ``visual.pooler.p``). The class token is
computed as in open_clip and used only by ``pool_type='tok'``; every other kind pools
the patch tokens. The final LayerNorm's position follows open_clip's
``final_ln_after_pool`` (default False: ``ln_post`` on the tokens, then pool).

``vision_cfg.conv_stem`` (``{"channels": [...], "norm": "batchnorm"}``, default none) replaces
the patchify convolution ``conv1`` by :class:`mmrl.layers.ConvStem` (early convolutions, same
token grid); the state dict then holds ``visual.conv1.stages.*`` / ``visual.conv1.proj.*``
instead of ``visual.conv1.weight``. ``vision_cfg.pretrained_stem`` (``{"name": "efficientnet_lite0",
"locked": true}``) replaces it by :class:`mmrl.layers.PretrainedStem` (a hybrid ViT: the stride-16
stages of an ImageNet EfficientNet-Lite0, keys ``visual.conv1.body.*`` / ``visual.conv1.proj.*``).
Without either the tower is open_clip's, key for key.

Patch dropout (``vision_cfg.patch_dropout``, FLIP) is open_clip's ``PatchDropout`` at ``visual.patch_dropout``,
applied to the embedded tokens whatever the stem: in training mode every pool kind pools the kept
patch tokens only (``tok`` the class token, which is always kept).
"""
from __future__ import annotations

from dataclasses import fields
from functools import partial
from typing import Any

import torch
from open_clip.model import CLIPVisionCfg
from open_clip.transformer import LayerNorm, LayerNormFp32, QuickGELU, VisionTransformer
from torch import nn

from ..layers.conv_stem import ConvStem
from ..layers.pools import build_pool, list_pools
from ..layers.pretrained_stem import PretrainedStem

__all__ = ["PooledVisionTransformer", "build_vision_tower", "MMRL_VISION_KEYS"]

# keys mmrl adds to open_clip's vision_cfg schema
MMRL_VISION_KEYS = ("pool_kwargs", "conv_stem", "pretrained_stem")
_OPEN_CLIP_VISION_KEYS = {f.name for f in fields(CLIPVisionCfg)}


class PooledVisionTransformer(VisionTransformer):
    """open_clip ViT whose global pooling is any registered pool kind."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        *,
        pool_type: str = "ggem",
        pool_kwargs: dict[str, Any] | None = None,
        conv_stem: dict[str, Any] | None = None,
        pretrained_stem: dict[str, Any] | None = None,
        stem_weights: bool = True,
        **kwargs,
    ):
        if kwargs.get("attentional_pool"):
            raise ValueError("PooledVisionTransformer: use pool_type='attn' instead of open_clip's attentional_pool")
        if pool_type not in list_pools():
            raise ValueError(f"unknown pool_type {pool_type!r}; expected one of {list_pools()}")
        # open_clip only accepts tok/avg/none; build as 'avg' and install our pooler
        super().__init__(image_size, patch_size, width, layers, heads, mlp_ratio, pool_type="avg", **kwargs)
        self.pool_type = pool_type
        self.pool_kwargs = dict(pool_kwargs or {})
        self.pooler = build_pool(pool_type, width, heads, **self.pool_kwargs)
        self.conv_stem = dict(conv_stem) if conv_stem else None
        if self.conv_stem is not None:
            unknown = set(self.conv_stem) - {"channels", "norm"}
            if unknown or "channels" not in self.conv_stem:
                raise ValueError(f"vision_cfg.conv_stem: expected keys 'channels' (required) and 'norm', "
                                 f"got {sorted(self.conv_stem)}")
            self.conv1 = ConvStem(patch_size, width, **self.conv_stem)
        self.pretrained_stem = dict(pretrained_stem) if pretrained_stem else None
        if self.pretrained_stem is not None:
            if self.conv_stem is not None:
                raise ValueError("vision_cfg: set conv_stem or pretrained_stem, not both")
            unknown = set(self.pretrained_stem) - {"name", "locked", "train_stages"}
            if unknown:
                raise ValueError(f"vision_cfg.pretrained_stem: unknown keys {sorted(unknown)} "
                                 f"(expected 'name', 'locked', 'train_stages')")
            # stem_weights=False: the weights will come from a saved model (mmrl.load_model)
            self.conv1 = PretrainedStem(patch_size, width, pretrained=stem_weights, **self.pretrained_stem)

    def _global_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x[:, 1:]
        pooled = self.pooler(x if self.pooler.uses_class_token else tokens)
        return pooled, tokens

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False):
        """open_clip's ``VisionTransformer.lock`` (``CLIP.lock_image_tower``): every parameter frozen but
        the last ``unlocked_groups`` of open_clip's groups ``[conv1, class/positional embedding, ln_pre]``,
        ``resblocks[0]`` ... ``resblocks[-2]``, ``[resblocks[-1], ln_post]``, ``proj``. open_clip's list
        does not know ``pooler``: it joins the last group (``proj``), so ``unlocked_groups=1`` trains
        the pooler (GGeM's ``p``) and the projection. ``freeze_bn_stats`` is passed on (open_clip's ViT
        ignores it; a locked conv stem keeps its BatchNorm statistics anyway, see ``train``), and a
        pretrained stem's own lock (``pretrained_stem.locked``) stands even when every group is unlocked."""
        super().lock(unlocked_groups, freeze_bn_stats)
        if unlocked_groups != 0:  # the pooler belongs to the last (head) group
            for param in self.pooler.parameters():
                param.requires_grad = True
        if isinstance(self.conv1, PretrainedStem):
            self.conv1.apply_lock()
        self.train(self.training)  # apply the stem rule below to the current mode

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer-grouping interface (``timm.models.group_parameters``; layer-wise lr decay):
        group 0 the embeddings (``conv1`` / stem, ``class_embedding``, ``positional_embedding``,
        ``ln_pre``), group ``i + 1`` block ``i``, and everything after the blocks (``ln_post``,
        ``pooler``, ``proj``) the last group. ``coarse`` is accepted for the interface; the grouping
        is the same."""
        return {"stem": r"^(?:conv1|class_embedding|positional_embedding|ln_pre|patch_dropout)\b",
                "blocks": r"^transformer\.resblocks\.(\d+)\."}

    def train(self, mode: bool = True):
        super().train(mode)
        # a locked (frozen) conv stem is a fixed function: its BatchNorm statistics stop updating too
        stem_frozen = self.conv_stem is not None and not any(p.requires_grad for p in self.conv1.parameters())
        if mode and stem_frozen:
            for m in self.conv1.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @torch.jit.ignore
    def no_weight_decay(self):
        return set(super().no_weight_decay()) | {f"pooler.{n}" for n, _ in self.pooler.named_parameters() if n == "p"}


def build_vision_tower(
    embed_dim: int,
    vision_cfg: dict[str, Any],
    quick_gelu: bool = False,
    cast_dtype: torch.dtype | None = None,
    stem_weights: bool = True,
) -> PooledVisionTransformer:
    """Build the ViT tower exactly as open_clip's ``_build_vision_tower`` would, pooling with mmrl."""
    cfg = dict(vision_cfg)
    pool_kwargs = cfg.pop("pool_kwargs", None) or {}
    conv_stem = cfg.pop("conv_stem", None)
    pretrained_stem = cfg.pop("pretrained_stem", None)
    unknown = set(cfg) - _OPEN_CLIP_VISION_KEYS
    if unknown:
        raise ValueError(f"vision_cfg: unknown keys {sorted(unknown)}")
    vc = CLIPVisionCfg(**cfg)
    if vc.timm_model_name or isinstance(vc.layers, (tuple, list)):
        raise ValueError("mmrl pooling needs an open_clip ViT tower (not a timm or ResNet tower)")
    act_layer = QuickGELU if quick_gelu else nn.GELU
    norm_layer = LayerNormFp32 if cast_dtype in (torch.float16, torch.bfloat16) else LayerNorm
    if vc.norm_kwargs:
        norm_layer = partial(norm_layer, **vc.norm_kwargs)
    if vc.act_kwargs is not None:
        act_layer = partial(act_layer, **vc.act_kwargs)
    return PooledVisionTransformer(
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        width=vc.width,
        layers=vc.layers,
        heads=vc.width // vc.head_width,
        mlp_ratio=vc.mlp_ratio,
        ls_init_value=vc.ls_init_value,
        patch_dropout=vc.patch_dropout,
        attentional_pool=vc.attentional_pool,
        pos_embed_type=vc.pos_embed_type,
        no_ln_pre=vc.no_ln_pre,
        final_ln_after_pool=vc.final_ln_after_pool,
        pool_type=vc.pool_type,
        pool_kwargs=pool_kwargs,
        conv_stem=conv_stem,
        pretrained_stem=pretrained_stem,
        stem_weights=stem_weights,
        output_tokens=vc.output_tokens,
        output_dim=embed_dim,
        act_layer=act_layer,
        norm_layer=norm_layer,
        block_type=vc.block_type,
        qk_norm=vc.qk_norm,
        scaled_cosine_attn=vc.scaled_cosine_attn,
        scale_heads=vc.scale_heads,
        scale_attn_inner=vc.scale_attn_inner,
        scale_attn=vc.scale_attn,
        scale_fc=vc.scale_fc,
    )
