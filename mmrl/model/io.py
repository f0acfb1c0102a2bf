"""Save and load mmrl models: safetensors weights + a JSON config, open_clip's local-dir layout.

A saved model is a folder with

* ``open_clip_config.json`` -- ``{"model_cfg": ..., "preprocess_cfg": ..., "mmrl": {...}}``;
  ``model_cfg`` is open_clip's schema plus ``vision_cfg.pool_type`` / ``pool_kwargs``;
* ``open_clip_model.safetensors`` -- the state dict.

A model trained with patch dropout (``create_model(patch_dropout=r)``) is saved like any other:
``model_cfg`` holds no ``patch_dropout`` (a training setting with no effect in eval mode), so the
loaded model is the same network and drops no patches even in train mode; for ``r > 0`` the rate is
recorded as ``mmrl.train_patch_dropout`` (information only, not applied on load).

Models pooling with ``tok`` or ``avg`` are plain open_clip models, so
``open_clip.create_model("local-dir:PATH")`` loads them too. Loading never unpickles:
safetensors, or ``torch.load(weights_only=True)`` for a ``.bin`` state dict.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from safetensors.torch import save_file

from ..fileio import atomic_write_files
from ..safeload import load_safetensors, load_weights_only
from .factory import create_model_from_config, get_tokenizer

__all__ = ["save_model", "load_model", "read_model_config", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
BIN_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
FORMAT_VERSION = 1


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and not hasattr(model, "mmrl_cfg"):  # DDP / DeepSpeed engines
        model = model.module
    return model


def save_model(model: torch.nn.Module, path: str | os.PathLike,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (built by mmrl) to folder ``path``; files are replaced atomically, and only once
    both are written (a full disk raises :class:`mmrl.fileio.NoSpaceLeft` and leaves an earlier model whole).

    ``state_dict`` may be given when the weights come from elsewhere (e.g. a consolidated
    ZeRO-3 checkpoint); it must match the model's keys.
    """
    model = _unwrap(model)
    meta = getattr(model, "mmrl_cfg", None)
    if meta is None:
        raise ValueError("save_model: model was not created by mmrl (no mmrl_cfg attribute)")
    out = Path(path)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    config = {
        "model_cfg": meta["model_cfg"],
        "preprocess_cfg": dict(model.visual.preprocess_cfg),
        "mmrl": {"format_version": FORMAT_VERSION, "name": meta.get("name", ""),
                 "lock_text": meta.get("lock_text", False)},
    }
    if meta.get("patch_dropout"):  # a record of how it was trained; r = 0 leaves the file as it always was
        config["mmrl"]["train_patch_dropout"] = meta["patch_dropout"]
    text = json.dumps(config, indent=2) + "\n"
    try:
        atomic_write_files({  # both written before either replaces an earlier model's file
            out / WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
            out / CONFIG_NAME: lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
        })
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # no empty model folder left behind
        raise
    return out


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no such file (expected a folder written by mmrl.save_model)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path}: not valid JSON ({err})") from err
    for key in ("model_cfg", "preprocess_cfg"):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"{cfg_path}: field {key!r} missing or not an object")
    return config


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_NAME).is_file():
        return load_safetensors(folder / WEIGHTS_NAME)  # one line naming the file if it is empty or cut short
    if (folder / BIN_WEIGHTS_NAME).is_file():
        state = load_weights_only(folder / BIN_WEIGHTS_NAME)  # a pickle needing code is refused, one line
        if not isinstance(state, dict):
            raise ValueError(f"{folder / BIN_WEIGHTS_NAME}: expected a state dict, got {type(state).__name__}")
        return state.get("state_dict", state)
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} or {BIN_WEIGHTS_NAME}")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               precision: str = "fp32") -> tuple[torch.nn.Module, Any, Any]:
    """Load a folder written by :func:`save_model`: returns ``(model, preprocess, tokenizer)``, model in eval mode."""
    folder = Path(path)
    config = read_model_config(folder)
    extra = config.get("mmrl", {})
    model = create_model_from_config(
        {**config["model_cfg"], "preprocess_cfg": config["preprocess_cfg"]},
        lock_text=bool(extra.get("lock_text", False)),
        precision=precision,
        device="cpu",
        pretrained=False,  # no pretrained text tower or stem weights: they come from the file below
        name=extra.get("name", ""),
    )
    model.mmrl_cfg["model_cfg"] = config["model_cfg"]
    state = _load_state_dict(folder)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{folder / WEIGHTS_NAME}: weights do not match the config "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    model.to(device).eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return model, preprocess, get_tokenizer(config["model_cfg"])
