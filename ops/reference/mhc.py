"""Reference manifold-constrained hyper-connections (mHC, model-spec.md §5). All mixing maths in fp32."""

from __future__ import annotations

import torch


def _f32(t: torch.Tensor) -> torch.Tensor:
    # .float() on an fp32 tensor returns it but still costs a dispatch; decode runs ~13 of these ops a step
    return t if t.dtype == torch.float32 else t.float()


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _mix(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    # Unweighted RMS-normalised projection of the flattened streams: (u . fn^T) * rsqrt(mean(u^2) + eps).
    u = _f32(x.flatten(-2))  # [T, n*D]
    return (u @ _f32(fn).t()) * torch.rsqrt(u.square().mean(-1, keepdim=True) + norm_eps)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
           hc_eps: float, sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse n residual streams into one block input and compute the post / comb mixing weights.

    x [T, n, D]; fn [(2+n)*n, n*D], base [(2+n)*n], scale [3] (fp32).
    Returns (y [T, D] in x.dtype, post [T, n] fp32 in (0, 2), comb [T, n, n] fp32 ~doubly stochastic).
    """
    return hc_pre_using(sinkhorn, x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters)


def hc_pre_using(sinkhorn, x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                 norm_eps: float, hc_eps: float, sinkhorn_iters: int):
    """`hc_pre` with the given Sinkhorn normalisation (`sinkhorn` below; the CPU kernel passes its own)."""
    n = x.shape[1]
    mix = _mix(x, fn, norm_eps)  # [T, (2+n)*n]
    b, s = _f32(base), _f32(scale)
    pre = torch.sigmoid(mix[:, :n] * s[0] + b[:n]) + hc_eps
    post = 2 * torch.sigmoid(mix[:, n:2 * n] * s[1] + b[n:2 * n])
    comb = (mix[:, 2 * n:] * s[2] + b[2 * n:]).view(-1, n, n)
    comb = sinkhorn(torch.softmax(comb, dim=-1) + hc_eps, hc_eps, sinkhorn_iters)
    y = _as((pre.unsqueeze(-1) * _f32(x)).sum(1), x.dtype)
    return y, post, comb


def sinkhorn(comb: torch.Tensor, hc_eps: float, iters: int) -> torch.Tensor:
    """Sinkhorn normalisation of the row-softmaxed comb [T, n, n] fp32: a column normalisation, then `iters` - 1
    (row, column) pairs, ending on columns (20 steps for V4)."""
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    return comb


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Expand a block output back to n streams: X'_j = post_j * f + sum_i comb[i, j] * X_i.

    f [T, D]; residual [T, n, D]; post [T, n]; comb [T, n, n]. Returns [T, n, D] in residual.dtype.
    The sum runs over the *source* index i (comb transposed): comb is not symmetric.
    """
    mixed = torch.bmm(_f32(comb).transpose(1, 2), _f32(residual))  # "tij,tid->tjd" without einsum's parsing
    return _as(_f32(post).unsqueeze(-1) * _f32(f).unsqueeze(1) + mixed, residual.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
            hc_eps: float) -> torch.Tensor:
    """Final collapse of the n streams: sum_i (sigmoid(mix_i * scale + base_i) + eps) * X_i.

    x [T, n, D]; fn [n, n*D]; base [n]; scale [1]. Returns [T, D] in x.dtype.
    """
    pre = torch.sigmoid(_mix(x, fn, norm_eps) * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(1).to(x.dtype)

