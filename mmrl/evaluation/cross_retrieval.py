"""Cross-style image-to-image retrieval: the same identities drawn two ways.

A *query* folder and a *gallery* folder of images (e.g. the same emoji concepts in the Twemoji
and the OpenMoji style) are matched by **identity**: an image's file stem, or, when a
``labels.json`` lies beside the images folder (``FOLDER/../labels.json``, a list of
``{"filename", "concept", ...}`` entries or ``{"images": [...]}``, what ``mmrl prepare emoji``
writes), the ``concept`` of its entry. Only identities present in both folders are used.

Both folders are embedded with ``encode_image`` (L2-normalised; features cached per folder),
each query ranks the gallery by cosine similarity and each gallery image ranks the queries.
A query's positives are the gallery images of its identity (usually one). Metrics, with ties
broken by :data:`.ranking.TIE_RULE` (the ranking is :func:`.ranking.text_image_ranks` with
queries as rows and the gallery as columns, so both directions read the same score blocks):

* ``q2g_recall@K`` -- query -> gallery: a positive among the K nearest gallery images;
* ``g2q_recall@K`` -- gallery -> query;
* ``recall@K`` -- the mean of the two directions.
"""
from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .context import EvalModel, RunOptions
from .options import TaskOptions, option
from .ranking import TIE_RULE, text_image_ranks
from .tasks import Headline, Metric, Task, recall_curve, register

__all__ = ["RECALL_K", "IdentityImages", "read_identity_folder", "overlap", "cross_retrieval_metrics",
           "evaluate", "run_cross_retrieval", "CrossRetrievalTaskOptions", "TASK"]

RECALL_K = (1, 5, 10)
LABELS_FILE = "labels.json"


@dataclass
class IdentityImages:
    """The images of a folder (sorted by file name) and the identity of each."""

    folder: Path
    paths: list[Path]
    ids: list[str]
    ids_source: str  # "file stem" or the labels file


def _labels_entries(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON labels file ({err})") from err
    entries = data.get("images") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "filename" in e and "concept" in e
                                                for e in entries):
        raise ValueError(f"{path}: expected a list (or {{'images': [...]}}) of {{'filename', 'concept'}} entries")
    return entries


def read_identity_folder(folder: str | Path) -> IdentityImages:
    """The images directly in ``folder`` with their identities (see the module docstring)."""
    from .datasets import IMAGE_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    labels = folder.parent / LABELS_FILE
    if not labels.is_file():
        return IdentityImages(folder, paths, [p.stem for p in paths], "file stem")
    concept = {str(e["filename"]): str(e["concept"]) for e in _labels_entries(labels)}
    unlisted = [p.name for p in paths if p.name not in concept]
    if unlisted:
        raise ValueError(f"{labels}: {len(unlisted)} of {len(paths)} images of {folder} are not listed "
                         f"(e.g. {unlisted[0]})")
    return IdentityImages(folder, paths, [concept[p.name] for p in paths], str(labels))


def overlap(query_ids: Sequence[Hashable], gallery_ids: Sequence[Hashable]) -> tuple[list[int], list[int], list]:
    """``(query rows, gallery rows, shared identities)``: the items whose identity is in both
    lists (rows in their original order; identities sorted by first query appearance)."""
    shared = set(query_ids) & set(gallery_ids)
    q = [i for i, k in enumerate(query_ids) if k in shared]
    g = [i for i, k in enumerate(gallery_ids) if k in shared]
    ordered = list(dict.fromkeys(query_ids[i] for i in q))
    return q, g, ordered


def cross_retrieval_metrics(query: torch.Tensor, gallery: torch.Tensor, query_ids: Sequence[Hashable],
                            gallery_ids: Sequence[Hashable], recall_k: Sequence[int] = RECALL_K, *,
                            chunk_size: int | None = None, device: str | torch.device = "cpu",
                            progress: bool = False) -> tuple[dict[str, float], dict[str, int]]:
    """``(metrics, counts)`` from L2-normalised ``query`` ``[Q, D]`` / ``gallery`` ``[G, D]``
    features and their identities; items whose identity is not on the other side are left out
    (``counts``: shared identities, images used and left out on each side)."""
    if len(query) != len(query_ids) or len(gallery) != len(gallery_ids):
        raise ValueError("one identity per feature row is needed on each side")
    q, g, shared = overlap(query_ids, gallery_ids)
    if not shared:
        raise ValueError(f"no identity is shared by the query ({len(query_ids)} images) and the gallery "
                         f"({len(gallery_ids)} images): nothing to retrieve")
    qid = [query_ids[i] for i in q]
    code = {k: n for n, k in enumerate(shared)}
    by_identity: dict[int, list[int]] = {}
    for col, i in enumerate(g):
        by_identity.setdefault(code[gallery_ids[i]], []).append(col)
    pairs = torch.tensor([(row, col) for row, k in enumerate(qid) for col in by_identity[code[k]]],
                         dtype=torch.long)
    ranks = text_image_ranks(query[q], gallery[g], pairs, chunk_size=chunk_size, device=device, progress=progress)
    metrics: dict[str, float] = {}
    for k in recall_k:
        q2g = (ranks.t2i < k).double().mean().item()
        g2q = (ranks.i2t < k).double().mean().item()
        metrics.update({f"q2g_recall@{k}": q2g, f"g2q_recall@{k}": g2q, f"recall@{k}": (q2g + g2q) / 2})
    counts = {"identities": len(shared), "query_used": len(q), "gallery_used": len(g),
              "query_unmatched": len(query_ids) - len(q), "gallery_unmatched": len(gallery_ids) - len(g)}
    return metrics, counts


def evaluate(model, query_loader, gallery_loader, device, amp: bool = False, recall_k: Sequence[int] = RECALL_K,
             progress: bool = False) -> dict[str, float]:
    """CLIP_benchmark-style ``evaluate`` for two ``(images, identities)`` loaders."""
    from .features import encode_images

    dev = torch.device(device)
    model.eval()

    def collect(loader):
        xs, ids = [], []
        for images, identity in loader:
            xs.append(encode_images(model, images, dev, amp)[0])
            ids.extend(identity.tolist() if torch.is_tensor(identity) else list(identity))
        return F.normalize(torch.cat(xs).float(), dim=-1), ids

    (xq, iq), (xg, ig) = collect(query_loader), collect(gallery_loader)
    return cross_retrieval_metrics(xq, xg, iq, ig, recall_k, device=device, progress=progress)[0]


def _folder_label(folder: Path) -> str:
    """``.../twemoji/images`` -> ``twemoji``; other folders: their own name."""
    folder = folder.resolve()
    return folder.parent.name if folder.name.lower() in ("images", "imgs", "img") else folder.name


def run_cross_retrieval(em: EvalModel, opts: RunOptions, query: str | Path, gallery: str | Path, *,
                        root: str | Path | None = None, name: str | None = None,
                        recall_k: Sequence[int] = RECALL_K) -> tuple[Path, dict[str, float]]:
    """``mmrl eval cross-retrieval``: two image folders (relative to ``root`` if given),
    cached ``encode_image`` features, ``<name>_cross_retrieval.json``."""
    from .datasets import ImageListDataset
    from .features import extract_image_features, model_fingerprint
    from .results import write_result

    base = Path(root) if root is not None else None
    sides = []
    for p in (Path(query), Path(gallery)):
        folder = base / p if base is not None and not p.is_absolute() else p
        items = read_identity_folder(folder)
        feats = extract_image_features(em.model, ImageListDataset(items.paths, em.preprocess), device=opts.device,
                                       amp=opts.amp, batch_size=opts.batch_size, num_workers=opts.num_workers,
                                       progress=opts.progress, cache_dir=opts.cache_dir, model_key=em.info.key,
                                       label=f"{_folder_label(folder)}-images")
        sides.append((items, feats.get("embedding", normalize=True)))
    (qi, xq), (gi, xg) = sides
    metrics, counts = cross_retrieval_metrics(xq, xg, qi.ids, gi.ids, recall_k, device=opts.device,
                                              progress=opts.progress)
    dataset = name or f"{_folder_label(qi.folder)}-{_folder_label(gi.folder)}"
    protocol = {
        "query": str(qi.folder), "gallery": str(gi.folder),
        "query_images": len(qi.paths), "gallery_images": len(gi.paths), **counts,
        "identity": {"query": qi.ids_source, "gallery": gi.ids_source},
        "features": "embedding", "features_description": "L2-normalised encode_image embedding",
        "similarity": "cosine",
        "positives": "images of the query's identity on the other side (identities present on one side only are "
                     "left out)",
        "directions": "q2g: each query ranks the gallery; g2q: each gallery image ranks the queries; "
                      "recall@K = mean of the two",
        "ties": TIE_RULE, "recall_k": list(recall_k),
    }
    path = write_result(opts.out_dir, dataset, "cross_retrieval", metrics, em.info, protocol,
                        fingerprint=model_fingerprint(em.model))
    return path, metrics


@dataclass
class CrossRetrievalTaskOptions(TaskOptions):
    """``mmrl eval cross-retrieval`` flags, the keys of a suite's ``task: cross-retrieval`` entry."""

    needs = (("query", "gallery"),)

    query: str | None = option(metavar="DIR", path="data", help="query image folder")
    gallery: str | None = option(metavar="DIR", path="data", help="gallery image folder")
    root: str | None = option(suite=False, help="folder --query / --gallery are relative to (default: as given)")
    name: str | None = option(help="dataset name in the result (default QUERY-GALLERY)")
    recall_k: list[int] = option(list(RECALL_K), metavar="K", help="recall cut-offs K of R@K")

    def validate(self) -> None:
        super().validate()
        self.require(bool(self.recall_k) and all(k >= 1 for k in self.recall_k), "recall_k", "positive integers")


def _run_task(em: EvalModel, opts: RunOptions, o: CrossRetrievalTaskOptions) -> tuple[Path, dict[str, float]]:
    from .retrieval import parse_ks

    return run_cross_retrieval(em, opts, o.query, o.gallery, root=o.root, name=o.name, recall_k=parse_ks(o.recall_k))


TASK = register(Task(
    name="cross-retrieval", result_task="cross_retrieval", title="cross-style image retrieval",
    help="cross-style image-to-image retrieval between two folders of the same identities (Recall@1/5/10 both ways)",
    description="cross-style image-to-image retrieval between two folders of the same identities (Recall@1/5/10 "
                "both ways). An image's identity is its file stem, or the 'concept' of its entry in a labels.json "
                "beside the folder; identities present in only one folder are left out.",
    options=CrossRetrievalTaskOptions, run=_run_task,
    headline=Headline("mean R@1, both directions", ("recall@1",)),
    metrics=(Metric("q2g_recall@1", "query→gallery R@1"), Metric("g2q_recall@1", "gallery→query R@1"),
             Metric("recall@1", "mean R@1"), Metric("recall@5", "mean R@5"),
             Metric("recall@10", "mean R@10", report=False)),
    recall_curve=recall_curve,
))
