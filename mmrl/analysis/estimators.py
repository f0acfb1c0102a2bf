"""Dependence estimators between two sets of features of the same ``n`` samples (pure functions).

Notation: ``X`` ``[n, d1]``, ``Y`` ``[n, d2]``; ``K``, ``L`` their ``n x n`` Gram matrices. Everything
is computed in float64 whatever the input dtype.

* :func:`hsic_unbiased` -- Song et al. (2012)'s unbiased HSIC with Gaussian kernels
  ``exp(-||a - b||^2 / (2 sigma^2))`` at the median heuristic (``sigma`` = the median distance between
  distinct samples, per input); the diagonals are zeroed explicitly (needs ``n >= 4``). It does not
  depend on the scale of either input (the bandwidth follows it).
* :func:`linear_cka` -- Kornblith et al. (2019)'s linear CKA, ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F
  ||Yc^T Yc||_F)`` with column-centred inputs; ``debiased=True`` uses U-centred Gram matrices instead
  (Szekely-Rizzo), whose ratio is the unbiased HSIC's.
* :class:`CovarianceAccumulator` -- minibatch accumulation of ``sum x``, ``sum x x^T``: the linear CKA
  between any two blocks of channels (:func:`block_cka`) is then exactly the full-data value, in
  ``O(C^2)`` memory whatever ``n``.
* :func:`hsic_permutation_pvalue` -- a permutation test of independence with the HSIC statistic.
"""
from __future__ import annotations

import torch

__all__ = ["gaussian_gram", "median_bandwidth", "linear_gram", "hsic_unbiased_gram", "hsic_unbiased",
           "u_centre", "linear_cka", "CovarianceAccumulator", "block_cka", "hsic_permutation_pvalue",
           "off_diagonal_mean"]


def _f64(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2:
        raise ValueError(f"{name}: expected features of shape [n, d], got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def _same_n(x: torch.Tensor, y: torch.Tensor, least: int) -> int:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must describe the same samples: {x.shape[0]} vs {y.shape[0]} rows")
    if x.shape[0] < least:
        raise ValueError(f"need at least {least} samples, got {x.shape[0]}")
    return x.shape[0]


def _sq_dists(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min_(0.0)


def median_bandwidth(x: torch.Tensor) -> float:
    """The median Euclidean distance between distinct rows of ``x`` (1.0 when all rows coincide)."""
    x = _f64(x, "median_bandwidth")
    d2 = _sq_dists(x)
    n = x.shape[0]
    off = d2[~torch.eye(n, dtype=torch.bool)]
    sigma = float(off.median().sqrt()) if off.numel() else 0.0
    return sigma if sigma > 0 else 1.0


def gaussian_gram(x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """``K[i, j] = exp(-||x_i - x_j||^2 / (2 sigma^2))``; ``sigma`` defaults to :func:`median_bandwidth`."""
    x = _f64(x, "gaussian_gram")
    sigma = median_bandwidth(x) if sigma is None else float(sigma)
    return torch.exp(-_sq_dists(x) / (2.0 * sigma * sigma))


def linear_gram(x: torch.Tensor) -> torch.Tensor:
    x = _f64(x, "linear_gram")
    return x @ x.T


def hsic_unbiased_gram(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741 - the papers' name
    """Unbiased HSIC of two ``n x n`` Gram matrices (their diagonals are ignored)."""
    n = k.shape[0]
    if k.shape != (n, n) or l.shape != (n, n):
        raise ValueError(f"hsic: expected two n x n Gram matrices, got {tuple(k.shape)} and {tuple(l.shape)}")
    if n < 4:
        raise ValueError(f"hsic: the unbiased estimator needs at least 4 samples, got {n}")
    kt = k.to(torch.float64).clone().fill_diagonal_(0.0)
    lt = l.to(torch.float64).clone().fill_diagonal_(0.0)
    trace = (kt * lt.T).sum()
    sums = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (kt.sum(0) @ lt.sum(1))
    return float((trace + sums - cross) / (n * (n - 3)))


def hsic_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased HSIC between ``x`` and ``y`` with Gaussian kernels at the median bandwidth."""
    x, y = _f64(x, "hsic X"), _f64(y, "hsic Y")
    _same_n(x, y, 4)
    return hsic_unbiased_gram(gaussian_gram(x), gaussian_gram(y))


def u_centre(k: torch.Tensor) -> torch.Tensor:
    """The U-centred Gram matrix (Szekely and Rizzo 2014): zero diagonal, rows/columns corrected."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"u_centre: needs at least 4 samples, got {n}")
    k = k.to(torch.float64).clone().fill_diagonal_(0.0)
    rows = k.sum(0)
    u = k - rows[:, None] / (n - 2) - rows[None, :] / (n - 2) + k.sum() / ((n - 1) * (n - 2))
    return u.fill_diagonal_(0.0)


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA between ``x`` and ``y`` (0 when either is constant)."""
    x, y = _f64(x, "cka X"), _f64(y, "cka Y")
    _same_n(x, y, 4 if debiased else 2)
    if debiased:
        kx, ky = u_centre(x @ x.T), u_centre(y @ y.T)
        num, dx, dy = (kx * ky).sum(), (kx * kx).sum().sqrt(), (ky * ky).sum().sqrt()
    else:
        x, y = x - x.mean(0), y - y.mean(0)
        num = (y.T @ x).pow(2).sum()
        dx, dy = (x.T @ x).pow(2).sum().sqrt(), (y.T @ y).pow(2).sum().sqrt()
    den = dx * dy
    return float(num / den) if den > 0 else 0.0


class CovarianceAccumulator:
    """Running ``n``, ``sum x`` and ``sum x x^T`` of ``[batch, C]`` feature batches (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = _f64(x, "CovarianceAccumulator")
        if self.sum is None:
            self.sum, self.outer = x.sum(0), x.T @ x
        else:
            if x.shape[1] != self.sum.shape[0]:
                raise ValueError(f"CovarianceAccumulator: {x.shape[1]} channels after {self.sum.shape[0]}")
            self.sum += x.sum(0)
            self.outer += x.T @ x
        self.n += x.shape[0]

    def centred(self) -> torch.Tensor:
        """``Xc^T Xc`` of everything seen (``C x C``)."""
        if self.sum is None or self.n < 2:
            raise ValueError("CovarianceAccumulator: needs at least 2 samples")
        return self.outer - torch.outer(self.sum, self.sum) / self.n


def block_cka(centred: torch.Tensor, groups: int) -> torch.Tensor:
    """``G x G`` linear CKA between the ``groups`` contiguous channel blocks of a centred ``Xc^T Xc``."""
    c = centred.shape[0]
    if groups < 1 or c % groups:
        raise ValueError(f"block_cka: groups={groups} does not divide channels={c}")
    s = c // groups
    blocks = centred.reshape(groups, s, groups, s).permute(0, 2, 1, 3)   # [g, h, s, s]
    sq = blocks.pow(2).sum((-1, -2))                                   # ||Xg^T Xh||_F^2
    norms = sq.diagonal().sqrt()
    den = norms[:, None] * norms[None, :]
    return torch.where(den > 0, sq / den.clamp_min(1e-300), torch.zeros_like(sq))


def hsic_permutation_pvalue(x: torch.Tensor, y: torch.Tensor, permutations: int = 200, seed: int = 0) -> float:
    """p-value of "x and y independent": the share of row permutations of ``y`` whose unbiased HSIC
    reaches the observed one (with the observed counted once, so never 0)."""
    x, y = _f64(x, "hsic X"), _f64(y, "hsic Y")
    _same_n(x, y, 4)
    k, l = gaussian_gram(x), gaussian_gram(y)  # noqa: E741
    observed = hsic_unbiased_gram(k, l)
    gen = torch.Generator().manual_seed(seed)
    hits = 0
    for _ in range(permutations):
        perm = torch.randperm(l.shape[0], generator=gen)
        hits += hsic_unbiased_gram(k, l[perm][:, perm]) >= observed
    return (hits + 1) / (permutations + 1)


def off_diagonal_mean(matrix: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (nan for 1 x 1)."""
    g = matrix.shape[0]
    if g < 2:
        return float("nan")
    return float(matrix[~torch.eye(g, dtype=torch.bool)].to(torch.float64).mean())
