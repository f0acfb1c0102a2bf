"""Image-to-image retrieval of an image tower (metric-learning protocol).

Each labelled image queries all the others (itself excluded); images with the same label are
its positives. Metrics: ``recall@K`` (K = 1, 2, 4, 8: a positive among the K nearest) and
``map@r`` (MAP@R, Musgrave et al. 2020), over cosine similarities of L2-normalised features,
computed in chunks of query rows (:mod:`.ranking`). Queries whose label has no other image
have no positive and are left out of both metrics (their number is reported).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .context import EvalModel, RunOptions
from .datasets import NAMED_DATASETS, default_split
from .options import TaskOptions, option
from .ranking import TIE_RULE, image_to_image_ranks
from .tasks import Headline, Metric, Task, recall_curve, register

__all__ = ["image_retrieval_metrics", "evaluate", "run_image_retrieval", "RECALL_K", "ImageRetrievalTaskOptions",
           "TASK"]

RECALL_K = (1, 2, 4, 8)


def image_retrieval_metrics(features: torch.Tensor, labels: torch.Tensor, recall_k: Sequence[int] = RECALL_K, *,
                            chunk_size: int | None = None, device: str | torch.device = "cpu",
                            progress: bool = False) -> tuple[dict[str, float], dict[str, int]]:
    """``(metrics, counts)`` from L2-normalised ``features`` ``[N, D]`` and integer ``labels``."""
    ranks, n_pos, maps = image_to_image_ranks(features, labels, chunk_size=chunk_size, device=device,
                                              progress=progress)
    keep = n_pos > 0
    if not keep.any():
        raise ValueError("no image shares its label with another image: nothing to retrieve")
    metrics = {f"recall@{k}": (ranks[keep] < k).double().mean().item() for k in recall_k}
    metrics["map@r"] = maps[keep].mean().item()
    return metrics, {"queries": int(keep.sum()), "queries_without_positives": int((~keep).sum())}


def evaluate(model, dataloader, device, amp: bool = False, recall_k: Sequence[int] = RECALL_K,
             features: str = "embedding", progress: bool = True) -> dict[str, float]:
    """``evaluate(model, dataloader, device)`` for ``(images, labels)`` loaders."""
    from .features import encode_images

    dev = torch.device(device)
    xs, ys = [], []
    model.eval()
    for images, target in dataloader:
        emb, pooled = encode_images(model, images, dev, amp)
        xs.append(emb if features == "embedding" else pooled)
        ys.append(torch.as_tensor(target))
    x = F.normalize(torch.cat(xs).float(), dim=-1)
    return image_retrieval_metrics(x, torch.cat(ys), recall_k, device=device, progress=progress)[0]


def run_image_retrieval(em: EvalModel, opts: RunOptions, data: str, *, root: str | None = None,
                        split: str = "test", features: str = "embedding", name: str | None = None,
                        recall_k: Sequence[int] = RECALL_K) -> tuple[Path, dict[str, float]]:
    """``mmrl eval image-retrieval``: an image folder (or named dataset), cached features."""
    from .datasets import classification_data
    from .features import extract_image_features, model_fingerprint
    from .results import write_result

    cd = classification_data(data, split, em.preprocess, root=root, name=name)
    feats = extract_image_features(em.model, cd.dataset, device=opts.device, amp=opts.amp,
                                   batch_size=opts.batch_size, num_workers=opts.num_workers, progress=opts.progress,
                                   cache_dir=opts.cache_dir, model_key=em.info.key, label=f"{cd.name}-{split}")
    if feats.targets is None or (feats.targets < 0).any():
        raise ValueError(f"{data}: split {split!r} has no labels")
    x = feats.get(features, normalize=True)
    metrics, counts = image_retrieval_metrics(x, feats.targets, recall_k, device=opts.device, progress=opts.progress)
    protocol = {
        "data": cd.root, "split": split, "images": int(len(x)), "classes": len(cd.classnames), **counts,
        "features": features,
        "features_description": ("L2-normalised encode_image embedding" if features == "embedding"
                                 else "L2-normalised pooled output before visual.proj"),
        "similarity": "cosine", "queries_and_candidates": "each image queries all the others (itself excluded)",
        "positives": "images with the same label", "map@r": "MAP@R (Musgrave et al. 2020), R = number of positives",
        "ties": TIE_RULE, "recall_k": list(recall_k),
    }
    path = write_result(opts.out_dir, cd.name, "image_retrieval", metrics, em.info, protocol,
                        fingerprint=model_fingerprint(em.model))
    return path, metrics


@dataclass
class ImageRetrievalTaskOptions(TaskOptions):
    """``mmrl eval image-retrieval`` flags, the keys of a suite's ``task: image-retrieval`` entry."""

    needs = (("dataset",), ("data",))

    dataset: str | None = option(metavar="NAME", choices=tuple(NAMED_DATASETS),
                                 help="a named dataset, read from --root (in a suite: from the suite's root)")
    data: str | None = option(metavar="ROOT", path="data", help="labelled image folder or named dataset")
    root: str | None = option(suite="root", help="where named datasets live (default datasets/)")
    split: str | None = option(help="split of a named dataset (default: its test split)")
    features: str = option("embedding", choices=("embedding", "pooled"),
                           help="embedding = encode_image; pooled = before visual.proj; both L2-normalised")
    name: str | None = option(help="dataset name in the result")


def _run_task(em: EvalModel, opts: RunOptions, o: ImageRetrievalTaskOptions) -> tuple[Path, dict[str, float]]:
    data = o.dataset or o.data
    return run_image_retrieval(em, opts, data, root=o.root, split=o.split or default_split(data),
                               features=o.features, name=o.name)


TASK = register(Task(
    name="image-retrieval", result_task="image_retrieval", title="image-to-image retrieval (same class)",
    help="image-to-image retrieval: Recall@1/2/4/8 and MAP@R over labelled images",
    options=ImageRetrievalTaskOptions, run=_run_task,
    headline=Headline("R@1", ("recall@1",)),
    metrics=(Metric("recall@1", "R@1"), Metric("recall@2", "R@2", report=False),
             Metric("recall@4", "R@4", report=False), Metric("recall@8", "R@8", report=False),
             Metric("map@r", "MAP@R")),
    recall_curve=recall_curve,
))
