"""The held-out validation set of ``mmrl train`` (``eval.val_data``) and its metrics.

The *fixed set* is the first ``val_samples`` samples that have an image and a caption (``txt``,
else the first of the json ``captions``), read from the shards in the order their spec lists them
-- no shuffling, no resampling, no augmentation (the model's eval transform). It is cut into
global batches of ``val_batch_size``; batch ``b`` is evaluated by rank ``b % world_size``. Each
batch gives the contrastive loss (the training loss kind, over that batch alone) and in-batch
R@1 both ways (an image's top-scoring caption in the batch is its own; a caption's top image).
Per-batch sums are all-reduced, so the metrics are those of the same batches on any world size,
up to float summation order. An image that does not decode is left out of its batch and counted
(``val_skipped``) -- alike on every world size, since the set is defined before decoding.

Under ZeRO-3 every forward gathers parameters with a collective: ``lockstep=True`` makes every
rank run the same number of forwards (a one-sample dummy where it has no batch left).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from PIL import Image

from ..data.batching import IMAGE_KEYS, decode_image, json_captions, sample_caption
from ..data.loader import parse_sources
from ..data.remote import DEFAULT_TIMEOUT
from ..data.wds_stages import StreamStats, stream_samples

__all__ = ["ValBatch", "FixedSet", "val_shards", "sample_text", "val_metrics"]


def val_shards(spec: str) -> list[str]:
    """The shards of ``spec`` in order (``::`` joins sources); a missing first shard is one line."""
    return [shard for source in parse_sources(spec) for shard in source.shards]


def sample_text(sample: dict) -> str | None:
    """A raw sample's caption: its ``txt``, else the first of its json ``captions`` (None: neither)."""
    text = sample_caption(sample)
    if text is not None:
        return text
    captions = json_captions(sample)
    return captions[0] if captions else None


@dataclass
class ValBatch:
    index: int                   # global batch number
    images: torch.Tensor | None  # [n, 3, H, W] (None: no image of the batch decoded)
    texts: torch.Tensor | None   # [n, ctx]
    skipped: int = 0             # samples of the batch whose image did not decode


class FixedSet:
    """This rank's batches of the fixed set (iterate once per evaluation); ``size`` is the number of
    samples the set had (fewer than ``num_samples`` when the shards hold fewer), known after iterating."""

    def __init__(self, shards: list[str], num_samples: int, batch_size: int, preprocess: Callable,
                 tokenizer: Callable, rank: int = 0, world_size: int = 1, timeout: float = DEFAULT_TIMEOUT):
        self.shards, self.num_samples, self.batch_size = shards, num_samples, batch_size
        self.timeout = timeout  # seconds without data before a remote shard counts as broken (data.stream_timeout_s)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.rank, self.world_size = rank, world_size
        self.size = 0

    def num_batches(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[ValBatch]:
        stats = StreamStats(max_consecutive_bad_samples=1 << 30, max_consecutive_bad_shards=len(self.shards) + 1)
        count, current, images, texts, skipped = 0, None, [], [], 0
        for sample in stream_samples(self.shards, stats, self.timeout):
            if count >= self.num_samples:
                break
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            text = sample_text(sample)
            if key is None or text is None:
                continue  # not a sample of the set
            batch = count // self.batch_size
            count += 1
            if batch % self.world_size != self.rank:
                continue
            if batch != current:
                if current is not None:
                    yield self._batch(current, images, texts, skipped)
                current, images, texts, skipped = batch, [], [], 0
            try:
                images.append(self.preprocess(decode_image(sample[key])))
            except Exception:  # noqa: BLE001 - an undecodable image is left out and counted
                skipped += 1
                continue
            texts.append(text)
        if current is not None:
            yield self._batch(current, images, texts, skipped)
        self.size = count

    def _batch(self, index: int, images: list, texts: list[str], skipped: int) -> ValBatch:
        if not images:
            return ValBatch(index, None, None, skipped)
        return ValBatch(index, torch.stack(images), self.tokenizer(texts), skipped)

    def dummy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One blank image and an empty caption: a forward that only keeps collectives in step."""
        image = self.preprocess(Image.new("RGB", (64, 64)))
        return image.unsqueeze(0), self.tokenizer([""])


def _batch_sums(loss_fn, kind: str, image_f, text_f, scale, bias) -> list[float]:
    """[loss x n, image->text hits, text->image hits, n] of one batch."""
    image_f, text_f, scale = image_f.float(), text_f.float(), scale.float()
    if kind == "siglip":
        loss = loss_fn(image_f, text_f, scale, bias.float())
    else:
        loss = loss_fn(image_f, text_f, scale)
    sims = image_f @ text_f.T
    target = torch.arange(len(sims), device=sims.device)
    i2t = (sims.argmax(dim=1) == target).sum()
    t2i = (sims.argmax(dim=0) == target).sum()
    n = len(sims)
    return [float(loss) * n, float(i2t), float(t2i), float(n)]


def val_metrics(forward: Callable, fixed: FixedSet, loss_fn, kind: str, device, lockstep: bool) -> dict[str, float]:
    """Validation loss and R@1 over the fixed set (a collective when distributed: call on all ranks).

    ``forward(images, texts)`` -> (normalised image features, text features, scale, bias), as the
    training step's engine call; run under ``torch.no_grad`` by the caller."""
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss x n, i2t hits, t2i hits, n, skipped
    forwards = 0
    for batch in fixed:
        sums[4] += batch.skipped
        if batch.images is None:
            if lockstep:
                forward(*fixed.dummy())
                forwards += 1
            continue
        terms = _batch_sums(loss_fn, kind, *forward(batch.images, batch.texts))
        forwards += 1
        for i, v in enumerate(terms):
            sums[i] += v
    rounds = math.ceil(fixed.num_batches() / fixed.world_size)
    while lockstep and forwards < rounds:
        forward(*fixed.dummy())
        forwards += 1
    total = torch.tensor(sums, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    loss_n, i2t, t2i, n, skipped = total.tolist()
    n_eval = max(n, 1.0)
    return {"eval/val_loss": loss_n / n_eval if n else float("nan"), "eval/val_i2t_r1": i2t / n_eval,
            "eval/val_t2i_r1": t2i / n_eval, "eval/val_samples": int(n), "eval/val_skipped": int(skipped)}
