"""Ranking metrics against brute force (random and tie-heavy embeddings), hand-computed cases,
and CLIP_benchmark's own recall_at_k on the same scores."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmrl.evaluation.image_retrieval import image_retrieval_metrics
from mmrl.evaluation.ranking import first_positive_rank, row_chunks, text_image_ranks, topk_stable
from mmrl.evaluation.retrieval import caption_pairs, retrieval_metrics
from mmrl.evaluation.zeroshot import classification_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


# --- brute-force references: sort every row of the full matrix (stable: ties by index) -----------

def brute_rank(row, positives, valid=None):
    cands = [j for j in range(len(row)) if valid is None or valid[j]]
    order = sorted(cands, key=lambda j: (-row[j], j))
    for r, j in enumerate(order):
        if j in positives:
            return r
    return len(row)


def brute_retrieval(S, owner, pairs, ks, fold=None):
    """S: captions x images (list of lists); fold: image fold ids or None."""
    n_t, n_i = len(S), len(S[0])
    pos_t = [set() for _ in range(n_t)]
    pos_i = [set() for _ in range(n_i)]
    for j, i in pairs:
        if fold is None or fold[i] == fold[owner[j]]:
            pos_t[j].add(i)
            pos_i[i].add(j)
    cols = [[S[j][i] for j in range(n_t)] for i in range(n_i)]
    if fold is None:
        t2i = [brute_rank(S[j], pos_t[j]) for j in range(n_t)]
        i2t = [brute_rank(cols[i], pos_i[i]) for i in range(n_i)]
    else:
        t2i = [brute_rank(S[j], pos_t[j], [fold[i] == fold[owner[j]] for i in range(n_i)]) for j in range(n_t)]
        i2t = [brute_rank(cols[i], pos_i[i], [fold[owner[j]] == fold[i] for j in range(n_t)]) for i in range(n_i)]
    return t2i, i2t


def unit(n, d, gen):
    return F.normalize(torch.randn(n, d, generator=gen), dim=-1)


def dyadic(n, d, gen):
    """Small integers: every dot product is exact in float32 whatever the summation order, and
    many scores tie exactly."""
    return torch.randint(-2, 3, (n, d), generator=gen).float()


@pytest.mark.parametrize("make", [unit, dyadic])
@pytest.mark.parametrize("shared", [False, True])
def test_text_image_ranks_equal_brute_force_for_any_chunk_size(make, shared):
    gen = torch.Generator().manual_seed(1)
    n_i, n_t = 40, 130
    images, texts = make(n_i, 8, gen), make(n_t, 8, gen)
    owner = torch.randint(0, n_i, (n_t,), generator=gen).tolist()
    owner[:n_i] = list(range(n_i))  # every image has a caption
    captions = [f"caption {j % 90}" for j in range(n_t)]  # some identical texts under several images
    pairs = caption_pairs(owner, captions, shared=shared)
    S = (texts @ images.T).tolist()
    want_t2i, want_i2t = brute_retrieval(S, owner, pairs.tolist(), (1, 5, 10))
    fold = [i // 10 for i in range(n_i)]
    want_t2i_f, want_i2t_f = brute_retrieval(S, owner, pairs.tolist(), (1, 5, 10), fold)
    image_fold = torch.tensor(fold)
    for chunk in (None, 17, 32, 64, 1000):
        r = text_image_ranks(texts, images, pairs, image_fold=image_fold, text_fold=image_fold[owner], chunk_size=chunk)
        assert r.t2i.tolist() == want_t2i, chunk
        assert r.i2t.tolist() == want_i2t, chunk
        assert r.t2i_fold.tolist() == want_t2i_f, chunk
        assert r.i2t_fold.tolist() == want_i2t_f, chunk


def test_hand_computed_ties_and_several_captions_per_image():
    # images A=0, B=1; captions 0,1 describe A, caption 2 describes B. Scores (caption x image):
    S = torch.tensor([[0.5, 0.5],    # tie: A (index 0) ranks first -> hit@1
                      [0.2, 0.9],    # B first -> miss@1, hit@2
                      [0.7, 0.7]])   # tie: A ranks first -> B second -> miss@1
    owner = [0, 0, 1]
    pos = torch.zeros(3, 2, dtype=torch.bool)
    pos[[0, 1, 2], owner] = True
    assert first_positive_rank(S, pos).tolist() == [0, 1, 1]
    # image -> text: A's column [0.5, 0.2, 0.7]: caption 2 (not A's) first, then caption 0 -> rank 1
    #                B's column [0.5, 0.9, 0.7]: caption 1 first, 2 second -> rank 1
    assert first_positive_rank(S.T, pos.T).tolist() == [1, 1]


def test_hand_computed_recall_values():
    # 2-d embeddings chosen so that the score matrix is known exactly
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0],    # A first            -> rank 0
                          [0.0, 1.0],    # B first, A is 2nd  -> caption of A: rank 1
                          [0.0, 1.0],    # B first            -> rank 0 (caption of B)
                          [1.0, 0.0]])   # A first, C last    -> caption of C: rank 2
    owner = [0, 0, 1, 2]
    m = retrieval_metrics(texts, images, owner, recall_k=(1, 2, 3))
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 4)
    assert m["image_retrieval_recall@2"] == pytest.approx(3 / 4)
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    # image A: captions 0 (1.0, A's), 3 (1.0), 1 (0), 2 (0) -> rank 0
    # image B: captions 1 (1.0, A's) and 2 (1.0, B's) tie; index order puts 1 first -> rank 1
    # image C: scores -1, 0, 0, -1 -> captions 1, 2, then 0 and 3 (C's) tie at -1 -> rank 3
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@3"] == pytest.approx(2 / 3)


def test_rsum_and_folds():
    gen = torch.Generator().manual_seed(3)
    images, texts = unit(40, 16, gen), unit(80, 16, gen)
    owner = [j // 2 for j in range(80)]
    m = retrieval_metrics(texts, images, owner, fold_size=10)
    assert m["rsum"] == pytest.approx(100 * sum(m[f"{d}_retrieval_recall@{k}"]
                                                for d in ("image", "text") for k in (1, 5, 10)))
    # fold metrics = mean over folds of the metrics of each 10-image sub-problem
    per_fold = []
    for f in range(4):
        sel_i = list(range(10 * f, 10 * f + 10))
        sel_t = [j for j in range(80) if owner[j] // 10 == f]
        per_fold.append(retrieval_metrics(texts[sel_t], images[sel_i], [owner[j] - 10 * f for j in sel_t]))
    for key in per_fold[0]:
        assert m[f"fold10_{key}"] == pytest.approx(sum(p[key] for p in per_fold) / 4)


def test_equals_clip_benchmark_recall_at_k_on_the_same_scores():
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    gen = torch.Generator().manual_seed(7)
    images, texts = unit(200, 32, gen), unit(1000, 32, gen)
    owner = [j // 5 for j in range(1000)]
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(1000), owner] = True
    ours = retrieval_metrics(texts, images, owner, chunk_size=64)
    for k in (1, 5, 10):
        t2i = (batchify(recall_at_k, scores, positive, 64, "cpu", k=k) > 0).float().mean().item()
        i2t = (batchify(recall_at_k, scores.T, positive.T, 64, "cpu", k=k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(t2i, abs=1e-7)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(i2t, abs=1e-7)


def brute_image_retrieval(x, labels, ks):
    S = (x @ x.T).tolist()
    n = len(labels)
    hits, maps = {k: [] for k in ks}, []
    for q in range(n):
        order = sorted((j for j in range(n) if j != q), key=lambda j: (-S[q][j], j))
        rel = [labels[j] == labels[q] for j in order]
        R = sum(rel)
        if R == 0:
            continue
        first = rel.index(True)
        for k in ks:
            hits[k].append(first < k)
        maps.append(sum(sum(rel[:i + 1]) / (i + 1) for i in range(R) if rel[i]) / R)
    return {**{f"recall@{k}": sum(h) / len(h) for k, h in hits.items()}, "map@r": sum(maps) / len(maps)}


@pytest.mark.parametrize("make", [unit, dyadic])
def test_image_retrieval_equals_brute_force(make):
    gen = torch.Generator().manual_seed(5)
    x = make(90, 6, gen)
    labels = torch.randint(0, 8, (90,), generator=gen)
    labels[-1] = 99  # a singleton: no positive, left out
    want = brute_image_retrieval(x, labels.tolist(), (1, 2, 4, 8))
    for chunk in (None, 20, 33):
        got, counts = image_retrieval_metrics(x, labels, chunk_size=chunk)
        assert counts == {"queries": 89, "queries_without_positives": 1}
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (key, chunk)


def test_map_at_r_hand_computed():
    # 1-d features: query 0 (label a) sees 1 (a, 0.9), 2 (b, 0.8), 3 (a, 0.7) -> R=2,
    # relevant at ranks 1 and 3: MAP@R = (1/2) * (1/1 + 0) = 0.5 (rank 3 > R is not counted)
    x = torch.tensor([[1.0, 0.0], [0.9, 0.43589], [0.8, 0.6], [0.7, 0.71414]])
    x = F.normalize(x, dim=-1)
    labels = torch.tensor([0, 0, 1, 0])
    from mmrl.evaluation.ranking import image_to_image_ranks

    ranks, n_pos, maps = image_to_image_ranks(x, labels)
    assert n_pos.tolist() == [2, 2, 0, 2]
    assert maps[0].item() == pytest.approx(0.5)
    assert math.isnan(maps[2].item())


@pytest.mark.parametrize("make", [unit, dyadic])
def test_topk_lists_are_stable_and_chunk_independent(make):
    gen = torch.Generator().manual_seed(2)
    images, texts = make(30, 4, gen), make(70, 4, gen)
    S = (texts @ images.T).tolist()
    want_rows = [sorted(range(30), key=lambda i: (-S[j][i], i))[:7] for j in range(70)]
    want_cols = [sorted(range(70), key=lambda j: (-S[j][i], j))[:7] for i in range(30)]
    for chunk in (None, 16, 25):
        assert topk_stable(texts, images, 7, chunk_size=chunk).tolist() == want_rows
        assert topk_stable(images, texts, 7, chunk_size=chunk).tolist() == want_cols


def test_row_chunks_never_leave_a_tiny_tail():
    blocks = list(row_chunks(1025, 256))
    assert blocks[0] == (0, 256) and blocks[-1] == (768, 1025)
    assert sum(b - a for a, b in blocks) == 1025


def test_classification_metrics_match_sklearn_and_break_ties_by_class_index():
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 12, generator=gen)
    target = torch.randint(0, 12, (300,), generator=gen)
    m = classification_metrics(logits, target)
    assert m["acc1"] == pytest.approx((logits.argmax(1) == target).double().mean().item())
    assert m["acc5"] == pytest.approx(top_k_accuracy_score(target, logits, k=5, labels=list(range(12))))
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(target, logits.argmax(1)))
    # ties: all logits equal -> class 0 ranks first, so only class-0 targets are top-1 hits
    flat = torch.zeros(4, 6)
    m = classification_metrics(flat, torch.tensor([0, 1, 4, 5]))
    assert m["acc1"] == 0.25 and m["acc5"] == 0.75 and m["mean_per_class_recall"] == 0.25
    # fewer than 5 classes: no acc5
    assert "acc5" not in classification_metrics(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]))
