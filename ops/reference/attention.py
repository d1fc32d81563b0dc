"""Reference sparse attention and lightning-indexer top-k (model-spec.md §4.5, §4.6).

These are the CPU implementations *and* the goldens that device kernels are tested against. They chunk
over queries so memory stays bounded by `chunk x keys`, never `T x S`.
"""

from __future__ import annotations

import torch

# Queries per chunk. 128 rather than 256: in a batched prefill a chunk spans fewer sequences, so the union of
# the keys its queries see (the dense product of `sparse_attn`) wastes less (6 layers of 16 x 128: 0.38 -> 0.25 s).
_Q_CHUNK = 128


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                scale: float) -> torch.Tensor:
    """MQA over a shared K=V latent with an index list per query and a per-head sink logit.

    q [T, H, D]; kv [N, D] (K and V are the same rows); idx [T, K] int (row numbers into kv, -1 = skip);
    sink [H] fp32. Softmax in fp32 with the sink in the denominator only. Returns [T, H, D] in q.dtype.
    """
    T, H, D = q.shape
    out = torch.empty_like(q)
    sink = sink.float().view(1, H, 1)
    for t0 in range(0, T, _Q_CHUNK):
        t1 = min(T, t0 + _Q_CHUNK)
        ix = idx[t0:t1].long()  # [t, K]
        valid = ix >= 0
        qc = q[t0:t1].float()
        used = ix[valid]
        uniq, inv = torch.unique(used, return_inverse=True) if used.numel() else (used, used)
        if 0 < uniq.numel() <= 4 * ix.shape[1]:
            # The chunk's queries share most of their keys (prefill of one sequence; decode with K rows each):
            # gather each distinct row once and run a masked dense product over them, a plain GEMM, much
            # cheaper than gathering [t, K, D] copies.
            keys = kv[uniq].float()  # [U, D]
            col = torch.full_like(ix, uniq.numel())
            col[valid] = inv
            mask = torch.zeros(t1 - t0, uniq.numel() + 1, dtype=torch.bool, device=q.device)
            mask.scatter_(1, col, True)
            mask = mask[:, :-1]  # drop the column that collected the -1 slots
            s = torch.einsum("thd,rd->thr", qc, keys) * scale
            s = s.masked_fill(~mask[:, None, :], float("-inf"))
            prod = "thr,rd->thd"
        else:
            keys = kv[ix.clamp_min(0)].float()  # [t, K, D]
            s = torch.einsum("thd,tkd->thk", qc, keys) * scale
            s = s.masked_fill(~valid[:, None, :], float("-inf"))
            prod = "thk,tkd->thd"
        m = torch.maximum(s.amax(-1, keepdim=True), sink)  # sink keeps m finite for rows with no key
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True) + torch.exp(sink - m)
        out[t0:t1] = (torch.einsum(prod, p, keys) / denom).to(q.dtype)
    return out


def indexer_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, k_start: torch.Tensor,
                 k_len: torch.Tensor, topk: int) -> torch.Tensor:
    """Lightning-indexer selection: score(t, s) = sum_h w[t,h] * relu(q[t,h] . k[s]) over s in
    [k_start[t], k_start[t] + k_len[t]); returns the global row numbers of the `topk` best, -1 padded.
    Equal scores rank the lower row first (deterministic under ties).

    q [T, h, d]; k [N, d]; w [T, h]; k_start, k_len [T] int64. Returns [T, topk] int64.
    """
    T = q.shape[0]
    out = torch.full((T, topk), -1, dtype=torch.long, device=q.device)
    if T == 0 or k.shape[0] == 0 or topk == 0:
        return out
    for t0 in range(0, T, _Q_CHUNK):
        t1 = min(T, t0 + _Q_CHUNK)
        lo = int(k_start[t0:t1].min())
        hi = int((k_start[t0:t1] + k_len[t0:t1]).max())
        if hi <= lo:
            continue
        kk = k[lo:hi].float()  # [S, d]
        s = torch.relu(torch.einsum("thd,sd->ths", q[t0:t1].float(), kk))
        s = torch.einsum("ths,th->ts", s, w[t0:t1].float())  # [t, S]
        pos = torch.arange(lo, hi, device=q.device)
        start, end = k_start[t0:t1, None], (k_start + k_len)[t0:t1, None]
        ok = (pos >= start) & (pos < end)
        s = s.masked_fill(~ok, float("-inf"))
        kk_n = min(topk, hi - lo)
        # Ties are common once q and k are FP4-rounded (QAT simulation): break them towards the lower entry
        # number with a stable sort, so the choice never depends on how many entries a call happened to see.
        vals, order = torch.sort(s, dim=-1, descending=True, stable=True)
        vals, order = vals[:, :kk_n], order[:, :kk_n]
        sel = torch.where(torch.isfinite(vals), order + lo, torch.full_like(order, -1))
        out[t0:t1, :kk_n] = sel
    return out


def compress_kv(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Gated pooling of compressor slots: softmax over the slot axis, independently per channel, in fp32.

    kv, score [N, L, d] (score = gate logits incl. the learned slot bias; -inf slots get weight 0).
    Returns [N, d] fp32.
    """
    return (kv.float() * torch.softmax(score.float(), dim=1)).sum(dim=1)
