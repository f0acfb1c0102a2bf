"""Synthetic training batches: random images and token ids, no shards read (``data.synthetic``).

Like open_clip's ``--dataset-type synthetic``, this measures the speed of the model and the
engine without any data loading. :func:`make_synthetic_loader` takes the arguments of
:func:`mmrl.data.loader.make_train_loader` and returns a :class:`SyntheticLoader` with the
same contract as :class:`~mmrl.data.loader.TrainLoader`: each ``iter()`` yields the batches
from :attr:`~SyntheticLoader.step` to the end of the epoch, in the same format (``image``,
``text``, ``key``, ``step``, ``skipped``, and ``group`` when ``group_key`` is set).

What a batch holds
    ``image``: standard-normal values (the range of normalised images) of the shape and
    dtype the ``preprocess`` transform gives (it is run once, on a blank image).
    ``text``: token rows laid out as the tokenizer lays out a caption -- its start token
    when it has one, 1 to ``ctx - 2`` ids drawn from the tokenizer's vocabulary without its
    special tokens, its end token, then padding (a tokenizer whose vocabulary size cannot be
    read gives one fixed caption, as open_clip does). ``key``: ``"synthetic/{rank}/{step}/{i}"``;
    ``skipped``: ``{}`` (nothing skipped). ``group`` (with ``group_key``): ids shared by ``group_size``
    consecutive samples, distinct across ranks.

Cost
    Each rank draws one pool of ``batch_size + min(max(batch_size, 64), 256)`` image/text rows once
    (seeded by ``(seed, rank)``); the batch of step ``s`` is the contiguous window of
    ``batch_size`` rows at an offset drawn from ``(seed, rank, s)``. A batch is therefore a
    *view* of the pool -- no copy, no random draw per step -- and must not be modified in
    place. The pool is pinned when CUDA is available, so host-to-device copies can overlap.
    Everything runs in the main process; ``workers`` is ignored.

Determinism
    A batch depends only on ``(seed, rank, step)``: ``start_step`` resumes exactly and ranks
    get different data.

Epoch length
    ``num_samples`` when set, else :data:`SYNTHETIC_NUM_SAMPLES`; ``num_batches`` =
    ``ceil(num_samples / (batch_size * world_size))`` (no rounding to a worker count).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image

from .loader import LoaderConfig, epoch_bounds, epoch_sizing
from .wds_stages import SAMPLE_SKIP_REASONS, derive_seed

log = logging.getLogger(__name__)

__all__ = ["SyntheticLoader", "make_synthetic_loader", "SYNTHETIC_NUM_SAMPLES"]

SYNTHETIC_NUM_SAMPLES = 1_000_000     # epoch length when num_samples is not set
MIN_EXTRA_ROWS, MAX_EXTRA_ROWS = 64, 256  # pool rows beyond one batch (distinct windows - 1)
TEMPLATE_CAPTION = "a photo of a synthetic image"


def _vocab_size(tokenizer) -> int | None:
    for obj in (tokenizer, getattr(tokenizer, "tokenizer", None)):  # open_clip's own, or an HF tokenizer inside
        size = getattr(obj, "vocab_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None


def _special_ids(tokenizer) -> set[int]:
    ids: set[int] = set()
    for obj in (tokenizer, getattr(tokenizer, "tokenizer", None)):
        ids.update(int(i) for i in (getattr(obj, "all_special_ids", None) or ()))
    return ids


def random_token_rows(tokenizer: Callable[[list[str]], torch.Tensor], rows: int,
                      generator: torch.Generator) -> torch.Tensor:
    """``rows`` random captions laid out like ``tokenizer``'s output (see the module docstring)."""
    template = tokenizer([TEMPLATE_CAPTION])[0]
    ctx = template.numel()
    vocab = _vocab_size(tokenizer)
    pad = int(template[-1])
    used = int((template != pad).sum())  # the template's tokens, start and end included
    if vocab is None or ctx < 3 or used >= ctx:
        log.warning("synthetic data: the tokenizer's vocabulary size is unknown; every caption is %r",
                    TEMPLATE_CAPTION)
        return template.expand(rows, ctx).clone()
    specials = _special_ids(tokenizer) | {pad}
    start = int(template[0]) if int(template[0]) in specials else None
    end = int(template[used - 1]) if int(template[used - 1]) in specials else None
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[i for i in specials | {start, end} if i is not None and 0 <= i < vocab]] = False
    table = allowed.nonzero().flatten()
    first = 1 if start is not None else 0
    room = ctx - first - (1 if end is not None else 0)          # content tokens that fit
    lengths = torch.randint(1, room + 1, (rows, 1), generator=generator)
    pos = torch.arange(ctx).unsqueeze(0)
    content = table[torch.randint(len(table), (rows, ctx), generator=generator)]
    out = torch.full((rows, ctx), pad, dtype=template.dtype)
    out = torch.where((pos >= first) & (pos < first + lengths), content.to(template.dtype), out)
    if start is not None:
        out[:, 0] = start
    if end is not None:
        out = torch.where(pos == first + lengths, torch.tensor(end, dtype=template.dtype), out)
    return out


def _image_row(preprocess: Callable, image_size: int | None) -> torch.Tensor:
    """One preprocessed blank image: the shape and dtype of a real batch row."""
    side = image_size or 256
    row = preprocess(Image.new("RGB", (side, side), (128, 128, 128)))
    if not isinstance(row, torch.Tensor) or row.ndim != 3:
        raise ValueError(f"synthetic data: the image transform must give a [C, H, W] tensor, got {type(row).__name__}")
    return row


class SyntheticLoader:
    """Iterable over the synthetic batches of one rank; the interface of
    :class:`~mmrl.data.loader.TrainLoader` (``num_batches``, ``num_samples``, ``dataset_size``,
    ``num_shards`` = 0, ``epoch``, ``step``, ``skipped``, ``num_skipped``, ``set_epoch``,
    ``close``)."""

    def __init__(self, cfg: LoaderConfig, images: torch.Tensor, texts: torch.Tensor, *, rank: int,
                 num_batches: int, num_samples: int, dataset_size: int, start_step: int):
        self.cfg, self.rank = cfg, rank
        self.images, self.texts = images, texts
        self.batch_size = int(cfg.batch_size)
        self.num_batches, self.num_samples, self.dataset_size = num_batches, num_samples, dataset_size
        self.num_shards = 0
        self.step = start_step
        self.epoch = start_step // num_batches
        self.skipped: dict[str, int] = {k: 0 for k in SAMPLE_SKIP_REASONS + ("bad_shards",)}
        self.groups = None
        if cfg.group_key:
            rows = torch.arange(images.shape[0], dtype=torch.long)
            self.groups = (rank << 32) + rows // max(1, cfg.group_size)

    @property
    def num_skipped(self) -> int:
        return sum(v for k, v in self.skipped.items() if k != "bad_shards")

    def __len__(self) -> int:
        return self.num_batches

    def offset(self, step: int) -> int:
        """First pool row of ``step``'s batch."""
        windows = self.images.shape[0] - self.batch_size + 1
        return derive_seed(self.cfg.seed, "synthetic-window", self.rank, step) % windows

    def batch(self, step: int) -> dict[str, Any]:
        """The batch of global step ``step`` on this rank (views of the pool)."""
        lo = self.offset(step)
        hi = lo + self.batch_size
        out = {"image": self.images[lo:hi], "text": self.texts[lo:hi],
               "key": [f"synthetic/{self.rank}/{step}/{i}" for i in range(self.batch_size)],
               "step": step, "skipped": {}}  # as a real batch without skips
        if self.groups is not None:
            out["group"] = self.groups[lo:hi]
        return out

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.step = epoch, epoch * self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epoch, stop = epoch_bounds(self.step, self.epoch, self.num_batches)
        while self.step < stop:
            batch = self.batch(self.step)
            self.step += 1
            yield batch
        self.epoch += 1

    def close(self) -> None:
        """Nothing to shut down (no worker processes)."""


def make_synthetic_loader(cfg: LoaderConfig, preprocess: Callable, tokenizer: Callable[[list[str]], torch.Tensor], *,
                          rank: int = 0, world_size: int = 1, epoch: int = 0, start_step: int = 0) -> SyntheticLoader:
    """:func:`~mmrl.data.loader.make_train_loader`'s signature; ``cfg.train``, ``weights``,
    ``resampled``, ``workers`` and the shuffle settings are ignored."""
    if cfg.batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {cfg.batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    dataset_size = int(cfg.num_samples) if cfg.num_samples is not None else SYNTHETIC_NUM_SAMPLES
    if dataset_size <= 0:
        raise ValueError(f"num_samples must be positive, got {dataset_size}")
    num_batches, num_samples = epoch_sizing(dataset_size, cfg.batch_size, world_size, 1, cfg.round_up)
    start = int(start_step) if start_step else int(epoch) * num_batches
    if start_step and epoch and start_step // num_batches != epoch:
        raise ValueError(f"start_step {start_step} is in epoch {start_step // num_batches}, not {epoch}")
    rows = cfg.batch_size + min(max(cfg.batch_size, MIN_EXTRA_ROWS), MAX_EXTRA_ROWS)
    row = _image_row(preprocess, cfg.image_size)
    dtype = row.dtype if row.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "synthetic-pool", rank))
    images = torch.randn((rows, *row.shape), generator=gen, dtype=dtype)
    texts = random_token_rows(tokenizer, rows, gen)
    if torch.cuda.is_available():
        try:
            images, texts = images.pin_memory(), texts.pin_memory()
        except RuntimeError as err:  # no usable driver after all: pageable memory works too
            log.debug("synthetic data: pool not pinned (%s)", err)
    return SyntheticLoader(cfg, images, texts, rank=rank, num_batches=num_batches, num_samples=num_samples,
                           dataset_size=dataset_size, start_step=start)
