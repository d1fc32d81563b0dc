"""Triton kernels for manifold-constrained hyper-connections (mHC): pre-mix with the in-kernel Sinkhorn,
post-mix, and the final head collapse.

Goldens: `ops/reference/mhc.py`; maths: model-spec.md §5. All mixing maths in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_to, next_pow2

_BLOCK_F = 512  # flattened n*D elements per step of the projection loop
_BLOCK_D = 256  # channels per step of the output loops


@triton.jit
def _hc_collapse_kernel(x_ptr, fn_ptr, base_ptr, scale_ptr, y_ptr, post_ptr, comb_ptr, NS, D, norm_eps, hc_eps,
                        sinkhorn_iters, stride_xt, stride_yt,
                        FULL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    # One program = one token. FULL (hc_pre): fn has (2+n)n rows -> pre, post and the Sinkhorn-normalised
    # comb; otherwise (hc_head): fn has n rows -> pre only. Then y = sum_i pre_i * x_i.
    t = tl.program_id(0).to(tl.int64)
    ND = NS * D
    i = tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_N)
    im, jm = i < NS, j < NS
    m2 = im[:, None] & jm[None, :]
    crow = 2 * NS + i[:, None] * NS + j[None, :]  # fn row of comb[i, j]
    xrow = x_ptr + t * stride_xt  # x[t] is a contiguous [n, D] block, read flattened (u = flatten(x))

    # 1. projection of u onto the fn rows, and sum(u^2) for the RMS normalisation
    acc_pre = tl.zeros([BLOCK_N], tl.float32)
    acc_post = tl.zeros([BLOCK_N], tl.float32)
    acc_comb = tl.zeros([BLOCK_N, BLOCK_N], tl.float32)
    ssq = tl.zeros([BLOCK_F], tl.float32)
    for f0 in range(0, ND, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fm = f < ND
        u = tl.load(xrow + f, mask=fm, other=0.0).to(tl.float32)
        ssq += u * u
        w = tl.load(fn_ptr + i[:, None] * ND + f[None, :], mask=im[:, None] & fm[None, :], other=0.0)
        acc_pre += tl.sum(w * u[None, :], axis=1)
        if FULL:
            w = tl.load(fn_ptr + (NS + i)[:, None] * ND + f[None, :], mask=im[:, None] & fm[None, :], other=0.0)
            acc_post += tl.sum(w * u[None, :], axis=1)
            w3 = tl.load(fn_ptr + crow[:, :, None] * ND + f[None, None, :], mask=m2[:, :, None] & fm[None, None, :],
                         other=0.0)
            acc_comb += tl.sum(w3 * u[None, None, :], axis=2)
    rs = 1.0 / tl.sqrt(tl.sum(ssq, axis=0) / ND + norm_eps)

    pre = tl.sigmoid(acc_pre * rs * tl.load(scale_ptr) + tl.load(base_ptr + i, mask=im, other=0.0)) + hc_eps
    if FULL:
        post = 2.0 * tl.sigmoid(acc_post * rs * tl.load(scale_ptr + 1) + tl.load(base_ptr + NS + i, mask=im,
                                                                                   other=0.0))
        tl.store(post_ptr + t * NS + i, post, mask=im)
        c = acc_comb * rs * tl.load(scale_ptr + 2) + tl.load(base_ptr + crow, mask=m2, other=0.0)
        # Sinkhorn (model-spec.md §5.1): row softmax + eps, column step, then (row, column) pairs.
        # Padding rows / columns are held at 0 so they never enter a sum.
        c = tl.where(m2, c, float("-inf"))
        rmax = tl.where(im, tl.max(c, axis=1), 0.0)
        p = tl.where(m2, tl.exp(c - rmax[:, None]), 0.0)
        c = p / tl.where(im, tl.sum(p, axis=1), 1.0)[:, None] + tl.where(m2, hc_eps, 0.0)
        c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
        for _ in range(sinkhorn_iters - 1):
            c = c / (tl.sum(c, axis=1)[:, None] + hc_eps)
            c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
        tl.store(comb_ptr + t * NS * NS + i[:, None] * NS + j[None, :], c, mask=m2)

    # 2. y = sum_i pre_i * x_i over D in BLOCK_D steps (x[t] is re-read; it is in cache)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        xs = tl.load(xrow + i[:, None] * D + d[None, :], mask=im[:, None] & dm[None, :], other=0.0).to(tl.float32)
        y = tl.sum(pre[:, None] * xs, axis=0)
        tl.store(y_ptr + t * stride_yt + d, cast_to(y, y_ptr.dtype.element_ty), mask=dm)


def _collapse(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
              hc_eps: float, sinkhorn_iters: int, full: bool):
    T, n, D = x.shape
    x = x.contiguous()
    fn, base, scale = fn.float().contiguous(), base.float().contiguous(), scale.float().contiguous()
    y = torch.empty((T, D), dtype=x.dtype, device=x.device)
    post = torch.empty((T, n), dtype=torch.float32, device=x.device)
    comb = torch.empty((T, n, n), dtype=torch.float32, device=x.device)
    if T > 0 and n > 0 and D > 0:
        _hc_collapse_kernel[(T,)](x, fn, base, scale, y, post, comb, n, D, float(norm_eps), float(hc_eps),
                                  int(sinkhorn_iters), x.stride(0), y.stride(0), FULL=full,
                                  BLOCK_N=next_pow2(n), BLOCK_F=_BLOCK_F, BLOCK_D=min(_BLOCK_D, next_pow2(D)))
    return y, post, comb


def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
           hc_eps: float, sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton hc_pre: x [T, n, D] -> (y [T, D] x.dtype, post [T, n] fp32, comb [T, n, n] fp32).

    One program per token: RMS-normalised projection on fn [(2+n)n, nD], sigmoids, the Sinkhorn
    iterations on the n x n matrix in registers, then the weighted collapse of the n streams.
    """
    return _collapse(x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters, full=True)


def hc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
            hc_eps: float) -> torch.Tensor:
    """Triton hc_head: x [T, n, D], fn [n, nD], base [n], scale [1] -> [T, D] x.dtype (one program per token)."""
    return _collapse(x, fn, base, scale, norm_eps, hc_eps, 0, full=False)[0]


@triton.jit
def _hc_post_kernel(f_ptr, res_ptr, post_ptr, comb_ptr, out_ptr, NS, D, stride_ft, stride_rt,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program = one token x BLOCK_D channels: out[j] = post_j * f + sum_i comb[i, j] * res[i].
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i = tl.arange(0, BLOCK_N)
    im, dm = i < NS, d < D
    res = tl.load(res_ptr + t * stride_rt + i[:, None] * D + d[None, :], mask=im[:, None] & dm[None, :],
                  other=0.0).to(tl.float32)  # [n(i), BD]
    c = tl.load(comb_ptr + t * NS * NS + i[:, None] * NS + i[None, :], mask=im[:, None] & im[None, :], other=0.0)
    mixed = tl.sum(c.to(tl.float32)[:, :, None] * res[:, None, :], axis=0)  # [n(j), BD], sum over source i
    post = tl.load(post_ptr + t * NS + i, mask=im, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + t * stride_ft + d, mask=dm, other=0.0).to(tl.float32)
    out = post[:, None] * f[None, :] + mixed
    tl.store(out_ptr + t * stride_rt + i[:, None] * D + d[None, :], cast_to(out, out_ptr.dtype.element_ty),
             mask=im[:, None] & dm[None, :])


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Triton hc_post: f [T, D], residual [T, n, D], post [T, n], comb [T, n, n] -> [T, n, D] residual.dtype.

    Grid (T, ceil(D / BLOCK_D)): no reduction across D, so decode batches still fill the device.
    """
    T, n, D = residual.shape
    residual = residual.contiguous()
    f, post, comb = f.contiguous(), post.contiguous(), comb.contiguous()
    out = torch.empty_like(residual)
    if T == 0 or n == 0 or D == 0:
        return out
    block_d = min(_BLOCK_D, next_pow2(D))
    _hc_post_kernel[(T, triton.cdiv(D, block_d))](f, residual, post, comb, out, n, D, f.stride(0),
                                                   residual.stride(0), BLOCK_N=next_pow2(n), BLOCK_D=block_d)
    return out
