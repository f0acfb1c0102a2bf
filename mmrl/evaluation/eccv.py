"""ECCV Caption and CxC metrics on the COCO 5K test through the ``eccv_caption`` package.

``eccv_caption`` (PyPI ``eccv-caption``, MIT, Chun et al. 2022) ships the ECCV Caption and
CxC positives keyed by COCO image ids and COCO caption (annotation) ids. They apply only when the
annotation file carries those ids -- CLIP_benchmark's ``coco_test_karpathy.json`` (COCO captions
format) does; Karpathy's ``dataset_coco.json`` numbers its sentences itself and does not -- and
every id the package asks about is in the evaluated set. Rankings are passed as top-50 lists
(enough for ECCV mAP@R, R-Precision and R@1, and CxC R@1/5/10; not for its COCO-1K recalls,
which mmrl computes itself).
"""
from __future__ import annotations

import torch

from .annotations import RetrievalAnnotations
from .ranking import topk_stable

__all__ = ["eccv_metrics", "TOP_K", "TARGET_METRICS"]

TOP_K = 50
TARGET_METRICS = ("eccv_r1", "eccv_map_at_r", "eccv_rprecision", "cxc_recalls")


def eccv_metrics(ann: RetrievalAnnotations, text_emb: torch.Tensor, image_emb: torch.Tensor, *,
                 device: str = "cpu") -> tuple[dict[str, float], str]:
    """``(metrics, note)``; metrics are empty and the note says why when they do not apply.
    Names: ``eccv_map_at_r_i2t`` / ``_t2i``, ``eccv_rprecision_*``, ``eccv_r1_*``, ``cxc_r{1,5,10}_*``
    (``i2t`` = image-to-text = text retrieval)."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "failed to import ujson"
            from eccv_caption import Metrics
    except ImportError:
        return {}, "not computed: the eccv_caption package is not installed (pip install eccv-caption)"
    if not ann.coco_caption_ids or ann.caption_ids is None:
        return {}, "not applicable: the annotation file has no COCO caption ids (use coco_test_karpathy.json)"
    metrics = Metrics()
    image_ids, caption_ids = set(ann.image_ids), set(ann.caption_ids)
    for gts in (metrics.eccv_gts, metrics.cxc_gts):
        if not set(gts["i2t"]) <= image_ids or not set(gts["t2i"]) <= caption_ids:
            return {}, "not applicable: the ids are not those of the COCO 5K (Karpathy) test"
    t2i_top = topk_stable(text_emb, image_emb, TOP_K, device=device)
    i2t_top = topk_stable(image_emb, text_emb, TOP_K, device=device)
    img_ids, cap_ids = list(ann.image_ids), list(ann.caption_ids)
    t2i = {cap_ids[j]: [img_ids[i] for i in row] for j, row in enumerate(t2i_top.tolist())}
    i2t = {img_ids[i]: [cap_ids[j] for j in row] for i, row in enumerate(i2t_top.tolist())}
    scores = metrics.compute_all_metrics(i2t, t2i, target_metrics=TARGET_METRICS, Ks=(1, 5, 10), verbose=False)
    out = {f"{name}_{direction}": float(value)
           for name, by_dir in scores.items() for direction, value in by_dir.items()}
    return out, f"computed with eccv_caption from top-{TOP_K} rankings: {', '.join(TARGET_METRICS)}"
