"""The model under evaluation and the run options shared by every task."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["ModelInfo", "EvalModel", "RunOptions", "load_eval_model", "default_device", "has_text_encoder"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ModelInfo:
    """How a result names its model: CLIP_benchmark's ``model`` / ``pretrained`` plus mmrl's
    pooling and a content fingerprint of the weights."""

    model: str
    pretrained: str
    pool: str | None
    source: str  # "saved" | "random-init" | "raw-pixels"
    key: str     # identity used for the feature cache file names

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalModel:
    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    info: ModelInfo


def has_text_encoder(model: torch.nn.Module) -> bool:
    """Whether text tasks apply to ``model`` (false for models declaring ``has_text_encoder = False``)."""
    return bool(getattr(model, "has_text_encoder", True))


@dataclass
class RunOptions:
    """Options shared by every evaluation task.

    ``amp`` defaults to on for CUDA and off on CPU (CPU autocast is bf16, which changes
    rankings); ``cache_dir=None`` disables the feature cache."""

    device: str = field(default_factory=default_device)
    batch_size: int = 64
    num_workers: int = 0
    amp: bool | None = None
    progress: bool = True
    cache_dir: Path | None = None
    out_dir: Path = Path("results")

    def __post_init__(self) -> None:
        if self.amp is None:
            self.amp = torch.device(self.device).type == "cuda"
        if self.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        self.out_dir = Path(self.out_dir)
        self.cache_dir = Path(self.cache_dir) if self.cache_dir is not None else None


def load_eval_model(spec: str, pool: str | None = None, *, seed: int = 0, device: str = "cpu") -> EvalModel:
    """``spec`` is ``raw-pixels`` / ``raw-pixels:SIZE`` (the pixel baseline of
    :mod:`.raw_pixels`; a reserved name, checked before folders), a folder written by
    :func:`mmrl.save_model`, or an architecture name (``mmrl.list_models()``), created with
    random weights (seeded) pooling with ``pool`` (default ``ggem``) -- the untrained baseline."""
    import mmrl
    from mmrl.model.factory import create_transforms

    from .raw_pixels import NAME as RAW
    from .raw_pixels import load_raw_pixels, parse_raw_pixels

    size = parse_raw_pixels(spec)
    if size is not None:
        if pool is not None:
            raise ValueError(f"--pool applies to architecture names, not to {spec}")
        model, preprocess, tokenizer = load_raw_pixels(size, device=device)
        info = ModelInfo(f"{RAW}-{size}", "none", None, RAW, f"{RAW}-{size}")
        return EvalModel(model, preprocess, tokenizer, info)
    path = Path(spec)
    if path.is_dir():
        if pool is not None:
            raise ValueError(f"--pool applies to architecture names; {spec} is a saved model with its own pooling")
        model, preprocess, tokenizer = mmrl.load_model(path, device=device)
        name = model.mmrl_cfg.get("name") or path.name
        pool_kind = getattr(model.visual, "pool_type", None)
        info = ModelInfo(name, str(path.resolve()), pool_kind, "saved", f"saved:{path.resolve()}")
        return EvalModel(model, preprocess, tokenizer, info)
    if path.exists():
        raise ValueError(f"{spec}: not a model folder (expected a folder written by mmrl.save_model)")
    if spec not in mmrl.list_models():
        raise ValueError(f"{spec}: neither a saved model folder nor a known architecture (see `mmrl models --all`)")
    pool = pool or "ggem"
    torch.manual_seed(seed)
    model = mmrl.create_model(spec, pool=pool, device=device)
    model.eval()
    preprocess = create_transforms(model)[1]
    info = ModelInfo(spec, f"random-init(seed={seed})", pool, "random-init", f"arch:{spec}:{pool}:{seed}")
    return EvalModel(model, preprocess, mmrl.get_tokenizer(spec), info)
