"""Linear probe: L2-regularised multinomial logistic regression on frozen image features.

Protocol (CLIP paper App. A.3 / CLIP_benchmark PR #107, solved exactly rather than with SGD):

1. features: ``pooled`` -- the pooled output before ``visual.proj`` (for GGeM towers the GGeM
   output; the CLIP paper's ViT probes use pre-projection features) -- or ``embedding`` -- the
   L2-normalised ``encode_image`` output (CLIP_benchmark's choice); cached per (model, dataset);
2. a stratified validation split (``val_proportion`` of each class, seeded) is held out of train;
3. the regularisation ``lambda`` of ``mean cross-entropy + lambda/2 * ||W||^2`` (bias not
   penalised) is chosen on it from ``logspace(-6, 2, 97)``: the 7 points ``0, 16, ..., 96`` of the
   grid, then the neighbours at distance 8, 4, 2, 1 of the best so far (ties: larger lambda);
4. the probe is refit on train + val with that lambda and scored on test.

The problem is convex; it is solved full-batch with L-BFGS (strong Wolfe line search) on
whatever device the features are on (CPU or GPU), warm-started from the nearest grid point.
``lambda`` corresponds to scikit-learn's ``C = 1 / (lambda * n_samples)``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .context import EvalModel, RunOptions
from .datasets import NAMED_DATASETS, default_split
from .options import TaskOptions, option
from .tasks import Headline, Metric, Task, register
from .zeroshot import classification_metrics

__all__ = ["LinearProbeOptions", "fit_logistic", "stratified_split", "stratified_subsample", "coarse_to_fine",
           "linear_probe", "evaluate", "run_linear_probe", "LinearProbeTaskOptions", "TASK"]


@dataclass
class LinearProbeOptions:
    """Linear-probe settings (all recorded in the result's protocol)."""

    features: str = "pooled"          # "pooled" (pre-projection) or "embedding" (normalised)
    val_proportion: float = 0.2
    seed: int = 0
    log10_min: float = -6.0
    log10_max: float = 2.0
    grid_points: int = 97
    max_iter: int = 1000
    tolerance: float = 1e-6           # L-BFGS stops when max |gradient| falls below this
    dtype: str = "float32"

    def grid(self) -> list[float]:
        return torch.logspace(self.log10_min, self.log10_max, self.grid_points, dtype=torch.float64).tolist()


Params = tuple[torch.Tensor, torch.Tensor]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, *, init: Params | None = None,
                 max_iter: int = 1000, tolerance: float = 1e-6) -> Params:
    """Minimise ``mean CE(x W^T + b, y) + l2/2 ||W||^2``; returns ``(W [C, D], b [C])``."""
    d = x.shape[1]
    w = (init[0].clone() if init else torch.zeros(n_classes, d, dtype=x.dtype, device=x.device)).requires_grad_(True)
    b = (init[1].clone() if init else torch.zeros(n_classes, dtype=x.dtype, device=x.device)).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4, history_size=20,
                            tolerance_grad=tolerance, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def stratified_split(y: torch.Tensor, proportion: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_idx, val_idx)``: ``round(proportion * n_c)`` items of each class with at least two
    items go to validation (at least one), chosen by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(len(idx) - 1, max(1, round(proportion * len(idx)))) if len(idx) >= 2 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def stratified_subsample(y: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """Sorted indices of at most ``limit`` items of ``y``, stratified by class: class ``c`` with
    ``n_c`` of the ``N`` items gets ``floor(limit * n_c / N)`` items, and the remaining ones go to
    the largest remainders (ties: lower class), so shares match ``y``'s to within one item;
    each class's items are chosen by a seeded permutation. ``limit >= N``: every item."""
    if limit < 1:
        raise ValueError(f"train limit must be positive, got {limit}")
    y = y.cpu().long()
    n = len(y)
    if limit >= n:
        return torch.arange(n)
    classes, counts = y.unique(return_counts=True)
    quota = counts * limit // n
    remainder = counts * limit % n
    order = sorted(range(len(classes)), key=lambda i: (-int(remainder[i]), i))
    for i in order[:limit - int(quota.sum())]:
        quota[i] += 1
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c, k in zip(classes.tolist(), quota.tolist()):
        idx = (y == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picked).sort().values


def coarse_to_fine(n: int, score: Callable[[int], float]) -> tuple[int, dict[int, float]]:
    """Best grid index under ``score`` (higher is better; ties go to the larger index): the 7
    points ``0, s, 2s, ..`` (``s = (n-1)//6``), then the neighbours at distances s/2, s/4, ... 1
    of the best so far. Returns ``(best, {index: score})``."""
    step = max(1, (n - 1) // 6)
    scores: dict[int, float] = {}

    def best() -> int:
        return max(scores, key=lambda i: (scores[i], i))

    for i in range(0, n, step):
        scores[i] = score(i)
    if (n - 1) not in scores:
        scores[n - 1] = score(n - 1)
    while step > 1:
        step //= 2
        centre = best()
        for i in (centre - step, centre + step):
            if 0 <= i < n and i not in scores:
                scores[i] = score(i)
    return best(), scores


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 n_classes: int, options: LinearProbeOptions = LinearProbeOptions(),
                 device: str | torch.device = "cpu") -> tuple[dict[str, float], dict[str, object]]:
    """Sweep, refit and score; returns ``(metrics, details)`` (details: sweep trace, sizes)."""
    dtype = getattr(torch, options.dtype)
    dev = torch.device(device)
    x_all, y_all = train_x.to(dev, dtype), train_y.to(dev).long()
    tr, va = stratified_split(train_y.cpu().long(), options.val_proportion, options.seed)
    if len(va) == 0:
        raise ValueError("the training set is too small for a validation split (need 2+ images in some class)")
    tr, va = tr.to(dev), va.to(dev)
    grid = options.grid()
    fitted: dict[int, Params] = {}
    t0 = time.perf_counter()

    def score(i: int) -> float:
        near = min(fitted, key=lambda j: abs(j - i)) if fitted else None
        fitted[i] = fit_logistic(x_all[tr], y_all[tr], n_classes, grid[i], init=fitted.get(near),
                                 max_iter=options.max_iter, tolerance=options.tolerance)
        w, b = fitted[i]
        return (torch.argmax(x_all[va] @ w.T + b, dim=1) == y_all[va]).double().mean().item()

    best, trace = coarse_to_fine(len(grid), score)
    sweep_s = time.perf_counter() - t0
    l2 = grid[best]
    w, b = fit_logistic(x_all, y_all, n_classes, l2, init=fitted[best], max_iter=options.max_iter,
                        tolerance=options.tolerance)
    logits = (test_x.to(dev, dtype) @ w.T + b).float().cpu()
    metrics = classification_metrics(logits, test_y.long().cpu(), n_classes, prefix="lp_")
    n_fit = len(y_all)
    metrics.update({"l2_lambda": l2, "C": 1.0 / (l2 * n_fit)})
    details = {
        "train": int(len(tr)), "val": int(len(va)), "test": int(len(test_y)), "classes": n_classes,
        "chosen_l2_lambda": l2, "sklearn_C_equivalent": 1.0 / (l2 * n_fit), "val_acc1_at_chosen": trace[best],
        "sweep": [{"l2_lambda": grid[i], "val_acc1": trace[i]} for i in sorted(trace)],
        "fits": len(trace) + 1, "sweep_seconds": round(sweep_s, 3), "seconds": round(time.perf_counter() - t0, 3),
    }
    return metrics, details


def _features(feats, tap: str) -> torch.Tensor:
    return feats.get(tap, normalize=(tap == "embedding"))


def evaluate(model, train_dataloader, test_dataloader, device, options: LinearProbeOptions = LinearProbeOptions(),
             amp: bool = False, progress: bool = True) -> dict[str, float]:
    """CLIP_benchmark-style ``evaluate`` for the probe (``(images, targets)`` loaders), on CPU or GPU."""
    from .features import encode_images

    dev = torch.device(device)

    def collect(loader):
        xs, ys = [], []
        for images, target in loader:
            emb, pooled = encode_images(model, images, dev, amp)
            x = pooled if options.features == "pooled" else F.normalize(emb, dim=-1)
            if x is None:
                raise ValueError("the model exposes no pooled features; use features='embedding'")
            xs.append(x)
            ys.append(torch.as_tensor(target))
        return torch.cat(xs), torch.cat(ys)

    model.eval()
    train_x, train_y = collect(train_dataloader)
    test_x, test_y = collect(test_dataloader)
    n_classes = int(max(train_y.max(), test_y.max()).item()) + 1
    return linear_probe(train_x, train_y, test_x, test_y, n_classes, options, device)[0]


def _subsample_train(cd, limit: int, seed: int, data: str):
    """``(cd with its dataset subsampled, images available)`` (:func:`stratified_subsample`)."""
    from .datasets import Subsample, labels_of

    y = labels_of(cd.dataset)
    if y is None:
        raise ValueError(f"{data}: cannot subsample the training split (its labels are not known without "
                         f"reading every image); drop train_limit")
    idx = stratified_subsample(y, limit, seed)
    if len(idx) == len(y):
        return cd, len(y)
    return replace(cd, dataset=Subsample(cd.dataset, idx.tolist(), y[idx].tolist())), len(y)


def run_linear_probe(em: EvalModel, opts: RunOptions, train: str, test: str, *, root: str | None = None,
                     train_split: str = "train", test_split: str = "test", name: str | None = None,
                     options: LinearProbeOptions = LinearProbeOptions(),
                     train_limit: int | None = None) -> tuple[Path, dict[str, float]]:
    """``mmrl eval linear-probe``: features of both splits (cached), sweep, refit, write.

    ``train_limit``: probe on a class-stratified subsample of at most that many training
    images (:func:`stratified_subsample`, seeded by ``options.seed``), drawn before any image
    is encoded; its features are cached apart from the full split's."""
    from .datasets import classification_data
    from .features import labelled_image_features, model_fingerprint
    from .results import write_result

    if options.features not in ("pooled", "embedding"):
        raise ValueError(f"features must be 'pooled' or 'embedding', got {options.features!r}")
    if train_limit is not None and train_limit < 1:
        raise ValueError(f"train_limit must be a positive number of images, got {train_limit}")
    splits = {}
    available = None
    for role, data, split in (("train", train, train_split), ("test", test, test_split)):
        cd = classification_data(data, split, em.preprocess, root=root, name=name)
        label = None
        if role == "train" and train_limit is not None:
            cd, available = _subsample_train(cd, train_limit, options.seed, data)
            if len(cd.dataset) < available:
                label = f"{cd.name}-{split}-limit{train_limit}-seed{options.seed}"
        feats = labelled_image_features(em, cd, split, data, opts, label=label)
        splits[role] = (cd, _features(feats, options.features), feats.targets)
    (cd_tr, x_tr, y_tr), (cd_te, x_te, y_te) = splits["train"], splits["test"]
    if len(cd_tr.classnames) != len(cd_te.classnames):
        raise ValueError(f"{train} has {len(cd_tr.classnames)} classes but {test} has {len(cd_te.classnames)}")
    metrics, details = linear_probe(x_tr, y_tr, x_te, y_te, len(cd_tr.classnames), options, opts.device)
    dataset = name or cd_tr.name
    protocol = {
        "train_data": cd_tr.root, "test_data": cd_te.root, "train_split": train_split, "test_split": test_split,
        "features": options.features,
        "features_description": ("pooled image-tower output before visual.proj (not normalised)"
                                 if options.features == "pooled" else "L2-normalised encode_image embedding"),
        "feature_dim": int(x_tr.shape[1]),
        "objective": "mean cross-entropy + l2_lambda/2 * ||W||^2 (bias not penalised), multinomial",
        "solver": f"full-batch L-BFGS (strong Wolfe), max_iter {options.max_iter}, tolerance {options.tolerance}",
        "selection": f"coarse-to-fine over logspace({options.log10_min:g}, {options.log10_max:g}, "
                     f"{options.grid_points}) on a stratified {options.val_proportion:g} validation split of train "
                     f"(seed {options.seed}), best val acc1; refit on train+val",
        "train_images": int(len(y_tr)), "train_images_available": int(available or len(y_tr)),
        "train_limit": train_limit,
        "train_subsample": (None if train_limit is None else
                            f"class-stratified (largest remainder), seeded by options.seed {options.seed}, "
                            f"drawn before feature extraction"),
        "options": asdict(options), "device": opts.device, **details,
    }
    path = write_result(opts.out_dir, dataset, "linear_probe", metrics, em.info, protocol,
                        fingerprint=model_fingerprint(em.model))
    return path, metrics


@dataclass
class LinearProbeTaskOptions(TaskOptions):
    """``mmrl eval linear-probe`` flags, the keys of a suite's ``task: linear-probe`` entry (the
    probe's settings of :class:`LinearProbeOptions` and where its data is)."""

    needs = (("dataset",), ("train", "test"))

    dataset: str | None = option(metavar="NAME", choices=tuple(NAMED_DATASETS),
                                 help="a named dataset for both splits, read from --root (in a suite: from the "
                                      "suite's root)")
    train: str | None = option(metavar="ROOT", path="data", help="training image folder or named dataset")
    test: str | None = option(metavar="ROOT", path="data", help="test image folder or named dataset")
    root: str | None = option(suite="root", help="where named datasets live (default datasets/)")
    train_split: str | None = option(metavar="SPLIT", help="split of a named training dataset (default: its train "
                                                           "split)")
    test_split: str | None = option(metavar="SPLIT", help="split of a named test dataset (default: its test split)")
    name: str | None = option(help="dataset name in the result")
    features: str = option("pooled", choices=("pooled", "embedding"),
                           help="pooled = pool output before visual.proj; embedding = normalised encode_image")
    val_proportion: float = option(0.2, metavar="P", help="validation share of train")
    probe_seed: int = option(0, metavar="S", help="seed of the validation split and of the train_limit subsample")
    max_iter: int = option(1000, metavar="N", help="L-BFGS iterations per fit")
    grid_points: int = option(97, metavar="N", help="regularisation values on the log grid 1e-6 .. 1e2")
    train_limit: int | None = option(metavar="N", help="probe on a class-stratified subsample of at most N "
                                                       "training images (drawn before encoding; default: all)")

    def validate(self) -> None:
        super().validate()
        self.require(0 < self.val_proportion < 1, "val_proportion", "a number between 0 and 1")
        for key in ("max_iter", "grid_points", "train_limit"):
            value = getattr(self, key)
            self.require(value is None or value >= 1, key, "a positive integer")

    def probe(self) -> LinearProbeOptions:
        """The probe's solver settings."""
        return LinearProbeOptions(features=self.features, val_proportion=self.val_proportion, seed=self.probe_seed,
                                  max_iter=self.max_iter, grid_points=self.grid_points)


def _run_task(em: EvalModel, opts: RunOptions, o: LinearProbeTaskOptions) -> tuple[Path, dict[str, float]]:
    train, test = o.dataset or o.train, o.dataset or o.test
    return run_linear_probe(em, opts, train, test, root=o.root,
                            train_split=o.train_split or default_split(train, "train"),
                            test_split=o.test_split or default_split(test), name=o.name, options=o.probe(),
                            train_limit=o.train_limit)


TASK = register(Task(
    name="linear-probe", result_task="linear_probe", title="linear probe",
    help="logistic-regression probe on frozen image features (regularisation swept on a val split)",
    options=LinearProbeTaskOptions, run=_run_task,
    headline=Headline("top-1", ("lp_acc1",)),
    metrics=(Metric("lp_acc1", "top-1"), Metric("lp_acc5", "top-5", report=False),
             Metric("lp_mean_per_class_recall", "mean per-class recall", report=False)),
))
