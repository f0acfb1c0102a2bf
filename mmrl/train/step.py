"""One optimizer step of contrastive training on a DeepSpeed engine.

With ``grad_accum > 1`` micro-batches, the loss still sees the whole accumulated batch as
negatives (open_clip's scheme): every micro-batch is first encoded without gradients, then each
is re-encoded with gradients and the loss over the full batch -- its own features live, the
others cached -- is back-propagated without DeepSpeed's 1/grad_accum scaling. The sum of these
gradients is exactly the gradient of the full-batch loss (the temperature's gradient is taken
once, in the first micro-step), so ``grad_accum=2`` with batch B updates the parameters like
batch 2B. The cost is one extra no-grad forward per micro-batch.

Before any backward, the ranks agree through one all-reduce on (a) whether the loss is
non-finite on any rank -- then the step is skipped on all of them, keeping DeepSpeed's
counters and the ranks in step -- and (b) whether a stop was requested anywhere.

With ``seed`` (random ops in the forward: patch dropout) torch's generator is seeded with
``seed + j`` before each encoding of micro-batch ``j``: its cached and its live encoding see the
same random patches (else the summed gradients are not those of one full-batch loss), and a
step's randomness depends on the seed alone, so a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["contrastive_step", "agree"]


def agree(nonfinite: bool, stop: bool, device) -> tuple[bool, bool]:
    """(any rank non-finite, any rank asked to stop)."""
    flags = torch.tensor([float(nonfinite), float(stop)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return bool(flags[0] > 0), bool(flags[1] > 0)


def _encode(engine, batch, device, dtype, seed: int | None = None):
    if seed is not None:
        torch.manual_seed(seed)
    images = batch["image"].to(device, dtype=dtype, non_blocking=True)
    texts = batch["text"].to(device, non_blocking=True)
    return engine(images, texts)


def _loss(loss_fn, image_f, text_f, scale, bias, groups=None):
    extra = {} if groups is None else {"groups": groups}
    return loss_fn(image_f.float(), text_f.float(), scale.float(), None if bias is None else bias.float(), **extra)


def _groups(batches: list[dict], device) -> torch.Tensor | None:
    """The micro-batches' group ids, concatenated (None when the batches carry none)."""
    if "group" not in batches[0]:
        return None
    return torch.cat([b["group"] for b in batches]).to(device)


def contrastive_step(engine, loss_fn, batches: list[dict], device, dtype, stop: bool = False,
                     seed: int | None = None) -> tuple[torch.Tensor | None, bool]:
    """Run one optimizer step over ``batches`` (this rank's micro-batches, dicts with ``image``
    and ``text``, optionally ``group``). Returns (full-batch loss, or None when skipped as
    non-finite; stop agreed). ``seed``: see the module docstring."""
    groups = _groups(batches, device)

    def seed_of(j: int) -> int | None:
        return None if seed is None else seed + j

    if len(batches) == 1:
        image_f, text_f, scale, bias = _encode(engine, batches[0], device, dtype, seed_of(0))
        loss = _loss(loss_fn, image_f, text_f, scale, bias, groups)
        nonfinite, stop = agree(not torch.isfinite(loss).item(), stop, device)
        if nonfinite:
            return None, stop
        engine.backward(loss)
        engine.step()
        return loss.detach(), stop
    with torch.no_grad():
        cached = [_encode(engine, b, device, dtype, seed_of(j)) for j, b in enumerate(batches)]
        all_image = [c[0] for c in cached]
        all_text = [c[1] for c in cached]
        full = _loss(loss_fn, torch.cat(all_image), torch.cat(all_text), cached[0][2], cached[0][3], groups)
        logged = dict(getattr(loss_fn, "last", {}))
    nonfinite, stop = agree(not torch.isfinite(full).item(), stop, device)
    if nonfinite:
        return None, stop
    for j, batch in enumerate(batches):
        image_f, text_f, scale, bias = _encode(engine, batch, device, dtype, seed_of(j))
        if j > 0:
            scale = scale.detach()
            bias = None if bias is None else bias.detach()
        images = torch.cat(all_image[:j] + [image_f] + all_image[j + 1:])
        texts = torch.cat(all_text[:j] + [text_f] + all_text[j + 1:])
        engine.backward(_loss(loss_fn, images, texts, scale, bias, groups), scale_wrt_gas=False)
        engine.step()
    if logged:
        loss_fn.last = logged  # the full batch's terms, as computed before the micro-steps
    return full.detach(), stop
