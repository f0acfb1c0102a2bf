"""Feature extraction with progress bars and a per-(model, dataset) cache.

Images are encoded once and two features are kept per image:

* ``embedding`` -- ``model.encode_image(x)``, the projected image embedding (not normalised);
* ``pooled`` -- the image tower's pooled output *before* ``visual.proj`` (for mmrl towers the
  GGeM / pool output, after ``ln_post``), captured from the same forward pass by wrapping the
  tower's ``_pool`` for the duration of the call (the model is not modified).

The cache is a folder of safetensors files, one per (model identity, dataset, options); each
records a content fingerprint of the model's weights and is recomputed (overwritten) when the
weights change, so a re-evaluated checkpoint never reads stale features.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from ..fileio import atomic_write
from ..progress import progress as progress_bar
from .datasets import dataset_fingerprint, describe_item

__all__ = [
    "ImageFeatures", "capture_pooled", "encode_images", "model_fingerprint", "FeatureCache",
    "extract_image_features", "extract_text_features", "default_cache_dir", "make_loader", "labelled_image_features",
    "autocast_context",
]

FORMAT = 1


def default_cache_dir() -> Path:
    """``$MMRL_CACHE_DIR`` or ``~/.cache/mmrl/features``."""
    env = os.environ.get("MMRL_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mmrl" / "features"


@dataclass
class ImageFeatures:
    """Raw (unnormalised) features of a dataset, in dataset order."""

    embedding: torch.Tensor
    pooled: torch.Tensor | None
    targets: torch.Tensor | None

    def get(self, tap: str, normalize: bool) -> torch.Tensor:
        if tap not in ("embedding", "pooled"):
            raise ValueError(f"feature tap must be 'embedding' or 'pooled', got {tap!r}")
        x = self.embedding if tap == "embedding" else self.pooled
        if x is None:
            raise ValueError("this model's image tower exposes no pooled (pre-projection) features")
        return F.normalize(x.float(), dim=-1) if normalize else x.float()


@contextlib.contextmanager
def capture_pooled(model: torch.nn.Module):
    """Within the block, each image-tower forward appends its pooled pre-projection output to
    the yielded list. Works for open_clip ``VisionTransformer`` towers (mmrl's included);
    yields ``None`` for towers without ``_pool``."""
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "_pool") or "_pool" in vars(visual):
        yield None
        return
    store: list[torch.Tensor] = []
    original = visual._pool

    def _pool(x):
        pooled, tokens = original(x)
        store.append(pooled.detach())
        return pooled, tokens

    visual._pool = _pool
    try:
        yield store
    finally:
        del visual._pool


def autocast_context(device: torch.device, amp: bool):
    """``torch.autocast`` on ``device`` when ``amp``, else a no-op context."""
    return torch.autocast(device.type, enabled=amp) if amp else contextlib.nullcontext()


def encode_images(model, images: torch.Tensor, device: torch.device, amp: bool):
    """``(embedding, pooled or None)`` for one batch, as float32 on the CPU."""
    with torch.no_grad(), autocast_context(device, amp), capture_pooled(model) as store:
        emb = model.encode_image(images.to(device))
    pooled = store[-1].float().cpu() if store else None
    return emb.float().cpu(), pooled


_MEMO: weakref.WeakKeyDictionary[torch.nn.Module, tuple] = weakref.WeakKeyDictionary()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes, bytes). Memoised per model
    object while no parameter or buffer has been modified in place."""
    state = model.state_dict()
    version = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
    memo = _MEMO.get(model)
    if memo is not None and memo[0] == version:
        return memo[1]
    h = hashlib.sha256()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    _MEMO[model] = (version, digest)
    return digest


class FeatureCache:
    """A folder of ``{label}-{key}.safetensors`` feature files."""

    def __init__(self, root: os.PathLike | str):
        self.root = Path(root)

    def path(self, label: str, identity: dict[str, Any]) -> Path:
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:80]
        return self.root / f"{safe}-{key}.safetensors"

    def load(self, path: Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
        if not path.is_file():
            return None
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("model_fingerprint") != fingerprint or meta.get("format") != str(FORMAT):
                return None  # the model changed: recompute (and overwrite)
            return load_file(str(path))
        except Exception:  # noqa: BLE001 - a corrupt cache file is recomputed, never fatal
            return None

    def save(self, path: Path, tensors: dict[str, torch.Tensor], fingerprint: str, meta: dict[str, str]) -> None:
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                                  metadata={"format": str(FORMAT), "model_fingerprint": fingerprint,
                                                            **meta}))


class _Safe(Dataset):
    """Wraps a dataset so that an unreadable item becomes an error string instead of an
    exception raised inside a worker process."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        try:
            x, y = self.ds[i]
        except Exception as err:  # noqa: BLE001 - reported in the main process
            return None, None, f"{describe_item(self.ds, i)}: {type(err).__name__}: {err}"
        return x, (-1 if y is None else y), None


def _collate(batch):
    errors = [e for _, _, e in batch if e]
    if errors:
        return None, None, errors
    return torch.stack([x for x, _, _ in batch]), default_collate([y for _, y, _ in batch]), None


def make_loader(ds, batch_size: int, num_workers: int) -> DataLoader:
    """Ordered, error-reporting loader over ``ds`` yielding ``(images, targets, errors)``."""
    return DataLoader(_Safe(ds), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=_collate, persistent_workers=False)


def _compute_image_features(model, ds, *, batch_size: int, num_workers: int, device: torch.device, amp: bool,
                            progress: bool, desc: str) -> ImageFeatures:
    embs: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    loader = make_loader(ds, batch_size, num_workers)
    for images, y, errors in progress_bar(loader, desc=desc, unit="batch", enabled=progress, leave=False):
        if errors:
            more = f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else ""
            raise ValueError(f"cannot read image {errors[0]}{more}")
        e, p = encode_images(model, images, device, amp)
        embs.append(e)
        if p is not None:
            pooled.append(p)
        targets.append(torch.as_tensor(y))
    if not embs:
        raise ValueError(f"{desc}: the dataset is empty")
    tgt = torch.cat(targets).long() if targets and targets[0].dim() == 1 else None
    return ImageFeatures(torch.cat(embs), torch.cat(pooled) if pooled else None, tgt)


_SAME = "pooled_is_embedding"  # cache marker: the pooled features equal the embedding (stored once)


def _param_dtype(model: torch.nn.Module) -> str:
    """The dtype of the model's first parameter (``float32`` for a model without parameters)."""
    p = next(model.parameters(), None)
    return str(p.dtype if p is not None else torch.float32)


def extract_image_features(model, ds, *, device: str = "cpu", amp: bool = False, batch_size: int = 64,
                           num_workers: int = 0, progress: bool = True, cache_dir: Path | None = None,
                           model_key: str | None = None, label: str = "images") -> ImageFeatures:
    """Embeddings, pooled features and targets of every item of ``ds``, cached in
    ``cache_dir`` (``None``: no cache) per (``model_key``, dataset files, transform, options)."""
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        if cache_dir is None:
            return _compute_image_features(model, ds, batch_size=batch_size, num_workers=num_workers, device=dev,
                                           amp=amp, progress=progress, desc=f"encoding {label}")
        fp = model_fingerprint(model)
        cache = FeatureCache(cache_dir)
        identity = {"kind": "image", "model": model_key or fp, "data": dataset_fingerprint(ds), "amp": amp,
                    "batch_size": batch_size, "dtype": _param_dtype(model)}
        path = cache.path(label, identity)
        hit = cache.load(path, fp)
        if hit is not None:
            pooled = hit["embedding"] if _SAME in hit else hit.get("pooled")
            return ImageFeatures(hit["embedding"], pooled, hit.get("targets"))
        feats = _compute_image_features(model, ds, batch_size=batch_size, num_workers=num_workers, device=dev,
                                        amp=amp, progress=progress, desc=f"encoding {label}")
        tensors = {"embedding": feats.embedding}
        if feats.pooled is not None and torch.equal(feats.pooled, feats.embedding):
            tensors[_SAME] = torch.ones(1)  # e.g. the raw-pixel baseline: stored once
        elif feats.pooled is not None:
            tensors["pooled"] = feats.pooled
        if feats.targets is not None:
            tensors["targets"] = feats.targets
        cache.save(path, tensors, fp, {"label": label, "model_key": str(model_key or "")})
        return feats
    finally:
        model.train(was_training)


# Hugging Face poolers that read only the real (unmasked) tokens; open_clip's MaxPooler does not
# (it fills the real tokens with -inf), so its padding changes the result and is left alone
_PADDING_FREE_POOLERS = ("MeanPooler", "ClsPooler", "ClsLastHiddenStatePooler")


def trim_padding(model, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` without the trailing columns that are padding in every row, for a Hugging Face
    text tower that masks padding out of attention and pooling (the same features, less compute:
    a 32-token context holds ~10-token captions); any other text tower gets ``tokens`` unchanged."""
    text = getattr(model, "text", None)
    pad = getattr(getattr(text, "config", None), "pad_token_id", None)
    if pad is None or type(getattr(text, "pooler", None)).__name__ not in _PADDING_FREE_POOLERS or tokens.dim() != 2:
        return tokens
    real = (tokens != pad).any(dim=0).nonzero()
    return tokens[:, :int(real.max()) + 1] if real.numel() else tokens[:, :1]


def _encode_texts(model, tokenizer, texts: Sequence[str], device: torch.device, amp: bool, batch_size: int,
                  progress: bool, desc: str) -> torch.Tensor:
    out: list[torch.Tensor] = []
    starts = range(0, len(texts), batch_size)
    for a in progress_bar(starts, desc=desc, unit="batch", enabled=progress, leave=False):
        tokens = trim_padding(model, tokenizer(list(texts[a:a + batch_size]))).to(device)
        with torch.no_grad(), autocast_context(device, amp):
            out.append(model.encode_text(tokens).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def extract_text_features(model, tokenizer, texts: Sequence[str], *, device: str = "cpu", amp: bool = False,
                          batch_size: int = 256, progress: bool = True, cache_dir: Path | None = None,
                          model_key: str | None = None, label: str = "texts") -> torch.Tensor:
    """Raw ``encode_text`` outputs of ``texts`` (in order), cached like image features. The cache
    file is named by what it holds, not by ``label`` (kept in its metadata): evaluation sets that
    share their captions -- one concept list drawn in several styles -- share one file."""
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        if cache_dir is None:
            return _encode_texts(model, tokenizer, texts, dev, amp, batch_size, progress, f"encoding {label}")
        fp = model_fingerprint(model)
        h = hashlib.sha256()
        for t in texts:
            h.update(t.encode("utf-8") + b"\0")
        identity = {"kind": "text", "model": model_key or fp, "texts": h.hexdigest(), "amp": amp,
                    "batch_size": batch_size, "tokenizer": type(tokenizer).__name__,
                    "context_length": getattr(tokenizer, "context_length", None)}
        cache = FeatureCache(cache_dir)
        path = cache.path("texts", identity)
        hit = cache.load(path, fp)
        if hit is not None:
            return hit["embedding"]
        emb = _encode_texts(model, tokenizer, texts, dev, amp, batch_size, progress, f"encoding {label}")
        cache.save(path, {"embedding": emb}, fp, {"label": label, "model_key": str(model_key or "")})
        return emb
    finally:
        model.train(was_training)


def encode_text_groups(model, tokenizer, groups: Sequence[Sequence[str]], device: torch.device, amp: bool,
                       progress: bool, desc: str, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``reduce(encode_text(group))`` for each group, one batch per group (zero-shot classes)."""
    out = []
    for group in progress_bar(groups, desc=desc, unit="batch", enabled=progress, leave=False):
        tokens = trim_padding(model, tokenizer(list(group))).to(device)
        with torch.no_grad(), autocast_context(device, amp):
            out.append(reduce(model.encode_text(tokens)))
    return torch.stack(out)


def labelled_image_features(em, cd, split: str, data, opts, label: str | None = None) -> ImageFeatures:
    """Features of a labelled classification split (``cd`` from ``classification_data``) for the
    evaluated model ``em`` with the run options ``opts``; an unlabelled split is an error.
    ``label`` names the cache file (default ``{dataset}-{split}``)."""
    feats = extract_image_features(em.model, cd.dataset, device=opts.device, amp=opts.amp,
                                   batch_size=opts.batch_size, num_workers=opts.num_workers,
                                   progress=opts.progress, cache_dir=opts.cache_dir, model_key=em.info.key,
                                   label=label or f"{cd.name}-{split}")
    if feats.targets is None or (feats.targets < 0).any():
        raise ValueError(f"{data}: split {split!r} has no labels")
    return feats
