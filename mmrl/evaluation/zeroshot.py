"""Zero-shot classification (CLIP_benchmark's ``zeroshot_classification`` protocol).

The classifier column of a class is the mean of its L2-normalised template embeddings,
renormalised (one ``encode_text`` batch per class, as CLIP_benchmark); logits are
``(100 * normalise(encode_image(x))) @ W``. Metrics: ``acc1``, ``acc5`` (only with at least 5
classes) and ``mean_per_class_recall`` (mean over the classes present in the targets of their
recall, = scikit-learn's ``balanced_accuracy_score``). Top-K ties are ordered by class index.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..progress import progress as progress_bar
from .context import EvalModel, RunOptions
from .datasets import NAMED_DATASETS, default_split
from .features import autocast_context, encode_text_groups
from .options import TaskOptions, option
from .tasks import Headline, Metric, Task, register

__all__ = ["zero_shot_classifier", "classification_metrics", "evaluate", "run_zeroshot", "true_class_rank",
           "ZeroshotTaskOptions", "TASK"]


def zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device,
                         amp: bool = True, progress: bool = False) -> torch.Tensor:
    """``[D, C]`` text classifier: per class, the renormalised mean of normalised template embeddings."""
    def reduce(emb: torch.Tensor) -> torch.Tensor:
        mean = F.normalize(emb, dim=-1).mean(dim=0)
        return mean / mean.norm()

    groups = [[t.format(c=c) for t in templates] for c in classnames]
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        return encode_text_groups(model, tokenizer, groups, dev, amp, progress, "zero-shot classifier", reduce).T
    finally:
        model.train(was_training)


def true_class_rank(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Number of classes ranked above the true class (ties ordered by class index)."""
    true = logits.gather(1, target[:, None])
    cols = torch.arange(logits.shape[1])[None, :]
    return ((logits > true) | ((logits == true) & (cols < target[:, None]))).sum(dim=1)


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, n_classes: int | None = None,
                           prefix: str = "") -> dict[str, float]:
    """``acc1``, ``acc5`` (with >= 5 classes), ``mean_per_class_recall`` from logits ``[N, C]``."""
    n_classes = n_classes or logits.shape[1]
    logits, target = logits.float().cpu(), target.long().cpu()
    rank = true_class_rank(logits, target)
    out = {f"{prefix}acc1": (rank < 1).double().mean().item()}
    if n_classes >= 5:
        out[f"{prefix}acc5"] = (rank < 5).double().mean().item()
    correct = (rank == 0).double()
    per_class = [correct[target == c].mean().item() for c in target.unique().tolist()]
    out[f"{prefix}mean_per_class_recall"] = sum(per_class) / len(per_class)
    return out


def _logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return 100.0 * image_features @ classifier


def evaluate(model, dataloader, tokenizer, classnames: Sequence[str], templates: Sequence[str], device,
             amp: bool = True, progress: bool = True) -> dict[str, float]:
    """CLIP_benchmark's ``zeroshot_classification.evaluate`` contract (single-label datasets):
    ``dataloader`` yields ``(images, targets)``; class names and templates are given."""
    dev = torch.device(device)
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device, amp, progress)
    logits, targets = [], []
    with torch.no_grad():
        for images, target in progress_bar(dataloader, desc="zero-shot", unit="batch", enabled=progress, leave=False):
            with autocast_context(dev, amp):
                feats = F.normalize(model.encode_image(images.to(dev)), dim=-1)
                logits.append(_logits(feats, classifier).float().cpu())
            targets.append(torch.as_tensor(target).cpu())
    return classification_metrics(torch.cat(logits), torch.cat(targets), len(classnames))


def run_zeroshot(em: EvalModel, opts: RunOptions, data: str, *, root: str | None = None, split: str = "test",
                 classnames: str | None = None, templates: None | str | Path | Sequence[str] = None,
                 name: str | None = None) -> tuple[Path, dict[str, float]]:
    """``mmrl eval zeroshot``: an image folder or named dataset, cached image features."""
    from .datasets import classification_data
    from .features import labelled_image_features, model_fingerprint
    from .prompts import resolve_templates
    from .results import write_result

    cd = classification_data(data, split, em.preprocess, root=root, classnames_file=classnames, name=name)
    tmpl, tmpl_source = resolve_templates(templates, cd.templates_key)
    feats = labelled_image_features(em, cd, split, data, opts)
    classifier = zero_shot_classifier(em.model, em.tokenizer, cd.classnames, tmpl, opts.device, opts.amp,
                                      opts.progress)
    logits = _logits(feats.get("embedding", normalize=True).to(opts.device), classifier.float()).cpu()
    metrics = classification_metrics(logits, feats.targets, len(cd.classnames))
    counts = torch.bincount(feats.targets, minlength=len(cd.classnames))
    protocol = {
        "data": cd.root, "split": split, "images": int(feats.targets.numel()), "classes": len(cd.classnames),
        "classes_without_images": int((counts == 0).sum()), "classnames_source": cd.classnames_source,
        "templates_source": tmpl_source, "templates": len(tmpl),
        "classifier": "per class: mean of L2-normalised template embeddings, renormalised",
        "logits": "100 * normalised image embedding @ classifier",
        "acc5": "reported" if len(cd.classnames) >= 5 else "omitted (fewer than 5 classes)",
        "mean_per_class_recall": "mean over classes present in the targets of per-class recall",
        "ties": "top-K ties ordered by class index",
        "features": {"device": opts.device, "amp": opts.amp, "batch_size": opts.batch_size},
    }
    path = write_result(opts.out_dir, cd.name, "zeroshot_classification", metrics, em.info, protocol,
                        fingerprint=model_fingerprint(em.model))
    return path, metrics


@dataclass
class ZeroshotTaskOptions(TaskOptions):
    """``mmrl eval zeroshot`` flags, the keys of a suite's ``task: zeroshot`` entry."""

    needs = (("dataset",), ("data",))

    dataset: str | None = option(metavar="NAME", choices=tuple(NAMED_DATASETS),
                                 help="a named dataset, read from --root (in a suite: from the suite's root)")
    data: str | None = option(metavar="ROOT", path="data",
                              help="image folder (ROOT/<class>/<image>) or a named dataset (cifar10, imagenet1k, ...)")
    root: str | None = option(suite="root", help="where named datasets live (default datasets/)")
    split: str | None = option(help="split of a named dataset (default: its test split)")
    classnames: str | None = option(metavar="FILE", path="file",
                                    help="one class name a line, in sorted folder order (default "
                                         "ROOT/classnames.txt if present)")
    templates: str | list[str] | None = option(metavar="FILE", path="file",
                                               help="one template a line with {c} for the class (a suite may "
                                                    "also give the list itself)")
    name: str | None = option(help="dataset name in the result")


def _run_task(em: EvalModel, opts: RunOptions, o: ZeroshotTaskOptions) -> tuple[Path, dict[str, float]]:
    data = o.dataset or o.data
    return run_zeroshot(em, opts, data, root=o.root, split=o.split or default_split(data), classnames=o.classnames,
                        templates=o.templates, name=o.name)


TASK = register(Task(
    name="zeroshot", result_task="zeroshot_classification", title="zero-shot classification",
    help="zero-shot classification of an image folder or a named dataset",
    options=ZeroshotTaskOptions, run=_run_task, needs_text=True,
    headline=Headline("top-1", ("acc1",)),
    metrics=(Metric("acc1", "top-1"), Metric("acc5", "top-5"),
             Metric("mean_per_class_recall", "mean per-class recall")),
))
