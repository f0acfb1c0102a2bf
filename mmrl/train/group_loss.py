"""Contrastive loss for batches whose samples carry a *group* (several images of one concept).

A webdataset sample may name a group in its JSON (``data.group_key``; the emoji corpus writes
``concept``: the same emoji drawn in Twemoji, OpenMoji and Noto style). With groups,

* the image-text term is CLIP's InfoNCE with *multi-positive* targets (as in UniCL): an image's
  positives are the captions of every sample of its group, with equal weight, instead of its
  own caption only -- the caption of the same concept under another style is not a negative;
* an optional image-image term (``image_weight``, supervised-contrastive as in SupCon) pulls
  the images of one group together against every other image of the batch, at a fixed
  temperature. Anchors without a positive in the batch contribute zero; the term is averaged
  over all anchors, so a global batch split over ranks (or micro-batches) has the same loss
  and gradient as the whole batch on one rank.

With every group distinct and ``image_weight=0`` this is exactly open_clip's ``ClipLoss``.
Across ranks it gathers like ``ClipLoss`` (``local_loss``: this rank's rows against every
rank's columns; ``gather_with_grad``: gradients flow through the gathered features) and gathers
the group ids without gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from open_clip.loss import gather_features
from torch import nn

__all__ = ["GroupContrastiveLoss"]

def _gather_ids(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(ids) for _ in range(world_size)]
    dist.all_gather(parts, ids)
    return torch.cat(parts)


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


class GroupContrastiveLoss(nn.Module):
    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1,
                 image_weight: float = 0.0, image_temperature: float = 0.1):
        super().__init__()
        if image_weight < 0:
            raise ValueError(f"image_weight must be >= 0, got {image_weight}")
        if image_temperature <= 0:
            raise ValueError(f"image_temperature must be > 0, got {image_temperature}")
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size
        self.image_weight, self.image_temperature = float(image_weight), float(image_temperature)
        self.last: dict[str, float] = {}  # the terms of the latest call, for logging

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> torch.Tensor:
        n = image_features.shape[0]
        device = image_features.device
        if groups is None:  # every sample its own group
            groups = torch.arange(n, device=device) + n * self.rank
        groups = groups.to(device)
        if self.world_size > 1:
            all_image, all_text = gather_features(image_features, text_features, self.local_loss,
                                                  self.gather_with_grad, self.rank, self.world_size)
            all_groups = _gather_ids(groups, self.world_size)
        else:
            all_image, all_text, all_groups = image_features, text_features, groups
        if self.world_size > 1 and self.local_loss:
            rows_image, rows_text, row_groups, offset = image_features, text_features, groups, n * self.rank
        else:
            rows_image, rows_text, row_groups, offset = all_image, all_text, all_groups, 0

        same = (row_groups[:, None] == all_groups[None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)
        logits_image = logit_scale * rows_image @ all_text.T
        logits_text = logit_scale * rows_text @ all_image.T
        if logit_bias is not None:
            logits_image = logits_image + logit_bias
            logits_text = logits_text + logit_bias
        clip = (_soft_cross_entropy(logits_image, targets) + _soft_cross_entropy(logits_text, targets)) / 2
        self.last = {"clip_loss": float(clip.detach())}
        if self.image_weight == 0 or all_image.shape[0] < 2:
            return clip

        rows = torch.arange(rows_image.shape[0], device=device)
        own = torch.zeros_like(same, dtype=torch.bool)
        own[rows, rows + offset] = True
        sim = (rows_image @ all_image.T / self.image_temperature).masked_fill(own, float("-inf"))
        positives = same.masked_fill(own, 0.0)
        count = positives.sum(dim=1)
        log_prob = sim.log_softmax(dim=1).masked_fill(own, 0.0)
        per_anchor = -(positives * log_prob).sum(dim=1) / count.clamp(min=1)
        image = per_anchor.mean()  # anchors without a positive add 0
        self.last["image_loss"] = float(image.detach())
        return clip + self.image_weight * image
