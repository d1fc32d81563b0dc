"""The block-table form of one attention layer's reads (what a paged device kernel such as vllm-ascend's
`npu_sparse_attn_sharedkv` takes), turned into the row form `sparse_attn` takes (model-spec §4.6, §10).

One layer's pool rows (`model/cache.py`): window rows first, in blocks of `window_block` rows (window block j
holds positions j*Bw .. j*Bw+Bw-1), then from row `comp_base` the compressed entries, in blocks of
`block_size // ratio` entries (comp block j holds entries j*epb .. j*epb+epb-1). Per sequence s of the step:
`win_table[s, j]` / `comp_table[s, j]` (physical block ids, -1 = none), its new tokens at rows
`cu_seqlens_q[s] .. cu_seqlens_q[s+1]-1` of q and `seqused_kv[s]` positions after the step, so query i of s sits
at position p = seqused_kv[s] - n_s + i (its own row is written before the attention reads it).

A query at position p reads the window positions p-window+1 .. p (those >= 0) and then: nothing (ratio 0),
every entry j complete at p, j < (p+1) // ratio (HCA, ratio 128), or the entries its indexer picked
(`picks[t]`, logical entry numbers, -1 = none, the -1s after the picks; CSA, ratio 4) among those complete at p
(a later pick names nothing, as in vllm-ascend's kernel).
"""

from __future__ import annotations

import torch


def query_positions(cu_seqlens_q: torch.Tensor, seqused_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence of each query [T], position of each query [T]), int64."""
    cu, used = cu_seqlens_q.long(), seqused_kv.long()
    n = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(n.numel(), device=cu.device), n)
    pos = used[seq] - n[seq] + torch.arange(seq.numel(), device=cu.device) - cu[:-1][seq]
    return seq, pos


def paged_rows(win_table: torch.Tensor, comp_table: torch.Tensor, cu_seqlens_q: torch.Tensor,
               seqused_kv: torch.Tensor, picks: torch.Tensor | None, window: int, window_block: int,
               comp_base: int, block_size: int, ratio: int) -> torch.Tensor:
    """Pool rows [T, window + n] each query reads (-1 = none): its window positions ascending, then its
    entries (CSA: in pick order; HCA: ascending, n = the most entries any sequence has after the step)."""
    seq, pos = query_positions(cu_seqlens_q, seqused_kv)
    wt, Bw = win_table.long(), window_block
    wpos = pos[:, None] + torch.arange(1 - window, 1, device=pos.device)[None, :]  # [T, W]
    p = wpos.clamp_min(0)
    blk = wt[seq[:, None], p // Bw]
    rows = torch.where((wpos >= 0) & (blk >= 0), blk * Bw + p % Bw, torch.full_like(p, -1))
    if ratio == 0:
        return rows
    epb, ct = block_size // ratio, comp_table.long()

    def entry_rows(j: torch.Tensor) -> torch.Tensor:  # logical entries [T, n] of each query's sequence -> rows
        jj = j.clamp_min(0)
        b = ct[seq[:, None], jj // epb]
        return torch.where((j >= 0) & (b >= 0), comp_base + b * epb + jj % epb, torch.full_like(jj, -1))

    if ratio == 4:
        if picks is None:
            raise ValueError("paged_rows: a CSA layer (ratio 4) needs the indexer's picks")
        j = picks.long()
        j = torch.where(j < ((pos + 1) // ratio)[:, None], j, torch.full_like(j, -1))  # not complete yet: none
        return torch.cat((rows, entry_rows(j)), dim=1)
    n = int((seqused_kv.long() // ratio).max().item()) if seqused_kv.numel() else 0
    j = torch.arange(n, device=pos.device)[None, :].expand(pos.numel(), n)
    visible = j < ((pos + 1) // ratio)[:, None]
    return torch.cat((rows, entry_rows(torch.where(visible, j, torch.full_like(j, -1)))), dim=1)
