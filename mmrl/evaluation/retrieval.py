"""Image-text retrieval (COCO / Flickr30k protocol), CLIP_benchmark's metric names.

* ``image_retrieval_recall@K`` -- text-to-image: every caption is a query, its image the positive;
* ``text_retrieval_recall@K`` -- image-to-text: every image is a query, **every** caption of it a
  positive; a query is correct when any positive is in the top K (the CLIP-paper R@K);
* ``rsum`` -- the six R@{1,5,10} in percent, summed (0-600, the VSE++ convention);
* ``fold1k_*`` -- the same averaged over five folds of 1,000 images (COCO 1K: consecutive blocks of
  1,000 images in annotation-file order, each with its own captions).

Scores are cosine similarities of L2-normalised embeddings (no ``logit_scale``), ranked in chunks
(:mod:`.ranking`): memory is bounded by a block of caption rows, never the full matrix.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .annotations import RetrievalAnnotations, check_counts, read_annotations, resolve_images
from .context import EvalModel, RunOptions
from .options import TaskOptions, option
from .ranking import TIE_RULE, recall_at, text_image_ranks
from .tasks import Headline, Metric, Task, mean_recall_curve, register

__all__ = ["retrieval_metrics", "caption_pairs", "evaluate", "run_retrieval", "DUPLICATE_MODES",
           "RetrievalTaskOptions", "TASK"]

DUPLICATE_MODES = ("auto", "own", "shared")


def caption_pairs(caption_image: Sequence[int], captions: Sequence[str] | None = None,
                  shared: bool = False) -> torch.Tensor:
    """Positive (caption, image) pairs ``[P, 2]``: each caption with its own image, and with
    ``shared=True`` also with every other image that has a caption of exactly the same text."""
    own = torch.tensor([[j, i] for j, i in enumerate(caption_image)], dtype=torch.long).reshape(-1, 2)
    if not shared:
        return own
    if captions is None:
        raise ValueError("shared caption positives need the caption texts")
    images_of: dict[str, set] = defaultdict(set)
    for text, i in zip(captions, caption_image):
        images_of[text.strip()].add(i)
    rows = [[j, i] for j, text in enumerate(captions) for i in sorted(images_of[text.strip()])]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


def retrieval_metrics(text_emb: torch.Tensor, image_emb: torch.Tensor, caption_image: Sequence[int], *,
                      recall_k: Sequence[int] = (1, 5, 10), pairs: torch.Tensor | None = None,
                      fold_size: int | None = None, chunk_size: int | None = None,
                      device: str | torch.device = "cpu", progress: bool = False) -> dict[str, float]:
    """Recall@K in both directions (and ``rsum``; ``fold1k_*`` with ``fold_size``) from
    normalised embeddings. ``pairs`` overrides the default positives (each caption's image)."""
    caption_image = torch.as_tensor(list(caption_image), dtype=torch.long)
    if len(caption_image) != text_emb.shape[0]:
        raise ValueError(f"{text_emb.shape[0]} caption embeddings for {len(caption_image)} caption image indices")
    if pairs is None:
        pairs = torch.stack([torch.arange(len(caption_image)), caption_image], dim=1)
    image_fold = text_fold = None
    n_images = image_emb.shape[0]
    if fold_size:
        if n_images % fold_size or n_images < 2 * fold_size:
            raise ValueError(f"{n_images} images cannot be split into folds of {fold_size}")
        image_fold = torch.arange(n_images) // fold_size
        text_fold = image_fold[caption_image]
    ranks = text_image_ranks(text_emb, image_emb, pairs, image_fold=image_fold, text_fold=text_fold,
                             chunk_size=chunk_size, device=device, progress=progress)
    metrics = _recalls(ranks.t2i, ranks.i2t, recall_k)
    if fold_size:
        folds = []
        for f in range(n_images // fold_size):
            folds.append(_recalls(ranks.t2i_fold[text_fold == f], ranks.i2t_fold[image_fold == f], recall_k))
        for key in folds[0]:
            metrics[f"fold1k_{key}" if fold_size == 1000 else f"fold{fold_size}_{key}"] = \
                sum(m[key] for m in folds) / len(folds)
    return metrics


def _recalls(t2i: torch.Tensor, i2t: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = recall_at(t2i, k)
        out[f"text_retrieval_recall@{k}"] = recall_at(i2t, k)
    if all(k in ks for k in (1, 5, 10)):
        out["rsum"] = 100.0 * sum(out[f"{d}_retrieval_recall@{k}"] for d in ("image", "text") for k in (1, 5, 10))
    return out


def evaluate(model, dataloader, tokenizer, device, amp: bool = True, recall_k_list: Sequence[int] = (1, 5, 10), *,
             fold_size: int | None = None, chunk_size: int | None = None, progress: bool = True) -> dict[str, float]:
    """CLIP_benchmark's ``zeroshot_retrieval.evaluate`` contract: ``dataloader`` yields
    ``(images, list of caption lists)``; embeddings are computed batch by batch as there, the
    metrics in bounded memory (same numbers as CLIP_benchmark when no scores tie)."""
    from ..progress import progress as progress_bar
    from .features import autocast_context

    dev = torch.device(device)
    images, texts, owner = [], [], []
    start = 0
    for batch_images, batch_texts in progress_bar(dataloader, desc="retrieval", unit="batch", enabled=progress,
                                                  leave=False):
        tokens = tokenizer([t for caps in batch_texts for t in caps]).to(dev)
        owner.extend(start + i for i, caps in enumerate(batch_texts) for _ in caps)
        start += len(batch_images)
        with torch.no_grad(), autocast_context(dev, amp):
            images.append(F.normalize(model.encode_image(batch_images.to(dev)), dim=-1).float().cpu())
            texts.append(F.normalize(model.encode_text(tokens), dim=-1).float().cpu())
    return retrieval_metrics(torch.cat(texts), torch.cat(images), owner, recall_k=recall_k_list,
                             fold_size=fold_size, chunk_size=chunk_size, device=device)


def _duplicates(ann: RetrievalAnnotations) -> int:
    images_of: dict[str, set] = defaultdict(set)
    for text, i in zip(ann.captions, ann.caption_image):
        images_of[text.strip()].add(i)
    return sum(1 for s in images_of.values() if len(s) > 1)


def run_retrieval(em: EvalModel, opts: RunOptions, annotations: str | Path, *, images: str | Path | None = None,
                  split: str = "test", name: str | None = None, count_check: bool = True,
                  duplicate_captions: str = "auto", fold_size: int | None = None, eccv: bool = True,
                  recall_k: Sequence[int] = (1, 5, 10)) -> tuple[Path, dict[str, float]]:
    """``mmrl eval retrieval``: parse, check, encode (cached), rank, write the result file."""
    from .datasets import ImageListDataset
    from .features import extract_image_features, extract_text_features, model_fingerprint
    from .results import write_result

    if duplicate_captions not in DUPLICATE_MODES:
        raise ValueError(f"duplicate_captions must be one of {DUPLICATE_MODES}, got {duplicate_captions!r}")
    ann = read_annotations(annotations, split=split, name=name)
    count_note = check_counts(ann) if count_check else "skipped (--no-count-check)"
    paths = resolve_images(ann, images)
    shared = duplicate_captions == "shared" or (duplicate_captions == "auto" and ann.benchmark is None)
    n_dup = _duplicates(ann)
    if fold_size is None and ann.benchmark == "coco-5k":
        fold_size = 1000
    common = dict(device=opts.device, amp=opts.amp, batch_size=opts.batch_size, progress=opts.progress,
                  cache_dir=opts.cache_dir, model_key=em.info.key)
    img = extract_image_features(em.model, ImageListDataset(paths, em.preprocess), num_workers=opts.num_workers,
                                 label=f"{ann.name}-images", **common)
    txt = extract_text_features(em.model, em.tokenizer, ann.captions, label=f"{ann.name}-captions", **common)
    image_emb, text_emb = img.get("embedding", normalize=True), F.normalize(txt.float(), dim=-1)
    pairs = caption_pairs(ann.caption_image, ann.captions, shared=shared)
    metrics = retrieval_metrics(text_emb, image_emb, ann.caption_image, recall_k=recall_k, pairs=pairs,
                                fold_size=fold_size, device=opts.device, progress=opts.progress)
    eccv_note = "disabled"
    if eccv:
        from .eccv import eccv_metrics

        extra, eccv_note = eccv_metrics(ann, text_emb, image_emb, device=opts.device)
        metrics.update(extra)
    lo, hi = ann.captions_per_image()
    protocol = {
        "annotation_file": str(ann.path.resolve()), "format": ann.format, "split": ann.split,
        "images_root": str(paths[0].parent.resolve()) if paths else None,
        "images": ann.n_images, "captions": ann.n_captions, "captions_per_image": [lo, hi],
        "recognised_as": ann.benchmark, "count_check": count_note or "not a recognised standard test set",
        "positives": "every caption of an image is a positive of that image"
                     + ("; identical caption texts are positives of every image they describe" if shared else ""),
        "duplicate_captions": "shared" if shared else "own", "duplicate_caption_texts": n_dup,
        "queries": {"image_retrieval": f"{ann.n_captions} captions -> {ann.n_images} images",
                    "text_retrieval": f"{ann.n_images} images -> {ann.n_captions} captions"},
        "recall": "CLIP-paper R@K: a query is correct if any of its positives is in the top K",
        "score": "cosine similarity of L2-normalised embeddings (logit_scale not applied)",
        "ties": TIE_RULE, "rsum": "sum of the six R@1/5/10 in percent (0-600)",
        "folds": ({"fold_size": fold_size, "n_folds": ann.n_images // fold_size,
                   "order": "consecutive blocks of images in annotation-file order, with their captions",
                   "average": "mean of the per-fold recalls"} if fold_size else None),
        "eccv_caption": eccv_note, "recall_k": list(recall_k),
        "features": {"image": "encode_image", "text": "encode_text", "device": opts.device, "amp": opts.amp,
                     "batch_size": opts.batch_size},
    }
    path = write_result(opts.out_dir, ann.name, "zeroshot_retrieval", metrics, em.info, protocol,
                        fingerprint=model_fingerprint(em.model))
    return path, metrics


def parse_ks(values: Sequence[int] | None) -> list[int]:
    ks = sorted(set(int(v) for v in (values or (1, 5, 10))))
    if not ks or ks[0] < 1:
        raise ValueError(f"recall K values must be positive integers, got {values}")
    return ks


@dataclass
class RetrievalTaskOptions(TaskOptions):
    """``mmrl eval retrieval`` flags, the keys of a suite's ``task: retrieval`` entry."""

    needs = (("annotations",),)

    annotations: str | None = option(
        metavar="FILE", path="data",
        help="dataset_coco.json / dataset_flickr30k.json (Karpathy), coco_test_karpathy.json, "
             "flickr30k_test_karpathy.txt, or BLIP's *_test.json; detected by content")
    images: str | None = option(metavar="ROOT", path="data",
                                help="folder the annotation's image paths are relative to (default: the file's folder)")
    split: str = option("test", help="Karpathy split; 'all' for every image")
    name: str | None = option(help="dataset name in the result (default: from the file)")
    recall_k: list[int] = option([1, 5, 10], metavar="K", help="recall cut-offs K of R@K")
    count_check: bool = option(True, help="the check of the image/caption counts of a recognised COCO 5K / "
                                          "Flickr 1K test file")
    duplicate_captions: str = option(
        "auto", choices=DUPLICATE_MODES,
        help="identical caption texts under several images: 'own' = each caption's positive is its own image "
             "(CLIP_benchmark), 'shared' = every image with that text is a positive; auto = own for recognised "
             "COCO/Flickr test files, shared elsewhere")
    fold_size: int | None = option(metavar="N", help="also report fold-averaged recalls over folds of this many "
                                                     "images (COCO 5K: 1000, automatic)")
    eccv: bool = option(True, help="ECCV Caption / CxC metrics (with the eccv-caption package, on COCO 5K ids)")

    def validate(self) -> None:
        super().validate()
        self.require(bool(self.recall_k) and all(k >= 1 for k in self.recall_k), "recall_k", "positive integers")
        self.require(self.fold_size is None or self.fold_size >= 1, "fold_size", "a positive integer")


def _run_task(em: EvalModel, opts: RunOptions, o: RetrievalTaskOptions) -> tuple[Path, dict[str, float]]:
    return run_retrieval(em, opts, o.annotations, images=o.images, split=o.split, name=o.name,
                         count_check=o.count_check, duplicate_captions=o.duplicate_captions, fold_size=o.fold_size,
                         eccv=o.eccv, recall_k=parse_ks(o.recall_k))


_RECALLS = tuple(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10))

TASK = register(Task(
    name="retrieval", result_task="zeroshot_retrieval", title="text-image retrieval",
    help="image-text retrieval on COCO / Flickr30k-style annotations (Karpathy JSON, COCO captions, CSV)",
    options=RetrievalTaskOptions, run=_run_task, needs_text=True,
    headline=Headline("mean R@1/5/10, both directions", _RECALLS),
    metrics=(Metric("image_retrieval_recall@1", "text→image R@1"),
             Metric("image_retrieval_recall@5", "text→image R@5"),
             Metric("image_retrieval_recall@10", "text→image R@10"),
             Metric("text_retrieval_recall@1", "image→text R@1"),
             Metric("text_retrieval_recall@5", "image→text R@5"),
             Metric("text_retrieval_recall@10", "image→text R@10"),
             Metric("rsum", "rsum (the six R@1/5/10 in %, summed)", report=False),
             Metric("fold1k_rsum", "rsum, mean over 1K folds", report=False)),
    recall_curve=lambda m: mean_recall_curve(m, ("image_retrieval_", "text_retrieval_")),
))
