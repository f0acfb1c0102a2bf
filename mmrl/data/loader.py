"""The training data loader: img2dataset-style webdataset shards -> batches for the trainer.

Usage::

    cfg = LoaderConfig(train="/data/cc3m/{00000..00331}.tar", batch_size=256, workers=8)
    loader = make_train_loader(cfg, preprocess_train, tokenizer, rank=rank, world_size=world)
    for epoch in range(loader.epoch, epochs):
        for batch in loader:   # the rest of the current epoch, then the loader moves to the next
            batch["image"], batch["text"]   # [B, 3, H, W] float32, [B, ctx] int64
        log(loader.skipped)                # {"bad_image": 3, "no_caption": 1, "bad_shards": 0, ...}

Sources
    ``train`` is one or more shard specs joined by ``::`` -- brace patterns
    (``/data/{00000..00009}.tar``), globs, folders (their ``*.tar``) or URL patterns
    (``pipe:CMD``, ``http(s)://``, ``s3://``; :mod:`mmrl.data.remote`), whose reads wait at most
    ``stream_timeout`` seconds for data. ``weights`` (``"1::3"``) gives each source's expected share of the
    *samples* drawn (resampled mode only): a shard's draw probability is its source's weight
    times its share of the source's samples (from ``sizes.json``; equal shares without one).
    Without weights every shard is equally likely.
    (open_clip's ``--train-data-upsampling-factors`` instead multiplies every shard's weight,
    so there a source's share also grows with its shard count.)

Epoch length
    ``num_samples`` when set, else the sum over the listed shards of ``sizes.json`` (read next to
    each source's shards, a URL's at its parent: ``{"00000.tar": count, ...}``). As in open_clip, an epoch is
    ``num_batches = ceil(num_samples / (batch_size * world_size))`` per rank, rounded up to a
    multiple of the worker count so every worker and every rank delivers the same number of
    batches (DDP hangs otherwise); ``num_samples`` is then recomputed from it.

Modes
    *epoch* (``resampled=False``): each epoch shuffles the shard list (same order on all ranks,
    seeded by ``(seed, epoch)``), splits it by rank then by worker, and shuffles samples in a
    buffer. A worker that runs out of shards before its batch count starts another pass over
    its shards. Fewer shards than ``world_size * workers`` is a ValueError up front.

    *resampled*: shards are drawn with replacement (weighted) forever, from a generator seeded
    by ``(seed, rank, stream, segment)``. ``num_samples`` only sets the epoch length.

Determinism and resume
    The batch at global step ``g`` (counted per rank from the start of training) is built by
    logical stream ``g % W`` (``W = max(1, workers)``) as its ``g // W``-th batch. A stream is
    reseeded at every *segment* boundary: every epoch in epoch mode, every
    ``resample_segment`` batches per stream in resampled mode (the shuffle buffer starts
    empty there). ``make_train_loader(..., start_step=S)`` makes each worker open its
    stream's segment and replay -- decode but not tokenize or collate -- the batches of the
    segment before ``S``, so the batches from step ``S`` on are exactly those an
    uninterrupted run would have produced (same seed, world size and worker count). A replay
    costs at most one segment of decoding per worker; start steps that are multiples of
    ``resample_segment * W`` replay nothing.

Bad data
    Samples without an image, with an empty or missing caption, or with an undecodable image
    are skipped and counted; unreadable or truncated tars are counted in ``bad_shards`` and
    their readable part is used. Counts travel with the batches (each carries its worker's
    counts since its previous batch) and accumulate in :attr:`TrainLoader.skipped`. A run of
    ``max_consecutive_bad_samples`` unusable samples or ``max_consecutive_bad_shards`` empty
    shards raises :class:`~mmrl.data.wds_stages.LoaderStallError` naming the shards.
"""
from __future__ import annotations

import itertools
import logging
import math
import multiprocessing as mp
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batching import BatchBuilder, ImagePlan, plan_transform
from .remote import DEFAULT_TIMEOUT
from .shard_files import check_shards
from .shard_specs import ShardSource, parse_sources, shard_weights
from .wds_stages import (
    SAMPLE_SKIP_REASONS,
    LoaderStallError,
    StreamStats,
    derive_seed,
    epoch_passes,
    group_samples,
    one_line_stalls,
    resampled_shards,
    shuffle_samples,
    stream_samples,
)

log = logging.getLogger(__name__)

__all__ = [
    "LoaderConfig", "TrainLoader", "make_train_loader", "ShardSource", "parse_sources", "shard_weights", "epoch_sizing",
    "epoch_bounds", "leave_stop_signals_to_the_trainer",
    "LoaderStallError",
]


@dataclass
class LoaderConfig:
    """Training-loader settings (see the module docstring for the semantics)."""

    train: str                              # shard specs joined by "::"
    batch_size: int                         # per rank
    weights: str | None = None           # per-source sample shares, "1::3" (resampled only)
    resampled: bool = False                 # sample shards with replacement (infinite stream)
    num_samples: int | None = None       # epoch length; default: sum of sizes.json
    workers: int = 4                        # DataLoader worker processes per rank (0: in-process)
    seed: int = 0
    shuffle_buffer: int = 5000              # sample shuffle buffer (raw samples), 0/1 = off
    shuffle_initial: int = 1000             # samples buffered before the first one is emitted
    resample_segment: int = 128             # resampled: batches per stream between reseeds
    round_up: bool = True                   # num_batches = ceil (True) or floor of samples/global batch
    multi_caption: bool = False             # draw one of json["captions"] instead of txt
    group_key: str | None = None         # json field naming a sample's group: batches carry "group" ids
    group_size: int = 1                     # > 1: emit samples of one group together, this many at a time
    group_max_pending: int = 4096           # groups held back at most before the oldest goes out incomplete
    group_shared_aug: bool = False          # samples of one group in a batch get the same random augmentation
    fast_resize: bool = True                # torch uint8 resize/crop for torchvision geometry
    draft: bool = True                      # reduced-scale JPEG decoding when larger than the input
    image_size: int | None = None        # draft size for transforms whose geometry is unknown
    max_consecutive_bad_samples: int = 1000
    max_consecutive_bad_shards: int = 32
    prefetch_factor: int = 2
    pin_memory: bool = False
    timeout: float = 0.0                    # > 0: error when a worker delivers no batch for this long (s)
    stream_timeout: float = DEFAULT_TIMEOUT  # remote shards: a read waiting this long for data fails the shard (s)


# --------------------------------------------------------------------------------------------
# sources and sizing
# --------------------------------------------------------------------------------------------
def epoch_bounds(step: int, epoch: int, num_batches: int) -> tuple[int, int]:
    """``(epoch, stop)`` of an iteration starting at ``step``: ``epoch``, or the one ``step`` lies in
    once ``step`` is past ``epoch``'s end, and the step that ends it (the loaders' epoch contract)."""
    stop = (epoch + 1) * num_batches
    if step >= stop:
        epoch = step // num_batches
        stop = (epoch + 1) * num_batches
    return epoch, stop


def epoch_sizing(num_samples: int, batch_size: int, world_size: int, workers: int,
                 round_up: bool = True) -> tuple[int, int]:
    """open_clip's epoch arithmetic -> ``(num_batches per rank, num_samples)``."""
    rnd = math.ceil if round_up else math.floor
    global_batch = batch_size * world_size
    num_batches = rnd(num_samples / global_batch)
    per_worker = rnd(num_batches / max(1, workers))
    num_batches = per_worker * max(1, workers)
    if num_batches <= 0:
        raise ValueError(f"an epoch of {num_samples} samples makes no full batch of {batch_size} x {world_size} "
                         f"ranks x {max(1, workers)} workers; lower batch_size or workers, or use more data")
    return num_batches, num_batches * global_batch


# --------------------------------------------------------------------------------------------
# the per-worker stream
# --------------------------------------------------------------------------------------------
class TrainStream(IterableDataset):
    """Yields the batches of global steps ``start + w, start + w + W, ... < stop`` in worker
    ``w`` (``start``/``stop`` are read from shared memory at each ``iter``, so persistent
    workers follow the main process from epoch to epoch)."""

    def __init__(self, cfg: LoaderConfig, shards: list[str], weights: list[float] | None, plan: ImagePlan,
                 tokenizer: Callable, *, rank: int, world_size: int, num_batches: int, window):
        super().__init__()
        self.cfg, self.shards, self.weights, self.plan, self.tokenizer = cfg, shards, weights, plan, tokenizer
        self.rank, self.world_size, self.num_batches = rank, world_size, num_batches
        self.num_streams = max(1, cfg.workers)
        self.window = window  # shared int64[2]: start and stop step of the current iteration

    def segment(self, step: int) -> tuple[int, int, int]:
        """``(segment id, index of step's batch in its segment, first step after the segment)``."""
        W = self.num_streams
        if self.cfg.resampled:
            seg_len = max(1, self.cfg.resample_segment)
            local = step // W
            seg = local // seg_len
            return seg, local % seg_len, (seg + 1) * seg_len * W
        seg = step // self.num_batches
        return seg, (step % self.num_batches) // W, (seg + 1) * self.num_batches

    def open_segment(self, stream: int, seg: int, stats: StreamStats) -> Iterator[dict]:
        """Raw shuffled samples of one segment of one stream (endless); with ``group_size > 1``
        grouped after the shuffle (per pass in epoch mode, so an epoch still sees every sample
        once)."""
        cfg = self.cfg
        rng = random.Random(derive_seed(cfg.seed, "sample-shuffle", cfg.resampled, seg, self.rank, stream))

        def shuffled_and_grouped(samples: Iterator[dict]) -> Iterator[dict]:
            samples = shuffle_samples(samples, cfg.shuffle_buffer, cfg.shuffle_initial, rng)
            if cfg.group_key and cfg.group_size > 1:
                samples = group_samples(samples, cfg.group_key, cfg.group_size, cfg.group_max_pending)
            return samples

        if cfg.resampled:
            urls = resampled_shards(self.shards, self.weights, seed=cfg.seed, rank=self.rank, stream=stream,
                                    segment=seg)
            return shuffled_and_grouped(stream_samples(urls, stats, cfg.stream_timeout))
        # epoch mode: the buffers drain at the end of each pass, so a pass is a permutation
        passes = epoch_passes(self.shards, seed=cfg.seed, epoch=seg, rank=self.rank, world_size=self.world_size,
                              stream=stream, num_streams=self.num_streams)
        return itertools.chain.from_iterable(shuffled_and_grouped(stream_samples(urls, stats, cfg.stream_timeout))
                                             for urls in passes)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        start, stop = int(self.window[0]), int(self.window[1])
        cfg = self.cfg
        stats = StreamStats(cfg.max_consecutive_bad_samples, cfg.max_consecutive_bad_shards)
        builder = BatchBuilder(self.plan, self.tokenizer, cfg.batch_size, seed=cfg.seed, rank=self.rank,
                               stats=stats, multi_caption=cfg.multi_caption, shared=info is not None,
                               group_key=cfg.group_key, group_shared_aug=cfg.group_shared_aug)
        step = start + worker
        while step < stop:
            seg, index, seg_end = self.segment(step)
            stream = step % self.num_streams
            samples = self.open_segment(stream, seg, stats)
            first = step - index * self.num_streams
            for replay in range(first, step, self.num_streams):
                builder.skip_batch(samples, replay)
            while step < min(stop, seg_end):
                yield builder.build(samples, step)
                step += self.num_streams


# --------------------------------------------------------------------------------------------
# the loader the trainer uses
# --------------------------------------------------------------------------------------------
def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A loader worker ignores SIGTERM and SIGINT: SLURM (scancel, a time limit, preemption) and torchrun's
    teardown signal every process of a task, and a worker ended by them would fail the trainer's next batch
    before it can save its checkpoint. The trainer stops on the signal and ends its workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainLoader:
    """Iterable over the training batches of one rank (format: :class:`BatchBuilder`).

    Each ``iter()`` yields the batches from the current position (:attr:`step`) to the end of
    the current epoch, then moves to the next epoch. Attributes: ``num_batches`` (per epoch,
    per rank), ``num_samples`` (per epoch, all ranks, after rounding), ``dataset_size``
    (before rounding), ``num_shards``, ``epoch``, ``step`` (next global step), ``skipped``
    (cumulative counts by reason; ``bad_shards`` counts shards), ``num_skipped`` (samples).
    """

    def __init__(self, cfg: LoaderConfig, stream: TrainStream, *, num_batches: int, num_samples: int,
                 dataset_size: int, num_shards: int, start_step: int, window):
        self.cfg, self.stream = cfg, stream
        self.num_batches, self.num_samples, self.dataset_size = num_batches, num_samples, dataset_size
        self.num_shards = num_shards
        self.step = start_step
        self.epoch = start_step // num_batches
        self.skipped: dict[str, int] = {k: 0 for k in SAMPLE_SKIP_REASONS + ("bad_shards",)}
        self._window = window
        kwargs = dict(batch_size=None, shuffle=False, num_workers=cfg.workers, pin_memory=cfg.pin_memory)
        if cfg.workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=cfg.prefetch_factor, timeout=cfg.timeout,
                          worker_init_fn=leave_stop_signals_to_the_trainer)
        self.dataloader = DataLoader(stream, **kwargs)

    @property
    def num_skipped(self) -> int:
        return sum(v for k, v in self.skipped.items() if k != "bad_shards")

    @property
    def plan(self) -> ImagePlan:
        return self.stream.plan

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Position at the start of ``epoch`` (no-op when already inside it, so a loader made
        with a mid-epoch ``start_step`` keeps its position)."""
        if epoch != self.epoch:
            self.epoch, self.step = epoch, epoch * self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epoch, stop = epoch_bounds(self.step, self.epoch, self.num_batches)
        self._window[0], self._window[1] = self.step, stop
        for batch in one_line_stalls(self.dataloader):
            if batch["step"] != self.step:  # the DataLoader's round-robin order is the contract
                raise RuntimeError(f"loader out of order: expected step {self.step}, got {batch['step']}")
            for reason, n in batch["skipped"].items():
                self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
            for note in batch.pop("notes", ()):  # a worker's first shard errors
                log.warning(note)
            self.step += 1
            yield batch
        if self.step >= stop:
            self.epoch += 1

    def close(self) -> None:
        """Shut down the worker processes (they also stop when the loader is garbage-collected)."""
        it = getattr(self.dataloader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.dataloader._iterator = None


def make_train_loader(cfg: LoaderConfig, preprocess: Callable, tokenizer: Callable[[list[str]], torch.Tensor], *,
                      rank: int = 0, world_size: int = 1, epoch: int = 0, start_step: int = 0) -> TrainLoader:
    """Build the training loader of ``rank`` positioned at ``start_step`` if given (> 0), else
    at the start of ``epoch``. ``preprocess``: image transform (PIL -> Tensor[3, H, W]);
    ``tokenizer``: ``list[str] -> LongTensor[B, ctx]``."""
    if cfg.batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {cfg.batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if cfg.workers < 0:
        raise ValueError(f"workers must be >= 0, got {cfg.workers}")
    if not 0 < cfg.stream_timeout < float("inf"):
        raise ValueError(f"stream_timeout must be a positive number of seconds, got {cfg.stream_timeout}")
    sources = parse_sources(cfg.train, cfg.weights, timeout=cfg.stream_timeout)
    if cfg.weights is not None and not cfg.resampled:
        raise ValueError("per-source weights need resampled=True (epoch mode reads every shard once)")
    shards = [s for src in sources for s in src.shards]
    num_streams = max(1, cfg.workers)
    if not cfg.resampled and len(shards) < world_size * num_streams:
        raise ValueError(f"epoch mode needs at least one shard per data-loading worker: {len(shards)} shards < "
                         f"{world_size} ranks x {num_streams} workers = {world_size * num_streams}; "
                         f"use fewer workers, more shards or resampled=True")
    if cfg.num_samples is not None:
        dataset_size = int(cfg.num_samples)
    else:
        missing = [src for src in sources if src.sizes is None]
        for src in missing:
            check_shards(src.spec, src.shards, every=True)  # missing or invalid files, named, before sizes.json
        if missing:
            raise ValueError(f"epoch length unknown: no sizes.json listing every shard of {[s.spec for s in missing]} "
                             f"({missing[0].sizes_note}); set num_samples (data.num_samples in a train config), or "
                             f"write sizes.json next to the shards (mmrl shard check FOLDER)")
        dataset_size = sum(sum(src.sizes) for src in sources)
    num_batches, num_samples = epoch_sizing(dataset_size, cfg.batch_size, world_size, cfg.workers, cfg.round_up)
    start = int(start_step) if start_step else int(epoch) * num_batches
    if start_step and epoch and start_step // num_batches != epoch:
        raise ValueError(f"start_step {start_step} is in epoch {start_step // num_batches}, not {epoch}")
    plan = plan_transform(preprocess, fast_resize=cfg.fast_resize, image_size=cfg.image_size, draft=cfg.draft)
    weights = shard_weights(sources) if cfg.resampled and cfg.weights is not None else None  # None: uniform
    window = mp.Array("q", [start, start + num_batches], lock=False)
    stream = TrainStream(cfg, shards, weights, plan, tokenizer, rank=rank, world_size=world_size,
                         num_batches=num_batches, window=window)
    return TrainLoader(cfg, stream, num_batches=num_batches, num_samples=num_samples, dataset_size=dataset_size,
                       num_shards=len(shards), start_step=start, window=window)
