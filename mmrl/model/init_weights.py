"""Initialise a model from another model's weights: every tensor whose key and shape match.

The source is a model folder (written by :func:`mmrl.save_model`, or open_clip's local-dir layout:
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``) or one weights file
(``.safetensors``, ``.pt``, ``.pth``, ``.bin``), including open_clip's training checkpoints
``{"state_dict": {"module." + key: tensor}, "epoch": ...}``. Nothing is unpickled as code
(:mod:`mmrl.safeload`: a pickle needing another global is refused in one line).

Keys in the model but not the file (``missing``: e.g. ``visual.pooler.p`` when a ``tok`` or ``avg``
model initialises a ``ggem`` one) keep their current values; keys in the file but not the model are
``unexpected``; a key of another shape is ``mismatched`` and not loaded. With ``strict`` any of the
three is a one-line :class:`ValueError` naming the file and the first offending keys, and the model
is left untouched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..safeload import load_safetensors, load_weights_only
from .io import BIN_WEIGHTS_NAME, WEIGHTS_NAME

__all__ = ["InitReport", "init_from_weights", "read_init_weights"]

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
_SHOWN = 3  # names shown per category in the summary


@dataclass
class InitReport:
    """What :func:`init_from_weights` loaded from ``source`` (the file actually read)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)       # in the model, not in the file: kept
    unexpected: list[str] = field(default_factory=list)    # in the file, not in the model: ignored
    mismatched: list[str] = field(default_factory=list)    # same key, another shape: kept

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> list[str]:
        """``"missing 1 (visual.pooler.p)"`` for each non-empty category of keys not loaded."""
        return [f"{label} {len(names)} ({_names(names)})" for label, names in
                (("missing", self.missing), ("unexpected", self.unexpected), ("shape-mismatched", self.mismatched))
                if names]

    def summary(self) -> str:
        """One line: ``init_from FILE: loaded N tensors; missing N (a, b); unexpected N; shape-mismatched N``."""
        parts = [f"loaded {len(self.loaded)} tensors"]
        for label, names in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape-mismatched", self.mismatched)):
            parts.append(f"{label} {len(names)}" + (f" ({_names(names)})" if names else ""))
        return f"init_from {self.source}: " + "; ".join(parts)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", +{len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in (WEIGHTS_NAME, BIN_WEIGHTS_NAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"init_from {path}: no {WEIGHTS_NAME} or {BIN_WEIGHTS_NAME} in this folder "
                                f"(expected a folder written by mmrl.save_model or an open_clip local-dir)")
    if not path.exists():
        raise FileNotFoundError(f"init_from {path}: no such file or folder")
    if path.suffix not in (".safetensors", *_PICKLE_SUFFIXES):
        raise ValueError(f"init_from {path}: expected a model folder or a .safetensors, .pt, .pth or .bin file")
    return path


def read_init_weights(source: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file ``source`` names and its state dict (unwrapped from ``{"state_dict": ...}``,
    a ``module.`` prefix on every key removed)."""
    path = _weights_file(Path(source))
    state = load_safetensors(path) if path.suffix == ".safetensors" else load_weights_only(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # open_clip's training checkpoints
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise ValueError(f"init_from {path}: holds no tensors (expected a state dict, "
                         f"or a checkpoint with one under 'state_dict')")
    prefix = "module."
    if all(k.startswith(prefix) for k in tensors):  # saved from a DDP-wrapped model
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return path, tensors


def init_from_weights(model: torch.nn.Module, source: str | os.PathLike, strict: bool = False) -> InitReport:
    """Copy every tensor of ``source`` whose key and shape match into ``model`` (parameters and
    persistent buffers, cast to the model's dtypes); see the module docstring. Returns the report."""
    path, tensors = read_init_weights(source)
    own = model.state_dict()
    report = InitReport(str(path))
    for key, value in tensors.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append(key)
        else:
            report.loaded.append(key)
    report.missing = [k for k in own if k not in tensors]
    if strict and not report.exact:
        raise ValueError(f"init_from {path}: weights do not match the model (init_strict): "
                         + "; ".join(report.problems()))
    if report.loaded:
        model.load_state_dict({k: tensors[k] for k in report.loaded}, strict=False)
    return report
