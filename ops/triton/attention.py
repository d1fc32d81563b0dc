"""Triton kernels for sparse MQA with a sink, lightning-indexer scores + top-k, and KV-compressor pooling.

Goldens: `ops/reference/attention.py`; maths: model-spec.md §4.4–4.6. Each launcher takes the reference's
arguments and returns the reference's result (same shape and dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_to, dot_in_fp32, e8m0_to_f32, fp8e4m3_to_f32, mma, next_pow2

_SCORE_BUFFER_ELEMS = 1 << 24  # indexer: at most 16M fp32 scores (64 MiB) alive at once


# ---------------------------------------------------------------------------------------------- sparse_attn
@triton.jit
def _decode_entries(kv_ptr, ix, valid, d, stride_kv, D, NOPE: tl.constexpr, ROPE_OFF: tl.constexpr,
                    SCALE_OFF: tl.constexpr, SCALE_BLOCK_: tl.constexpr):
    """fp32 [BK, BD] rows of the FP8 cache entries `ix` (invalid rows and columns >= D read as 0): e4m3 byte x
    2^(UE8M0 - 127) for the nope dims, two little-endian bytes -> bf16 for the rope dims. Only integer ops and
    bitcasts (no fp8 dtype), like the GEMM decoders in `_common.py`."""
    base = kv_ptr + ix[:, None] * stride_kv
    is_nope = d < NOPE
    nope_m = valid[:, None] & is_nope[None, :]
    rope_m = valid[:, None] & ((d >= NOPE) & (d < D))[None, :]
    dn = tl.where(is_nope, d, 0)  # keep masked-off addresses inside the entry
    dr = tl.where(is_nope, 0, d - NOPE)
    code = tl.load(base + dn[None, :], mask=nope_m, other=0)
    sb = tl.load(base + SCALE_OFF + (dn // SCALE_BLOCK_)[None, :], mask=nope_m, other=127)
    nope = fp8e4m3_to_f32(code) * e8m0_to_f32(sb)
    # two byte loads rather than a bf16 pointer cast: triton-ascend rejects casts between pointer widths
    lo = tl.load(base + ROPE_OFF + 2 * dr[None, :], mask=rope_m, other=0).to(tl.int32)
    hi = tl.load(base + ROPE_OFF + 2 * dr[None, :] + 1, mask=rope_m, other=0).to(tl.int32)
    rope = ((lo | (hi << 8)) << 16).to(tl.float32, bitcast=True)  # bf16 bits in the top half of an fp32
    return tl.where(is_nope[None, :], nope, rope)


@triton.jit
def _sparse_attn_kernel(q_ptr, kv_ptr, idx_ptr, sink_ptr, out_ptr, H, D, K, scale,
                        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh,
                        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        F32: tl.constexpr, FP8_ENTRY: tl.constexpr = False, NOPE: tl.constexpr = 0,
                        ROPE_OFF: tl.constexpr = 0, SCALE_OFF: tl.constexpr = 0, SCALE_BLOCK_: tl.constexpr = 64):
    # One program = one query row t x BLOCK_H heads; walks the row's K indices in BLOCK_K chunks with an
    # fp32 online softmax. The sink is a logit with zero value: it seeds the running max and denominator.
    # FP8_ENTRY: kv holds FP8 cache entries (sparse_attn_fp8.py), decoded in registers as they are gathered.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hm, dm = h < H, d < D
    q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :], mask=hm[:, None] & dm[None, :],
                other=0.0)
    m_i = tl.load(sink_ptr + h, mask=hm, other=0.0).to(tl.float32)  # running max starts at the sink
    l_i = tl.full([BLOCK_H], 1.0, tl.float32)  # exp(sink - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ix = tl.load(idx_ptr + t * stride_it + kk, mask=kk < K, other=-1).to(tl.int64)
        valid = ix >= 0
        if FP8_ENTRY:
            rows = _decode_entries(kv_ptr, tl.where(valid, ix, 0), valid, d, stride_kv, D, NOPE, ROPE_OFF,
                                   SCALE_OFF, SCALE_BLOCK_)  # [BK, BD] fp32, exact in bf16
        else:
            rows = tl.load(kv_ptr + ix[:, None] * stride_kv + d[None, :], mask=valid[:, None] & dm[None, :],
                           other=0.0)  # [BK, BD], K = V
        s = mma(q, tl.trans(rows), F32) * scale  # [BH, BK]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p, rows, F32)
        m_i = m_new
    out = acc / l_i[:, None]  # a row with no valid key gives 0 (only the sink term in the denominator)
    tl.store(out_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :], cast_to(out, out_ptr.dtype.element_ty),
             mask=hm[:, None] & dm[None, :])


def sparse_attn_config(H: int, D: int, K: int) -> dict[str, int]:
    """Block shapes: 16 heads x all of D per program (32 KiB fp32 accumulator at D = 512)."""
    return {"BLOCK_H": 16, "BLOCK_K": 32 if D > 128 else 64, "BLOCK_D": next_pow2(D, 16)}


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Triton sparse_attn: q [T, H, D], kv [N, D], idx [T, K] (-1 = skip), sink [H] -> [T, H, D] q.dtype.

    Decode (one query per row) and prefill (T rows) use the same kernel; grid = (T, ceil(H / 16)).
    """
    return launch_sparse_attn(q, kv, idx, sink, scale, dot_in_fp32(q, kv))


def launch_sparse_attn(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float,
                       f32: bool, **entry) -> torch.Tensor:
    """Run `_sparse_attn_kernel` (entry: the FP8-entry constexprs, empty for plain kv rows)."""
    T, H, D = q.shape
    K = idx.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv.contiguous()
    idx = idx.contiguous()
    sink = sink.float().contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if T == 0 or H == 0:
        return out
    cfg = sparse_attn_config(H, D, K)
    grid = (T, triton.cdiv(H, cfg["BLOCK_H"]))
    _sparse_attn_kernel[grid](q, kv, idx, sink, out, H, D, K, float(scale),
                              q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), out.stride(0), out.stride(1),
                              F32=f32, **entry, **cfg)
    return out


# ---------------------------------------------------------------------------------------------- indexer_topk
@triton.jit
def _indexer_scores_kernel(q_ptr, k_ptr, w_ptr, start_ptr, len_ptr, out_ptr, t0, NH, DI, S_BUF,
                           stride_qt, stride_qh, stride_kn, stride_wt, stride_ot,
                           BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                           F32: tl.constexpr):
    # One program = one query x BLOCK_S keys of its own range: out[r, j] = score(t0 + r, k_start + j),
    # -inf for j >= k_len. Column j is relative to the query's k_start, so the buffer is [rows, max k_len]
    # whatever the spread of sequences in the batch.
    r = tl.program_id(0)
    t = (t0 + r).to(tl.int64)
    j = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    start = tl.load(start_ptr + t)
    n = tl.load(len_ptr + t)
    jm = j < n
    d = tl.arange(0, BLOCK_D)
    dm = d < DI
    keys = tl.load(k_ptr + (start + j)[:, None] * stride_kn + d[None, :], mask=jm[:, None] & dm[None, :],
                   other=0.0)  # [BS, BD]
    acc = tl.zeros([BLOCK_S], tl.float32)
    for h0 in range(0, NH, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hm = h < NH
        qh = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :], mask=hm[:, None] & dm[None, :],
                     other=0.0)
        wh = tl.load(w_ptr + t * stride_wt + h, mask=hm, other=0.0).to(tl.float32)
        s = mma(qh, tl.trans(keys), F32)  # [BH, BS]
        acc += tl.sum(tl.maximum(s, 0.0) * wh[:, None], axis=0)
    acc = tl.where(jm, acc, float("-inf"))
    tl.store(out_ptr + r * stride_ot + j, acc, mask=j < S_BUF)


def indexer_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, k_start: torch.Tensor, k_len: torch.Tensor,
                 topk: int) -> torch.Tensor:
    """Triton indexer_topk: scores in [BLOCK_S]-key tiles by a kernel, then a stable torch.sort on a bounded
    buffer for the selection (not in-kernel).

    q [T, h, d], k [N, d], w [T, h], k_start / k_len [T] int64 -> [T, topk] int64 rows of `k`, best first
    (ties: lower row first), -1 where fewer are visible. Queries are processed in chunks so at most 16M
    scores are alive at once ([chunk, max k_len]); [T, S] is never materialised. One host sync per call
    (max k_len).
    """
    T, NH, DI = q.shape
    out = torch.full((T, topk), -1, dtype=torch.long, device=q.device)
    if T == 0 or k.shape[0] == 0 or topk == 0:
        return out
    k_start = k_start.long().contiguous()
    k_len = k_len.long().clamp_min(0).contiguous()
    s_max = int(k_len.max())  # the one sync
    if s_max == 0:
        return out
    q, k, w = q.contiguous(), k.contiguous(), w.contiguous()
    block_s = 64 if DI > 64 else 128
    rows = max(1, min(T, _SCORE_BUFFER_ELEMS // s_max))
    buf = torch.empty((rows, s_max), dtype=torch.float32, device=q.device)
    keep = min(topk, s_max)
    cfg = {"BLOCK_H": min(64, next_pow2(NH, 16)), "BLOCK_S": block_s, "BLOCK_D": next_pow2(DI, 16)}
    for t0 in range(0, T, rows):
        n = min(rows, T - t0)
        grid = (n, triton.cdiv(s_max, block_s))
        _indexer_scores_kernel[grid](q, k, w, k_start, k_len, buf, t0, NH, DI, s_max,
                                     q.stride(0), q.stride(1), k.stride(0), w.stride(0), buf.stride(0),
                                     F32=dot_in_fp32(q, k), **cfg)
        # Column order = row order, so a stable descending sort ranks equal scores lower row first, as the
        # reference does (ties are common once q and k are FP4-rounded).
        vals, order = torch.sort(buf[:n], dim=-1, descending=True, stable=True)
        vals, sel = vals[:, :keep], order[:, :keep] + k_start[t0:t0 + n, None]
        out[t0:t0 + n, :keep] = torch.where(torch.isfinite(vals), sel, torch.full_like(sel, -1))
    return out


# ---------------------------------------------------------------------------------------------- compress_kv
@triton.jit
def _compress_kv_kernel(kv_ptr, score_ptr, out_ptr, L, D, stride_kn, stride_kl, stride_sn, stride_sl, stride_on,
                        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program = one entry x BLOCK_D channels; softmax over the L slots independently per channel.
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    sl = tl.arange(0, BLOCK_L)
    mask = (sl[:, None] < L) & (d[None, :] < D)
    s = tl.load(score_ptr + n * stride_sn + sl[:, None] * stride_sl + d[None, :], mask=mask,
                other=float("-inf")).to(tl.float32)
    s = tl.where(d[None, :] < D, s, 0.0)  # padding channels: keep the softmax finite (never stored)
    v = tl.load(kv_ptr + n * stride_kn + sl[:, None] * stride_kl + d[None, :], mask=mask, other=0.0).to(tl.float32)
    m = tl.max(s, axis=0)
    p = tl.exp(s - m[None, :])  # unused (-inf) slots get weight 0
    out = tl.sum(p * v, axis=0) / tl.sum(p, axis=0)
    tl.store(out_ptr + n * stride_on + d, out, mask=d < D)


def compress_kv(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Triton compress_kv: kv, score [N, L, d] -> [N, d] fp32 (per-channel softmax over L, weighted sum)."""
    N, L, D = kv.shape
    out = torch.empty((N, D), dtype=torch.float32, device=kv.device)
    if N == 0 or D == 0:
        return out
    kv, score = kv.contiguous(), score.contiguous()
    block_l = next_pow2(L)
    block_d = max(16, min(128, 8192 // block_l))  # <= 8K elements per tile (L = 128 -> 64 channels)
    grid = (N, triton.cdiv(D, block_d))
    _compress_kv_kernel[grid](kv, score, out, L, D, kv.stride(0), kv.stride(1), score.stride(0), score.stride(1),
                              out.stride(0), BLOCK_L=block_l, BLOCK_D=block_d)
    return out
