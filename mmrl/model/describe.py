"""What a model is, read from the model itself (its modules and parameters, not its config file):
used by ``mmrl info`` and by reports that describe a tower."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["ModelDescription", "describe_model"]


@dataclass
class ModelDescription:
    """A model's architecture, pooling and learned state, as :func:`describe_model` reads them."""

    name: str
    model_class: str
    pool: str | None
    pool_kwargs: dict[str, Any]
    final_ln_after_pool: bool
    image_size: int
    patch_size: int
    tokens: int
    width: int
    layers: int
    heads: int
    stem: str                 # how the tokens are made, in words
    text_tower: str           # the text tower, in words ("none" for an image-only model)
    lock_text: bool
    pretrained_parts: list[str] = field(default_factory=list)  # parts built from packaged pretrained weights
    parameters: int = 0
    trainable_parameters: int = 0
    logit_scale: float | None = None
    p: list[float] | None = None  # a generalized-mean pooler's effective exponents

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def image_tower(self) -> str:
        """One line: width x blocks, input size, tokens and where they come from."""
        return (f"ViT width {self.width} x {self.layers} blocks, {self.image_size} px, {self.tokens} tokens of "
                f"{self.patch_size}x{self.patch_size} px from {self.stem}")


def _pair(value: Any) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


def _stem(visual: nn.Module) -> tuple[str, str | None]:
    """The token stem in words, and its pretrained weights' name when it has some."""
    conv1 = visual.conv1
    describe = getattr(conv1, "describe", None)
    if callable(describe):
        return describe(), getattr(conv1, "pretrained_weights", None)
    k = _pair(conv1.kernel_size) if isinstance(conv1, nn.Conv2d) else _pair(visual.patch_size)
    return f"one {k}x{k} patchify convolution", None


def _text_tower(model: nn.Module) -> tuple[str, str | None]:
    """The text tower in words, and its pretrained weights' name for a Hugging Face tower."""
    text = getattr(model, "text", None)
    if text is None and hasattr(model, "transformer"):  # open_clip CLIP: the text transformer sits on the model
        width = getattr(model.transformer, "width", None)
        layers = getattr(model.transformer, "layers", None)
        return f"transformer width {width} x {layers} blocks, context {getattr(model, 'context_length', '?')}", None
    if text is None:
        return "none", None
    inner = getattr(text, "encoder", text)  # a caching wrapper keeps the encoder inside
    hf = getattr(inner, "transformer", None)
    config = getattr(hf, "config", None)
    if config is not None:
        kind = getattr(config, "model_type", "hf")
        # a packaged tower is named by its package (``pkg:MODULE``), a hub or local one by its path's last part
        named = str((getattr(model, "mmrl_cfg", None) or {}).get("model_cfg", {}).get("text_cfg", {})
                    .get("hf_model_name", ""))
        path = str(getattr(config, "_name_or_path", "") or kind).rstrip("/")
        source = named.removeprefix("pkg:") if named.startswith("pkg:") else path.split("/")[-1]
        pooling = type(getattr(inner, "pooler", None)).__name__.removesuffix("Pooler").lower() or "?"
        words = (f"Hugging Face {kind} encoder '{source}' ({config.num_hidden_layers} layers, width "
                 f"{config.hidden_size}, {pooling} pooling)")
        return words, f"text tower: {source}"
    return type(text).__name__, None


def describe_model(model: nn.Module) -> ModelDescription:
    """Describe an mmrl (open_clip-contract) model from its modules: architecture, pooling, the
    parts that carry pretrained weights, parameter counts and the learned temperature and GGeM
    exponents."""
    visual = model.visual
    meta = getattr(model, "mmrl_cfg", {}) or {}
    stem, stem_weights = _stem(visual)
    text, text_weights = _text_tower(model)
    image_size, patch_size = _pair(visual.image_size), _pair(visual.patch_size)
    blocks = visual.transformer.resblocks
    attn = blocks[0].attn if len(blocks) else None
    pooler = getattr(visual, "pooler", None)
    p = None
    if pooler is not None and hasattr(pooler, "effective_p"):
        p = [round(float(v), 4) for v in pooler.effective_p().detach().float().flatten()]
    scale = getattr(model, "logit_scale", None)
    return ModelDescription(
        name=str(meta.get("name", "")),
        model_class=type(model).__name__,
        pool=getattr(visual, "pool_type", None),
        pool_kwargs=dict(getattr(visual, "pool_kwargs", {}) or {}),
        final_ln_after_pool=bool(getattr(visual, "final_ln_after_pool", False)),
        image_size=image_size,
        patch_size=patch_size,
        tokens=(image_size // patch_size) ** 2,
        width=int(visual.transformer.width),
        layers=len(blocks),
        heads=int(attn.num_heads) if attn is not None and hasattr(attn, "num_heads") else 0,
        stem=stem,
        text_tower=text,
        lock_text=bool(meta.get("lock_text", False)),
        pretrained_parts=[x for x in (f"image stem: {stem_weights}" if stem_weights else None, text_weights) if x],
        parameters=sum(q.numel() for q in model.parameters()),
        trainable_parameters=sum(q.numel() for q in model.parameters() if q.requires_grad),
        logit_scale=float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else None,
        p=p,
    )
