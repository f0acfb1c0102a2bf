"""ECCV Caption / CxC metrics through ``eccv_caption`` (skipped when the package is not installed),
cross-checked against mmrl's own COCO 5K recalls on the package's real COCO test ids."""
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmrl.evaluation.annotations import RetrievalAnnotations
from mmrl.evaluation.eccv import eccv_metrics
from mmrl.evaluation.ranking import topk_stable
from mmrl.evaluation.retrieval import retrieval_metrics

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    eccv_caption = pytest.importorskip("eccv_caption")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def coco_5k():
    """The COCO 5K test ids shipped with eccv_caption (5,000 images x 5 captions) with synthetic
    embeddings: each caption is its image's embedding plus noise."""
    data = Path(eccv_caption.__file__).parent / "data"
    i2t = json.loads((data / "original_image_to_caption.json").read_text())
    image_ids = [int(k) for k in i2t]
    owner, caption_ids = [], []
    for n, k in enumerate(i2t):
        for c in i2t[k]:
            owner.append(n)
            caption_ids.append(int(c))
    ann = RetrievalAnnotations(Path("coco_test_karpathy.json"), "coco", "mscoco_captions", "test",
                               [f"{i}.jpg" for i in image_ids], [f"caption {c}" for c in caption_ids], owner,
                               image_ids, caption_ids, "coco-5k", coco_caption_ids=True)
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(len(image_ids), 32, generator=g), dim=-1)
    texts = F.normalize(images[owner] + 0.35 * torch.randn(len(owner), 32, generator=g), dim=-1)
    return ann, images, texts


def test_eccv_and_cxc_metrics_on_the_coco_ids(coco_5k):
    ann, images, texts = coco_5k
    metrics, note = eccv_metrics(ann, texts, images)
    assert note.startswith("computed with eccv_caption")
    for name in ("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_r1", "cxc_r5", "cxc_r10"):
        for direction in ("i2t", "t2i"):
            assert 0.0 <= metrics[f"{name}_{direction}"] <= 1.0
    assert 0.0 < metrics["eccv_map_at_r_t2i"] < 1.0  # synthetic embeddings know only the original pairs


def test_eccv_coco_5k_recalls_equal_ours(coco_5k):
    ann, images, texts = coco_5k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = eccv_caption.Metrics()
    t2i_top, i2t_top = topk_stable(texts, images, 10), topk_stable(images, texts, 10)
    t2i = {ann.caption_ids[j]: [ann.image_ids[i] for i in row] for j, row in enumerate(t2i_top.tolist())}
    i2t = {ann.image_ids[i]: [ann.caption_ids[j] for j in row] for i, row in enumerate(i2t_top.tolist())}
    ours = retrieval_metrics(texts, images, ann.caption_image, fold_size=1000)
    for k in (1, 5, 10):
        want = ref.coco_5k_recalls({"i2t": i2t, "t2i": t2i}, "all", K=k)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(want["i2t"], abs=1e-12)
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(want["t2i"], abs=1e-12)
    assert 0.1 < ours["image_retrieval_recall@1"] < 0.9  # not a degenerate case


def test_not_applicable_without_coco_caption_ids(coco_5k):
    ann, images, texts = coco_5k
    karpathy = RetrievalAnnotations(ann.path, "karpathy", ann.name, "test", ann.images, ann.captions,
                                    ann.caption_image, ann.image_ids, list(range(len(ann.captions))), "coco-5k")
    metrics, note = eccv_metrics(karpathy, texts, images)
    assert metrics == {} and "no COCO caption ids" in note
    other = RetrievalAnnotations(ann.path, "coco", ann.name, "test", ann.images[:10], ann.captions[:50],
                                 ann.caption_image[:50], ann.image_ids[:10], ann.caption_ids[:50], None,
                                 coco_caption_ids=True)
    metrics, note = eccv_metrics(other, texts[:50], images[:10])
    assert metrics == {} and "not those of the COCO 5K" in note
