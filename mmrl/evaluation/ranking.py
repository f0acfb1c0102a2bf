"""Exact ranking metrics computed in chunks of query rows, so memory stays bounded.

Every metric here is defined on one score matrix ``S`` (queries x candidates) and on the
**stable descending order** of each row: candidates are sorted by score, highest first, and
candidates with equal scores keep their index order (``torch.sort(descending=True,
stable=True)``). The *rank* of a query is the number of candidates ranked before its first
positive (0 = a positive is first); a query is a hit at ``K`` when its rank is ``< K`` -- the
CLIP-paper Recall@K (a query counts if *any* positive is in the top K), which is what
CLIP_benchmark's ``(recall_at_k(...) > 0).mean()`` computes when no scores tie.

The chunked functions read each score exactly once per pass and only compare it with
per-query or per-candidate values, so their result does not depend on the chunk size: it equals
the same rule applied to the full matrix, ties included. Score blocks are computed as
``queries[a:b] @ candidates.T`` (row chunks of one matrix product; for text-image retrieval the
image-to-text direction reads the same text-row blocks, so both directions see the same numbers,
as CLIP_benchmark's ``scores`` / ``scores.T`` do).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..progress import progress as progress_bar

__all__ = [
    "TIE_RULE", "chunk_rows", "row_chunks", "first_positive_rank", "TextImageRanks", "text_image_ranks",
    "single_positive_rank", "recall_at", "image_to_image_ranks", "topk_stable",
]

TIE_RULE = ("stable descending order of each score row: equal scores are ordered by candidate index "
            "(rank = #candidates scoring higher + #equal-scoring candidates with a lower index)")
DEFAULT_BUDGET = 64 << 20  # bytes of per-chunk score-block temporaries
_MIN_TAIL = 16              # a last chunk smaller than this is merged into the previous one


def chunk_rows(n_rows: int, n_cols: int, budget_bytes: int = DEFAULT_BUDGET, bytes_per_cell: int = 24) -> int:
    """Rows per chunk so that ``rows x n_cols`` cells of temporaries fit ``budget_bytes``."""
    rows = budget_bytes // max(1, n_cols * bytes_per_cell)
    return int(max(32, min(max(n_rows, 1), rows)))


def row_chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` blocks of ``size`` rows covering ``range(n)``; a short tail (< 16 rows)
    joins the previous block, so no block is a single row (a matrix-vector product may round
    differently from the matrix-matrix product it is a row of)."""
    size = max(1, int(size))
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] < _MIN_TAIL:
        starts.pop()
    for i, a in enumerate(starts):
        yield a, (starts[i + 1] if i + 1 < len(starts) else n)


def first_positive_rank(scores: torch.Tensor, positive: torch.Tensor,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``scores`` ``[Q, N]``: the number of candidates ranked before the first
    positive (stable descending order, see :data:`TIE_RULE`); ``N`` for a row without positives.

    ``valid`` (bool ``[Q, N]`` or broadcastable) restricts the candidates of each row."""
    if valid is not None:
        positive = positive & valid
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    best = torch.where(positive, scores, neg_inf).amax(dim=1, keepdim=True)
    cols = torch.arange(scores.shape[1], device=scores.device)
    # first (lowest-index) positive holding the best score
    first = torch.where(positive & (scores == best), cols, scores.shape[1]).amin(dim=1, keepdim=True)
    before = (scores > best) | ((scores == best) & (cols < first))
    if valid is not None:
        before &= valid
    rank = before.sum(dim=1)
    return torch.where(positive.any(dim=1), rank, torch.full_like(rank, scores.shape[1]))


def recall_at(ranks: torch.Tensor, k: int) -> float:
    """Fraction of queries whose first positive is in the top ``k``."""
    return (ranks < k).double().mean().item() if ranks.numel() else float("nan")


@dataclass
class TextImageRanks:
    """Ranks of the first positive: ``t2i`` per caption (over images), ``i2t`` per image (over
    captions); ``*_fold`` the same within each image's fold (``None`` without folds)."""

    t2i: torch.Tensor
    i2t: torch.Tensor
    t2i_fold: torch.Tensor | None = None
    i2t_fold: torch.Tensor | None = None


def _best_positive(scores: torch.Tensor, pt: torch.Tensor, pi: torch.Tensor, a: int,
                   n_images: int, best: torch.Tensor, best_row: torch.Tensor) -> None:
    """Update per-image (best positive score, lowest caption index holding it) in place from
    the positive pairs ``(pt, pi)`` whose caption lies in this row block."""
    if pt.numel() == 0:
        return
    vals = scores[pt - a, pi]
    cur = torch.full((n_images,), float("-inf"), dtype=scores.dtype, device=scores.device)
    cur = cur.scatter_reduce(0, pi, vals, "amax", include_self=True)
    big = torch.iinfo(torch.long).max
    cand = torch.where(vals == cur[pi], pt, torch.full_like(pt, big))
    cur_row = torch.full((n_images,), big, dtype=torch.long, device=scores.device)
    cur_row = cur_row.scatter_reduce(0, pi, cand, "amin", include_self=True)
    better = (cur > best) | ((cur == best) & (cur_row < best_row))
    best.copy_(torch.where(better, cur, best))
    best_row.copy_(torch.where(better, cur_row, best_row))


def single_positive_rank(scores: torch.Tensor, pos_col: torch.Tensor) -> torch.Tensor:
    """:func:`first_positive_rank` for rows with exactly one positive, column ``pos_col[r]``:
    two comparison passes, the exact tie rule only on rows where the positive's score is tied."""
    best = scores.gather(1, pos_col[:, None])
    gt = (scores > best).sum(dim=1, dtype=torch.int32)
    ge = (scores >= best).sum(dim=1, dtype=torch.int32)
    rank = gt.long()
    tied = ((ge - gt) > 1).nonzero().flatten()
    if tied.numel():
        sub, b = scores[tied], best[tied]
        cols = torch.arange(scores.shape[1], device=scores.device)
        rank[tied] = ((sub > b) | ((sub == b) & (cols < pos_col[tied, None]))).sum(dim=1)
    return rank


def _count_before_columns(scores: torch.Tensor, rows: torch.Tensor, best: torch.Tensor,
                          best_row: torch.Tensor) -> torch.Tensor:
    """Per column ``c``: rows (global indices ``rows``) ranked before ``(best[c], best_row[c])``
    in the stable order -- score higher, or equal with a lower row index."""
    gt = (scores > best).sum(dim=0, dtype=torch.int32)
    ge = (scores >= best).sum(dim=0, dtype=torch.int32)
    count = gt.long()
    cols = ((ge - gt) > 0).nonzero().flatten()  # an equal score in this block: apply the index rule
    if cols.numel():
        sub, b, br = scores[:, cols], best[cols], best_row[cols]
        count[cols] = ((sub > b) | ((sub == b) & (rows[:, None] < br))).sum(dim=0)
    return count


def text_image_ranks(text_emb: torch.Tensor, image_emb: torch.Tensor, pairs: torch.Tensor, *,
                     image_fold: torch.Tensor | None = None, text_fold: torch.Tensor | None = None,
                     chunk_size: int | None = None, device: str | torch.device = "cpu",
                     progress: bool = False) -> TextImageRanks:
    """Ranks for both directions of text-image retrieval from embeddings (already normalised).

    ``pairs`` ``[P, 2]`` lists the positive (caption index, image index) pairs. Scores are
    ``text_emb @ image_emb.T``, computed in blocks of caption rows twice: the first pass gives
    caption->image ranks and each image's best positive caption, the second counts, for each
    image, the captions ranked before that best positive. With ``image_fold`` / ``text_fold``
    (fold id per image / caption) the fold-restricted ranks (e.g. COCO 1K) come from the same
    passes, on the sub-blocks of each fold: candidates and positives outside the query's fold
    are ignored."""
    device = torch.device(device)
    n_texts, n_images = text_emb.shape[0], image_emb.shape[0]
    images = image_emb.to(device)
    pairs = pairs.to(device=device, dtype=torch.long)
    order = torch.argsort(pairs[:, 0], stable=True)
    pt_all, pi_all = pairs[order, 0], pairs[order, 1]
    bounds = torch.searchsorted(pt_all, torch.arange(n_texts + 1, device=device))
    single = bool((bounds[1:] - bounds[:-1] == 1).all())  # one positive image per caption
    folds = image_fold is not None
    if folds:
        image_fold, text_fold = image_fold.to(device), text_fold.to(device)
        same = text_fold[pt_all] == image_fold[pi_all]
        fold_cols = {int(f): (image_fold == f).nonzero().flatten() for f in image_fold.unique()}
        local = torch.empty(n_images, dtype=torch.long, device=device)
        for cols in fold_cols.values():
            local[cols] = torch.arange(len(cols), device=device)
    size = chunk_size or chunk_rows(n_texts, n_images, bytes_per_cell=8)
    t2i = torch.empty(n_texts, dtype=torch.long)
    t2i_f = torch.full((n_texts,), n_images, dtype=torch.long) if folds else None
    none = torch.iinfo(torch.long).max
    best = torch.full((n_images,), float("-inf"), dtype=images.dtype, device=device)
    best_row = torch.full((n_images,), none, dtype=torch.long, device=device)
    best_f, best_row_f = (best.clone(), best_row.clone()) if folds else (None, None)

    blocks = list(row_chunks(n_texts, size))
    bar = progress_bar(total=2 * len(blocks), desc="ranking", unit="block", enabled=progress, leave=False)
    for a, b in blocks:  # pass 1: caption -> image ranks, best positive caption of each image
        s = text_emb[a:b].to(device) @ images.T
        lo, hi = bounds[a].item(), bounds[b].item()
        pt, pi = pt_all[lo:hi], pi_all[lo:hi]
        if single:
            t2i[a:b] = single_positive_rank(s, pi).cpu()
        else:
            pos = torch.zeros_like(s, dtype=torch.bool)
            pos[pt - a, pi] = True
            t2i[a:b] = first_positive_rank(s, pos).cpu()
            del pos
        _best_positive(s, pt, pi, a, n_images, best, best_row)
        if folds:
            keep = same[lo:hi]
            _best_positive(s, pt[keep], pi[keep], a, n_images, best_f, best_row_f)
            tf = text_fold[a:b]
            for f in tf.unique().tolist():
                rows = (tf == f).nonzero().flatten()
                cols = fold_cols[f]
                sub = s.index_select(0, rows).index_select(1, cols)
                pos = torch.zeros_like(sub, dtype=torch.bool)
                sel = keep & (text_fold[pt] == f)
                pos[_row_pos(rows, pt[sel] - a), local[pi[sel]]] = True
                t2i_f[(a + rows).cpu()] = first_positive_rank(sub, pos).cpu()
        bar.update()
    count = torch.zeros(n_images, dtype=torch.long, device=device)
    count_f = torch.zeros(n_images, dtype=torch.long, device=device) if folds else None
    for a, b in blocks:  # pass 2: captions ranked before each image's best positive
        s = text_emb[a:b].to(device) @ images.T
        rows = torch.arange(a, b, device=device)
        count += _count_before_columns(s, rows, best, best_row)
        if folds:
            tf = text_fold[a:b]
            for f in tf.unique().tolist():
                r = (tf == f).nonzero().flatten()
                cols = fold_cols[f]
                sub = s.index_select(0, r).index_select(1, cols)
                count_f[cols] += _count_before_columns(sub, rows[r], best_f[cols], best_row_f[cols])
        bar.update()
    bar.close()
    i2t = torch.where(best_row < none, count, torch.full_like(count, n_texts)).cpu()
    i2t_f = torch.where(best_row_f < none, count_f, torch.full_like(count_f, n_texts)).cpu() if folds else None
    return TextImageRanks(t2i, i2t, t2i_f, i2t_f)


def _row_pos(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Position of each of ``values`` in the sorted index tensor ``rows``."""
    return torch.searchsorted(rows, values)


def image_to_image_ranks(emb: torch.Tensor, labels: torch.Tensor, *, map_at_r: bool = True,
                         chunk_size: int | None = None, device: str | torch.device = "cpu",
                         progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each item queries all the others (itself excluded); positives share its label.

    Returns ``(rank, n_positives, map_at_r)`` per query: the rank of the first positive (``N``
    when the query has no positive), the number of positives ``R``, and MAP@R (Musgrave et al.
    2020: ``(1/R) sum_{i<=R} P@i * rel_i`` over the stable descending order; NaN when ``R=0``)."""
    device = torch.device(device)
    n = emb.shape[0]
    x = emb.to(device)
    labels = labels.to(device)
    size = chunk_size or chunk_rows(n, n, bytes_per_cell=40)
    ranks = torch.empty(n, dtype=torch.long)
    n_pos = torch.empty(n, dtype=torch.long)
    maps = torch.full((n,), float("nan"), dtype=torch.float64)
    blocks = list(row_chunks(n, size))
    bar = progress_bar(total=len(blocks), desc="ranking", unit="block", enabled=progress, leave=False)
    for a, b in blocks:
        s = x[a:b] @ x.T
        rows = torch.arange(a, b, device=device)
        s[rows - a, rows] = float("-inf")  # a query never retrieves itself
        pos = labels[a:b, None] == labels[None, :]
        pos[rows - a, rows] = False
        valid = torch.ones_like(pos)
        valid[rows - a, rows] = False
        ranks[a:b] = first_positive_rank(s, pos, valid).cpu()
        r = pos.sum(dim=1)
        n_pos[a:b] = r.cpu()
        r_max = int(r.max().item()) if r.numel() else 0
        if map_at_r and r_max > 0:
            order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :r_max]
            rel = (labels[order] == labels[a:b, None]).double()
            within = torch.arange(1, r_max + 1, device=device)[None, :] <= r[:, None]
            prec = rel.cumsum(dim=1) / torch.arange(1, r_max + 1, device=device, dtype=torch.float64)
            ap = (prec * rel * within).sum(dim=1) / r.clamp(min=1)
            maps[a:b] = torch.where(r > 0, ap, torch.full_like(ap, float("nan"))).cpu()
        bar.update()
    bar.close()
    return ranks, n_pos, maps


def _stable_topk_block(s: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` column indices of each row of ``s`` in the stable descending order."""
    vals, idx = torch.topk(s, k, dim=1)
    # order the k winners by (score desc, index asc): sort by index, then stable by score
    by_index = torch.sort(idx, dim=1).indices
    idx, vals = idx.gather(1, by_index), vals.gather(1, by_index)
    idx = idx.gather(1, torch.sort(vals, dim=1, descending=True, stable=True).indices)
    # rows with more than k scores >= the k-th value: ties at the cut, resolved by a full stable sort
    cut = (s >= vals.amin(dim=1, keepdim=True)).sum(dim=1)
    tied = (cut > k).nonzero().flatten()
    if tied.numel():
        idx[tied] = torch.sort(s[tied], dim=1, descending=True, stable=True).indices[:, :k]
    return idx


def topk_stable(query: torch.Tensor, cand: torch.Tensor, k: int, *, chunk_size: int | None = None,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """Indices ``[Q, k]`` of each query's top-``k`` candidates in the stable descending order
    (``query @ cand.T`` in row blocks)."""
    device = torch.device(device)
    c = cand.to(device)
    k = min(k, c.shape[0])
    out = torch.empty(query.shape[0], k, dtype=torch.long)
    for a, b in row_chunks(query.shape[0], chunk_size or chunk_rows(query.shape[0], c.shape[0], bytes_per_cell=8)):
        out[a:b] = _stable_topk_block(query[a:b].to(device) @ c.T, k).cpu()
    return out
