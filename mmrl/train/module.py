"""What the DeepSpeed engine trains: an mmrl/open_clip model with its temperature held 1-D.

open_clip keeps ``logit_scale`` (and SigLIP's ``logit_bias``) as 0-dim parameters, which
``deepspeed.initialize`` rejects ("self.dim() cannot be 0"). :class:`ContrastiveModule` moves
them into 1-element parameters of its own; the wrapped model's state dict is untouched
otherwise, and :meth:`ContrastiveModule.export_state_dict` gives back exactly the model's
original keys and shapes (0-dim temperature included) for ``mmrl.save_model``.

The temperature is clamped (at most ln 100) inside ``forward``: the clamp then also holds for
fp32 master weights under bf16/fp16 and never touches a ZeRO-3 partitioned parameter outside
forward (an in-place clamp after the optimizer step does neither).
"""
from __future__ import annotations

import math

import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

__all__ = ["ContrastiveModule", "make_loss", "MAX_LOGIT_SCALE"]

MAX_LOGIT_SCALE = math.log(100.0)
_SCALARS = ("logit_scale", "logit_bias")


def make_loss(kind: str, local_loss: bool, gather_with_grad: bool, rank: int, world_size: int, *,
              grouped: bool = False, image_weight: float = 0.0, image_temperature: float = 0.1) -> nn.Module:
    """open_clip's CLIP InfoNCE loss (``local_loss`` / ``gather_with_grad``) or SigLIP loss;
    with ``grouped`` (batches carry group ids) the grouped CLIP loss of
    :mod:`mmrl.train.group_loss` (multi-positive targets, optional image-image term)."""
    if grouped:
        if kind != "clip":
            raise ValueError(f"grouped batches need the 'clip' loss, not {kind!r}")
        from .group_loss import GroupContrastiveLoss

        return GroupContrastiveLoss(local_loss, gather_with_grad, rank, world_size, image_weight, image_temperature)
    if kind == "clip":
        return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    raise ValueError(f"unknown loss {kind!r}; expected 'clip' or 'siglip'")


class ContrastiveModule(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.scalar_names = []
        for name in _SCALARS:
            value = getattr(model, name, None)
            if isinstance(value, nn.Parameter):
                self.scalar_names.append((name, tuple(value.shape)))
                setattr(self, name, nn.Parameter(value.detach().reshape(1).clone()))
                delattr(model, name)
                setattr(model, name, None)
        if not hasattr(self, "logit_scale"):
            raise ValueError("model has no logit_scale parameter")
        self.model = model

    def temperature(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()[0]
        bias = self.logit_bias[0] if getattr(self, "logit_bias", None) is not None else None
        return scale, bias

    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        """Normalised image and text features plus the (clamped, exponentiated) temperature."""
        image_features = self.model.encode_image(images, normalize=True)
        text_features = self.model.encode_text(texts, normalize=True)
        scale, bias = self.temperature()
        return image_features, text_features, scale, bias

    def export_state_dict(self, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The wrapped model's own state dict (original keys, 0-dim temperature).

        ``params`` optionally maps this module's parameter names to full (e.g. gathered fp32)
        values; missing names fall back to the module's current tensors.
        """
        params = params or {}
        state = {}
        for key, value in self.model.state_dict().items():
            state[key] = params.get(f"model.{key}", value)
        for name, shape in self.scalar_names:
            state[name] = params.get(name, getattr(self, name).detach()).reshape(shape)
        return state
