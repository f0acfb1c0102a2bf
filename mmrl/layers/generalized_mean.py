"""Group Generalized Mean (GGeM) pooling over ViT tokens.

For tokens ``x`` of shape ``[B, N, C]`` (patch tokens only, no class token) and
``G`` exponents ``p`` (``C`` divisible by ``G``), channel ``c`` belongs to group
``g = c // (C / G)`` -- contiguous blocks, the same split as attention heads --
and is pooled as::

    f[b, c] = (mean_n clamp(x[b, n, c], eps) ** p[g]) ** (1 / p[g])

``G = 1`` is GeM, ``G = C`` is channel-wise GeM, ``p = 1`` is average pooling and
``p -> inf`` tends to max pooling.

Two implementations with the same maths:

* :func:`ggem_reference` -- the formula written with autograd ops (used by tests
  and the benchmark as the reference);
* :func:`ggem` -- a fused autograd Function: ``log2`` of the clamped input is taken
  once and the forward pass keeps, per element, only what the backward needs
  (``d f / d x``'s element-wise factor), so the backward is a single multiply.

The fused forward is numerically stable for any ``p > 0``: it pools ``x / max_n x``
(values in ``(0, 1]``, so ``r ** p`` neither overflows nor underflows to an all-zero
mean) and multiplies the max back, ``f = max_n(x) * mean_n(r ** p) ** (1 / p)``.
Computation is in float32 (float64 stays float64) whatever the autocast dtype; the
result is cast back to the input dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ggem", "ggem_reference", "GGeM", "GeM", "ChannelGeM", "clamp_p"]

_LN2 = math.log(2.0)


def _check(x: torch.Tensor, p: torch.Tensor) -> int:
    if x.dim() != 3:
        raise ValueError(f"ggem: expected tokens of shape [B, N, C], got {tuple(x.shape)}")
    if p.dim() != 1 or p.numel() == 0:
        raise ValueError(f"ggem: expected p of shape [G], got {tuple(p.shape)}")
    channels, groups = x.shape[-1], p.numel()
    if channels % groups:
        raise ValueError(f"ggem: groups={groups} does not divide channels={channels}")
    return channels // groups


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ggem_reference(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GGeM written directly from the formula (autograd does the backward)."""
    group_size = _check(x, p)
    dtype = _compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        pc = p.to(dtype).repeat_interleave(group_size)
        pooled = x.to(dtype).clamp(min=eps).pow(pc).mean(dim=1).pow(1.0 / pc)
    return pooled.to(x.dtype)


# On CPU the forward works through the batch in slices of about this many elements,
# so its four working buffers are reused across slices and stay in cache (fresh
# full-size temporaries cost page faults and DRAM round trips on every pass).
_CPU_SLICE_ELEMENTS = 1 << 19


def _fused_forward(x: torch.Tensor, pc: torch.Tensor, eps: float, need_x_grad: bool, need_p_grad: bool):
    """Stable GGeM forward; also returns what the fused backward needs (or None).

    Returns ``out`` ``[B, C]``, ``m = E_n[(x/max)^p]``, ``s = E_n[(x/max)^p ln(x/max)]``
    (only if ``need_p_grad``) and ``z = (x/max)^p / clamp(x)`` masked to zero where
    ``x < eps`` (only if ``need_x_grad``).
    """
    batch, n_tokens, channels = x.shape
    step = batch
    if x.device.type == "cpu":
        step = max(1, min(batch, _CPU_SLICE_ELEMENTS // max(1, n_tokens * channels)))
    work = torch.empty((4, step, n_tokens, channels), dtype=x.dtype, device=x.device)
    lmax = x.new_empty((batch, 1, channels))
    m = x.new_empty((batch, channels))
    s = x.new_empty((batch, channels)) if need_p_grad else None
    z = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x_grad else None
    for lo in range(0, batch, step):
        hi = min(batch, lo + step)
        xc, log_x, y, tmp = (buf[: hi - lo] for buf in work)
        xb = x[lo:hi]
        torch.clamp_min(xb, eps, out=xc)
        torch.log2(xc, out=log_x)                               # the one logarithm per element
        torch.amax(log_x, dim=1, keepdim=True, out=lmax[lo:hi])
        # (x / max) ** p = 2 ** (p * log2 x - p * log2 max), in (0, 1]
        torch.addcmul(lmax[lo:hi] * -pc, log_x, pc, out=y).exp2_()
        torch.mean(y, dim=1, out=m[lo:hi])                      # >= 1 / N
        if need_p_grad:  # sum_n y * log2 x; with lmax and m it gives E_n[y * ln(x / max)]
            torch.sum(torch.mul(y, log_x, out=tmp), dim=1, out=s[lo:hi])
        if need_x_grad:  # element factor of d f / d x: y / clamp(x), zero where clamped
            torch.div(y, xc, out=z[lo:hi])
            z[lo:hi].mul_(torch.ge(xb, eps, out=tmp))
    lmax = lmax.squeeze(1)
    out = torch.exp2(lmax) * m.pow(1.0 / pc)
    if s is not None:
        s.div_(n_tokens).sub_(lmax * m).mul_(_LN2)
    return out, m, s, z


class _GGeMFunction(torch.autograd.Function):
    """Fused GGeM over per-channel exponents ``pc`` (``[C]``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pc: torch.Tensor, eps: float):
        out, m, s, z = _fused_forward(x, pc, eps, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(z, m, out, pc, s)
        ctx.n_tokens = x.shape[1]
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, m, out, pc, s = ctx.saved_tensors
        grad_x = grad_pc = None
        if ctx.needs_input_grad[0]:
            # d f / d x[n] = f / (N m) * y[n] / x[n]
            grad_x = z * (grad_out * out / (ctx.n_tokens * m)).unsqueeze(1)
        if ctx.needs_input_grad[1]:
            # d f / d p = f / p * (E[y ln r] / m - ln(m) / p)
            dfdp = out / pc * (s / m - torch.log(m) / pc)
            grad_pc = (grad_out * dfdp).sum(dim=0)
        return grad_x, grad_pc, None


def ggem(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused GGeM: ``x`` ``[B, N, C]`` (no class token), ``p`` ``[G]`` positive; returns ``[B, C]``."""
    group_size = _check(x, p)
    dtype = _compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        pc = p.to(dtype).repeat_interleave(group_size)
        xf = x.to(dtype)
        if torch.is_grad_enabled() and (xf.requires_grad or pc.requires_grad):
            pooled = _GGeMFunction.apply(xf, pc, float(eps))
        else:  # inference: nothing kept for a backward
            pooled = _fused_forward(xf, pc, float(eps), False, False)[0]
    return pooled.to(x.dtype)


class _ClampMinProjected(torch.autograd.Function):
    """``p.clamp(min=lo)`` whose gradient still reaches ``p`` when it points back up.

    A plain clamp has zero gradient below ``lo``, so an exponent pushed under the
    bound could never come back; a plain straight-through estimator lets it drift
    arbitrarily far below.  Here the gradient passes where ``p >= lo`` or where a
    descent step would increase ``p`` (``grad < 0``).
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, lo: float):
        ctx.save_for_backward(p)
        ctx.lo = lo
        return p.clamp(min=lo)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (p,) = ctx.saved_tensors
        keep = (p >= ctx.lo) | (grad < 0)
        return grad * keep, None


def clamp_p(p: torch.Tensor, p_min: float = 1.0) -> torch.Tensor:
    """The exponent actually used: ``max(p, p_min)``, with the projected gradient above."""
    return _ClampMinProjected.apply(p, p_min)


class GGeM(nn.Module):
    """GGeM pooling module: ``[B, N, C]`` -> ``[B, C]`` with one learnable ``p`` per group.

    Args:
        dim: channels ``C``.
        groups: number of groups ``G`` (must divide ``dim``); channel ``c`` uses ``p[c // (C/G)]``.
        p_init: initial exponent (3.0, as in GeM and the GGeM paper).
        eps: clamp floor applied before the power (inputs may be signed).
        learn_p: if False, ``p`` is kept as a frozen parameter (same state-dict key).
        p_min: lower bound applied to ``p`` in forward (default 1: never below average
            pooling); see :func:`clamp_p`.
        fused: use the fused autograd Function (default) or the reference formula.
    """

    def __init__(
        self,
        dim: int,
        groups: int,
        p_init: float = 3.0,
        eps: float = 1e-6,
        learn_p: bool = True,
        p_min: float = 1.0,
        fused: bool = True,
    ):
        super().__init__()
        if groups < 1 or dim % groups:
            raise ValueError(f"GGeM: groups={groups} must be >= 1 and divide dim={dim}")
        if p_init < p_min:
            raise ValueError(f"GGeM: p_init={p_init} is below p_min={p_min}")
        if eps <= 0:
            raise ValueError(f"GGeM: eps must be > 0, got {eps}")
        self.dim, self.groups, self.eps, self.p_min, self.fused = dim, groups, eps, p_min, fused
        self.p = nn.Parameter(torch.full((groups,), float(p_init)), requires_grad=learn_p)

    def effective_p(self) -> torch.Tensor:
        return clamp_p(self.p, self.p_min)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = ggem if self.fused else ggem_reference
        return fn(x, self.effective_p(), self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}, eps={self.eps}, p_min={self.p_min}, fused={self.fused}"


def GeM(dim: int, **kwargs) -> GGeM:
    """Generalized mean pooling: a single exponent shared by all channels (GGeM with G=1)."""
    return GGeM(dim, groups=1, **kwargs)


def ChannelGeM(dim: int, **kwargs) -> GGeM:
    """Channel-wise GeM: one exponent per channel (GGeM with G=C)."""
    return GGeM(dim, groups=dim, **kwargs)
