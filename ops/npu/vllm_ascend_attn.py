"""`ascend_v4::sparse_attn_paged` on vllm-ascend's `npu_sparse_attn_sharedkv` (A2/A3), with its AI-CPU
`npu_sparse_attn_sharedkv_metadata` task split.

Facts (vllm-ascend 0.23.0.post1 sdist; docs/npu.md §8 cites each): schemas csrc/torch_binding.cpp 2619-2675;
limits csrc/attention/sparse_attn_sharedkv/README.md: TND q [T, N1, D] with N1 = 64, paged KV (`PA_ND`)
[blocks, block_size, 1, D] with block sizes a multiple of 16 up to 1024, KV_N 1, sparse top-k 512, metadata
mandatory ([1024] int32), `ori_mask_mode` 4 with `ori_win_left` 127 / `ori_win_right` 0, `cmp_mask_mode` 3,
no empty tensors, A2/A3 only (not 950). Masks (op_kernel/arch32/sparse_attn_sharedkv_{swa,scfa}_kernel.h): the
query i of a batch entry with n queries and `seqused_kv` L sits at p = L - n + i, reads window positions
max(0, p - 127) .. p through `ori_block_table`, and compressed entries j < (p + 1) // cmp_ratio (all of them
without `cmp_sparse_indices`, HCA; the listed ones, -1 or later ones masked, CSA) through `cmp_block_table`.
That is our paged form (ops/reference/paged.py) with the pool's own blocks as pages. The call is the one
vllm-ascend's DSA attention makes (vllm_ascend/attention/dsa_v1.py 1945-1990, 2385-2440: cmp_ratio
max(ratio, 1), cu_seqlens_ori_kv = cu_seqlens_q, layout TND / PA_ND).

Three mapping choices, ours:
* Heads: N1 must be 64, and heads are independent, so H = 64k (Pro's 128 on one device) runs k calls on
  64-head slices of q and the sinks (same pages and metadata), and H dividing 64 (attention TP: Flash at TP 2
  has 32 heads a rank) is padded with zero queries to 64, whose outputs are dropped (the kernel does 64 / H
  times the work of those heads; DP attention avoids that).
* Compressed pages: a comp block of B tokens holds B / ratio entries; where that is a valid page (CSA at
  B = 128: 32) the pool region is viewed in place. HCA at B = 128 holds 1 entry per block, below the 16-row
  minimum: each sequence's entries are gathered into 16-entry pages for the call (a copy of n_entries rows per
  HCA layer and step, ~1/128 of the tokens; an entry-paged HCA cache would avoid it, docs/npu.md §8). With
  2048-token blocks (`serve --block-size 2048`) HCA blocks hold 16 entries and are read in place too.
* CSA picks narrower than 512 (small models) are padded with -1; wider ones (Pro: 1024) are not taken (the
  README's limit), so those layers run the row-list kernels.
The metadata is computed once per step and layer kind: the step's tables are the same tensor objects in
every layer (`StepBatch.paged_tables`), which is the cache key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import SOC_ASCEND950

HALF = (torch.bfloat16, torch.float16)
HEADS, HEAD_DIM, WINDOW, TOPK = 64, 512, 128, 512  # the README's TND / sparse limits
PAGE_ALIGN, PAGE_MAX = 16, 1024  # block_size: a multiple of 16, at most 1024
ORI_MASK, CMP_MASK = 4, 3  # sliding window; causal over complete compressed entries

# (cu_seqlens_q, seqused_kv, ratio) -> metadata, for the tensors of recent steps only
_metadata_cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def usable(b) -> str | None:
    """A2/A3 only: the README's product table and the op's tiling reject the 950 (which has
    npu_kv_quant_sparse_attn_sharedkv instead, not mapped). An unknown SoC (-1) is left to the self-check."""
    return f"not on an Ascend 950 (SoC id {b.soc_version}): A2/A3 kernel" if b.soc_version >= SOC_ASCEND950 else None


def _page_ok(rows: int) -> bool:
    return rows % PAGE_ALIGN == 0 and PAGE_ALIGN <= rows <= PAGE_MAX


def accepts(q, kv, idx, sink, scale, win_table, comp_table, cu_seqlens_q, seqused_kv, picks, max_seqlen_q,
            max_seqlen_kv, window, window_block, comp_base, block_size, ratio) -> bool:
    """The README's limits (module docstring), after our mapping choices."""
    return (q.dtype in HALF and kv.dtype == q.dtype and q.dim() == 3 and q.shape[0] > 0
            and (q.shape[1] % HEADS == 0 or HEADS % q.shape[1] == 0) and q.shape[2] == HEAD_DIM and window == WINDOW
            and _page_ok(window_block) and ratio in (0, 4, 128)
            and (ratio != 4 or (picks is not None and 0 < picks.shape[1] <= TOPK)))


def _metadata(q, cu, used, max_q: int, max_kv: int, ratio: int, window: int) -> torch.Tensor:
    key = (id(cu), id(used), ratio)
    hit = _metadata_cache.get(key)
    if hit is not None and hit[0] is cu and hit[1] is used:
        return hit[2]
    meta = torch.ops._C_ascend.npu_sparse_attn_sharedkv_metadata(
        num_heads_q=HEADS, num_heads_kv=1, head_dim=q.shape[2], cu_seqlens_q=cu, cu_seqlens_ori_kv=cu,
        seqused_kv=used, batch_size=used.shape[0], max_seqlen_q=int(max_q), max_seqlen_kv=int(max_kv),
        cmp_topk=TOPK if ratio == 4 else 0, cmp_ratio=max(ratio, 1), ori_mask_mode=ORI_MASK,
        cmp_mask_mode=CMP_MASK, ori_win_left=window - 1, ori_win_right=0, layout_q="TND", layout_kv="PA_ND",
        has_ori_kv=True, has_cmp_kv=ratio > 0, device=str(q.device))
    if len(_metadata_cache) >= 64:  # older steps' tables (a step has one entry per pool group and ratio)
        _metadata_cache.clear()
    _metadata_cache[key] = (cu, used, meta)  # holding cu / used keeps their ids from being reused
    return meta


def _comp_pages(kv: torch.Tensor, comp_base: int, comp_table: torch.Tensor, epb: int):
    """(cmp_kv [pages, rows, 1, D], cmp_block_table [S, n] int32) over the compressed region."""
    D = kv.shape[1]
    if _page_ok(epb):  # the pool's comp blocks are valid pages: read in place
        return kv[comp_base:].view(-1, epb, 1, D), comp_table.clamp_min(0)
    S, nc = comp_table.shape
    per_seq = -(-nc * epb // PAGE_ALIGN) * PAGE_ALIGN  # entries per sequence, padded to whole pages
    j = torch.arange(per_seq, device=kv.device)
    blk = comp_table.long()[:, (j // epb).clamp_max(nc - 1)]  # [S, per_seq]
    # rows past a sequence's entries point anywhere valid: the kernel never reads past (p + 1) // ratio
    rows = torch.where((blk >= 0) & (j < nc * epb), comp_base + blk * epb + j % epb, comp_base)
    pages = kv[rows.reshape(-1)].view(S * per_seq // PAGE_ALIGN, PAGE_ALIGN, 1, D)
    table = torch.arange(S * per_seq // PAGE_ALIGN, dtype=torch.int32, device=kv.device).view(S, -1)
    return pages, table


def sparse_attn_paged(q, kv, idx, sink, scale, win_table, comp_table, cu_seqlens_q, seqused_kv, picks,
                      max_seqlen_q, max_seqlen_kv, window, window_block, comp_base, block_size, ratio):
    D = q.shape[2]
    # released / padding table entries (-1) point at block 0, as vLLM's null block does: positions outside a
    # query's window are masked, but a kernel that fetches a whole page around them then reads a valid page
    win_table = win_table.clamp_min(0)
    kw = dict(ori_kv=kv[:comp_base].view(-1, window_block, 1, D), ori_block_table=win_table,
              cu_seqlens_q=cu_seqlens_q, cu_seqlens_ori_kv=cu_seqlens_q, seqused_kv=seqused_kv,
              softmax_scale=float(scale), cmp_ratio=max(ratio, 1), ori_mask_mode=ORI_MASK, ori_win_left=window - 1,
              ori_win_right=0, layout_q="TND", layout_kv="PA_ND")
    if ratio:
        kw["cmp_kv"], kw["cmp_block_table"] = _comp_pages(kv, comp_base, comp_table, block_size // ratio)
        kw["cmp_mask_mode"] = CMP_MASK
    if ratio == 4:
        kw["cmp_sparse_indices"] = F.pad(picks.to(torch.int32), (0, TOPK - picks.shape[1]), value=-1)[:, None, :]
    kw["metadata"] = _metadata(q, cu_seqlens_q, seqused_kv, max_seqlen_q, max_seqlen_kv, ratio, window)
    H, sinks = q.shape[1], sink.float()
    if H < HEADS:  # pad to the kernel's 64 heads with zero queries; their outputs are dropped
        out = torch.ops._C_ascend.npu_sparse_attn_sharedkv(F.pad(q, (0, 0, 0, HEADS - H)),
                                                           sinks=F.pad(sinks, (0, HEADS - H)), **kw)[0]
        return out[:, :H].to(q.dtype)
    outs = [torch.ops._C_ascend.npu_sparse_attn_sharedkv(q[:, h:h + HEADS].contiguous(), sinks=sinks[h:h + HEADS]
                                                         .contiguous(), **kw)[0]
            for h in range(0, H, HEADS)]
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).to(q.dtype)
