"""Shard specs -> shard lists, weights and sample counts (the ``data.train`` syntax).

A spec is one or more sources joined by ``::``; each source is a brace pattern
(``/data/{00000..00009}.tar``), a glob, a folder (its ``*.tar``) or a URL pattern
(:mod:`mmrl.data.remote`: ``pipe:CMD``, ``http(s)://``, ``s3://`` read as ``pipe:aws s3 cp URL -``).
A source's sample counts come from the ``sizes.json`` next to its shards (``{"00000.tar": count}``):
in the local folder, at the URL's parent (``BASE/sizes.json``), or for a ``pipe:`` command next to
the local file or ``s3://``/``http(s)://`` object it reads.
"""
from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from braceexpand import braceexpand

from .remote import DEFAULT_TIMEOUT, check_command, is_remote, read_table, s3_command, shard_home
from .shard_files import check_shards

__all__ = ["ShardSource", "expand_spec", "read_sizes", "parse_sources", "shard_weights"]


@dataclass
class ShardSource:
    """One ``::``-separated source: its shards, weight and per-shard sample counts (None where
    ``sizes.json`` is missing or does not list every shard; ``sizes_note`` then says why)."""

    spec: str
    shards: list[str]
    weight: float = 1.0
    sizes: list[int] | None = None
    sizes_note: str = ""

    @property
    def remote(self) -> bool:
        """Whether its shards are URLs or commands rather than local files."""
        return any(is_remote(s) for s in self.shards)


def expand_spec(spec: str) -> list[str]:
    """The shards of one source, in order (``s3://`` URLs become ``pipe:aws s3 cp URL -``)."""
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    out: list[str] = []
    for item in braceexpand(spec):
        if item.startswith("s3://"):
            out.append(s3_command(item))
        elif not is_remote(item) and any(c in item for c in "*?["):
            out.extend(sorted(glob.glob(item)))
        else:
            out.append(item)
    return out


def read_sizes(shards: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> tuple[list[int] | None, str]:
    """Counts from the ``sizes.json`` next to each shard, or ``(None, why)`` if any is unknown."""
    tables: dict[str, dict | None] = {}
    notes: dict[str, str] = {}
    counts = []
    for shard in shards:
        home = shard_home(shard)
        if home is None:
            return None, f"no sizes.json location known for {shard}"
        folder, name = home
        if folder not in tables:
            try:
                tables[folder] = read_table(folder, timeout)
            except (OSError, ValueError) as err:
                tables[folder], notes[folder] = None, str(err)
        table = tables[folder]
        if table is None:
            return None, notes[folder]
        if name not in table:
            return None, f"{name} is not listed in {folder}/sizes.json"
        counts.append(int(table[name]))
    return counts, ""


def parse_sources(train: str, weights: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> list[ShardSource]:
    """Split ``train`` on ``::``, expand each part, attach weights and sizes (``timeout``: seconds to
    wait for a remote ``sizes.json``)."""
    specs = [s for s in train.split("::")]
    if any(not s.strip() for s in specs):
        raise ValueError(f"empty source in train={train!r}")
    if weights is not None:
        ws = [float(w) for w in str(weights).split("::")]
        if len(ws) != len(specs):
            raise ValueError(f"{len(ws)} weights ({weights!r}) for {len(specs)} sources ({train!r})")
        if any(w < 0 or not math.isfinite(w) for w in ws) or sum(ws) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0: {weights!r}")
    else:
        ws = [1.0] * len(specs)
    sources = []
    for spec, w in zip(specs, ws):
        shards = expand_spec(spec.strip())
        if not shards:
            raise FileNotFoundError(f"no shards match {spec!r}")
        check_command(shards[0], spec.strip())  # a pipe: program that is not installed, in one line
        check_shards(spec.strip(), shards)  # its first shard: a mistyped path or a wrong file, in one line
        sizes, note = read_sizes(shards, timeout)
        sources.append(ShardSource(spec.strip(), shards, w, sizes, note))
    return sources


def shard_weights(sources: Sequence[ShardSource]) -> list[float]:
    """Per-shard draw weights giving each source its weight's share of the samples."""
    out: list[float] = []
    for src in sources:
        total = sum(src.sizes) if src.sizes else 0
        if total > 0:
            out.extend(src.weight * n / total for n in src.sizes)
        else:
            out.extend([src.weight / len(src.shards)] * len(src.shards))
    return out
