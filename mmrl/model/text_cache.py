"""A locked Hugging Face text tower whose pooled features are computed once per caption.

With ``lock_text=True`` (LiT) the transformer of an ``open_clip`` ``HFTextEncoder`` never
changes, so its pooled output for a given token sequence is a constant: only the projection
trains. :class:`CachedHFTextEncoder` keeps those pooled features in an LRU cache keyed by the
token ids and runs the transformer only for sequences it has not seen (cut to the longest real
caption among them: a 32-token context holds ~14-token emoji captions), which removes the text
tower's cost from every epoch after the first.

It holds the same submodules under the same names (``transformer``, ``pooler``, ``proj``), so
the model's state dict -- and therefore ``mmrl.save_model`` / ``mmrl.load_model`` -- is
unchanged; a loaded model simply runs the plain encoder.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..progress import progress as progress_bar

__all__ = ["CachedHFTextEncoder", "enable_text_cache"]


class CachedHFTextEncoder(nn.Module):
    def __init__(self, encoder: nn.Module, max_entries: int = 200_000):
        super().__init__()
        if any(p.requires_grad for p in encoder.transformer.parameters()):
            raise ValueError("text feature caching needs a locked text tower (lock_text=True)")
        self.transformer = encoder.transformer
        self.pooler = encoder.pooler
        self.proj = encoder.proj
        self.config = encoder.config
        self.output_tokens = False
        self.output_dim = encoder.output_dim
        self.vocab_size = encoder.vocab_size
        self.context_length = encoder.context_length
        self.max_entries = max_entries
        self.hits = self.misses = 0
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled (pre-projection) features of ``tokens`` ``[B, ctx]``, from the cache where possible."""
        keys = [row.tobytes() for row in tokens.detach().cpu().numpy()]
        store = self.training  # in eval mode (evaluation during training) the cache is read, never changed
        fresh: dict[bytes, torch.Tensor] = {}
        first_seen = {}
        for i, k in enumerate(keys):
            if k not in self._cache:
                first_seen.setdefault(k, i)
        missing = list(first_seen.values())  # each new caption computed once, even if repeated
        if missing:
            rows = tokens[missing]
            mask = (rows != self.config.pad_token_id).long()
            # trailing columns that are padding in every row change nothing (masked out of
            # attention and pooling) but cost compute: run the longest real caption's length
            used = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1
            rows, mask = rows[:, :used], mask[:, :used]
            was_training = self.transformer.training
            self.transformer.eval()  # a frozen tower gives one feature per caption: no dropout
            try:
                with torch.no_grad():
                    out = self.transformer(input_ids=rows, attention_mask=mask)
                    feats = self.pooler(out, mask).detach()
            finally:
                self.transformer.train(was_training)
            for i, f in zip(missing, feats):
                fresh[keys[i]] = f
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if not store:
            return torch.stack([fresh[k] if k in fresh else self._cache[k] for k in keys]).to(tokens.device)
        self._cache.update(fresh)
        for k in keys:
            self._cache.move_to_end(k)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return torch.stack([self._cache[k] for k in keys]).to(tokens.device)

    def warm(self, tokens: torch.Tensor, batch_size: int = 256, progress: bool = False) -> int:
        """Compute and cache the pooled features of every row of ``tokens`` ``[N, ctx]`` that is
        not cached yet, in batches of ``batch_size`` rows of similar length (little padding to
        run). Returns how many were computed. Counts as neither hits nor misses."""
        keys = {row.tobytes(): i for i, row in enumerate(tokens.detach().cpu().numpy())}
        todo = [i for k, i in keys.items() if k not in self._cache]
        if len(self._cache) + len(todo) > self.max_entries:
            todo = todo[: max(0, self.max_entries - len(self._cache))]  # never evict to warm
        lengths = (tokens[todo] != self.config.pad_token_id).sum(dim=1).tolist() if todo else []
        order = [i for _, i in sorted(zip(lengths, todo))]
        hits, misses = self.hits, self.misses
        chunks = range(0, len(order), batch_size)
        bar = progress_bar(chunks, desc="text features", unit="batch", enabled=progress, mininterval=1.0)
        for start in bar:
            self.pooled(tokens[order[start:start + batch_size]])
        self.hits, self.misses = hits, misses
        return len(order)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pooled(tokens).to(self.proj_dtype()))

    def proj_dtype(self) -> torch.dtype:
        return next(self.proj.parameters()).dtype

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True):
        if unlocked_layers:
            raise ValueError("a cached text tower stays fully locked")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        pass  # nothing to checkpoint: the transformer runs without gradients


def enable_text_cache(model: nn.Module, max_entries: int = 200_000) -> nn.Module:
    """Swap ``model.text`` (a locked open_clip ``HFTextEncoder``) for its cached twin, in place."""
    text = getattr(model, "text", None)
    if text is None or not hasattr(text, "transformer") or not hasattr(text, "pooler"):
        raise ValueError("text feature caching needs a Hugging Face text tower (e.g. mmrl-vit-tiny-p8-64-minilm)")
    if not isinstance(text, CachedHFTextEncoder):
        model.text = CachedHFTextEncoder(text, max_entries)
    return model
