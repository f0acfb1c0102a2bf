"""Every distinct caption a training run can draw from its shards, read once up front.

A locked, cached text tower (``cache_text``) computes each caption's features the first time a
batch holds it. With ``data.multi_caption`` a small corpus has many captions per image (the
demo's emoji and glyphs: ~13,000 distinct ones), so for hundreds of steps nearly every batch
brings new ones and the text tower runs on a handful of captions per step -- as much time as the
image tower's step. Reading the captions first lets the trainer compute them all in a few large
batches instead (:meth:`mmrl.model.text_cache.CachedHFTextEncoder.warm`).

Only local shards whose sample counts are known (``sizes.json``) are read, and only when they
hold at most ``max_samples`` samples: for a web-scale corpus the cache fills as it trains.
"""
from __future__ import annotations

from .batching import json_captions, sample_caption
from .shard_specs import parse_sources
from .wds_stages import StreamStats, stream_samples

__all__ = ["shard_captions"]


def shard_captions(train: str, multi_caption: bool, max_samples: int) -> list[str] | None:
    """The distinct captions of the shards in ``train`` (``::``-joined specs), in first-seen
    order: a sample's json ``captions`` with ``multi_caption`` (its ``.txt`` when it has none),
    else its ``.txt``. ``None`` when a source is remote, a shard's size is unknown, or the
    shards hold more than ``max_samples`` samples."""
    sources = parse_sources(train)
    if any(s.remote or s.sizes is None for s in sources) or sum(sum(s.sizes) for s in sources) > max_samples:
        return None
    stats = StreamStats(max_consecutive_bad_samples=10 ** 9, max_consecutive_bad_shards=10 ** 9)
    seen = {}
    for source in sources:
        for sample in stream_samples(source.shards, stats):
            options = json_captions(sample) if multi_caption else []
            if not options:
                text = sample_caption(sample)
                options = [text] if text else []
            for caption in options:
                seen.setdefault(caption, None)
    return list(seen)
