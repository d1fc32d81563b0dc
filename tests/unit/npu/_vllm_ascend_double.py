"""Test double of the vllm-ascend ops ascend-v4 calls (`torch.ops._C_ascend.*`), in plain torch on CPU tensors.

What `vllm_ascend/vllm_ascend_C*.so` registers when loaded, for the ops we map (ops/npu/vllm_ascend_ops.py):
the schemas exactly as in vllm-ascend 0.23.0.post1 csrc/torch_binding.cpp, the input checks of its host
wrappers (x bf16 [T, 4, D] with D in {4096, 7168} for hc_pre; matching dtypes for hc_post) and the maths of
its kernels and of vllm_ascend/ops/mhc.py, written here from their description in docs/npu.md; moe_gating_top_k_hash
from its kernel's description (sqrt(log(1 + exp(x))) for norm_type 2, ids looked up as tid2eid[input_ids * k + j]
in hash-routed layers, weights / (sum + eps) * routed_scaling_factor in x's dtype); npu_sparse_attn_sharedkv from
its README and kernel masks (docs/npu.md §8; window p-127 .. p, compressed entries j < (p+1) // cmp_ratio, the
picks or all of them, sinks in the denominator) with the README's input limits. `install()`
registers them once per process; `BUG` makes one of them wrong on purpose (the self-check must catch it).
Nothing in the package imports this module.
"""

from __future__ import annotations

import collections

import torch

SCHEMAS = {
    "npu_hc_pre_v2": ("npu_hc_pre_v2(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, int hc_mult, "
                      "int hc_sinkhorn_iters, float norm_eps, float hc_eps) -> (Tensor out0, Tensor out1, "
                      "Tensor out2)"),
    "npu_hc_post": "npu_hc_post(Tensor x, Tensor residual, Tensor post, Tensor comb) -> (Tensor out)",
    "moe_gating_top_k_hash": ("moe_gating_top_k_hash(Tensor x, int k, Tensor? bias=None, Tensor? input_ids=None, "
                              "Tensor? tid2eid=None, int k_group=1, int group_count=1, "
                              "float routed_scaling_factor=1.0, float eps=1e-20, int group_select_mode=0, "
                              "int renorm=0, int norm_type=0, bool out_flag=False) -> (Tensor y, Tensor expert_idx, "
                              "Tensor out)"),
    "npu_sparse_attn_sharedkv": ("npu_sparse_attn_sharedkv(Tensor q, *, Tensor? ori_kv=None, Tensor? cmp_kv=None, "
                                 "Tensor? ori_sparse_indices=None, Tensor? cmp_sparse_indices=None, "
                                 "Tensor? ori_block_table=None, Tensor? cmp_block_table=None, "
                                 "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_ori_kv=None, "
                                 "Tensor? cu_seqlens_cmp_kv=None, Tensor? seqused_q=None, Tensor? seqused_kv=None, "
                                 "Tensor? sinks=None, Tensor? metadata=None, float softmax_scale=0, int cmp_ratio=0, "
                                 "int ori_mask_mode=4, int cmp_mask_mode=3, int ori_win_left=128, "
                                 "int ori_win_right=0, str layout_q=\"BSND\", str layout_kv=\"PA_ND\", "
                                 "bool return_softmax_lse=False) -> (Tensor out, Tensor softmax_lse)"),
    "npu_sparse_attn_sharedkv_metadata": (
        "npu_sparse_attn_sharedkv_metadata(int num_heads_q, int num_heads_kv, int head_dim, "
        "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_ori_kv=None, Tensor? cu_seqlens_cmp_kv=None, "
        "Tensor? seqused_q=None, Tensor? seqused_kv=None, int batch_size=0, int max_seqlen_q=0, "
        "int max_seqlen_kv=0, int ori_topk=0, int cmp_topk=0, int cmp_ratio=4, int ori_mask_mode=4, "
        "int cmp_mask_mode=3, int ori_win_left=128, int ori_win_right=0, str layout_q=\"BSND\", "
        "str layout_kv=\"PA_ND\", bool has_ori_kv=True, bool has_cmp_kv=True, str device=\"npu\") -> "
        "(Tensor metadata)"),
}
CALLS: collections.Counter = collections.Counter()
BUG: set[str] = set()  # op names to compute wrongly (tests of the self-check)
_lib: torch.library.Library | None = None


def _hc_pre(x, hc_fn, hc_scale, hc_base, hc_mult, iters, norm_eps, hc_eps):
    CALLS["npu_hc_pre_v2"] += 1
    if x.dtype != torch.bfloat16 or x.dim() != 3 or x.shape[1] != 4 or hc_mult != 4 or x.shape[2] not in (4096, 7168):
        raise RuntimeError(f"npu_hc_pre_v2: x must be bf16 [T, 4, 4096|7168], got {x.dtype} {tuple(x.shape)}")
    n = hc_mult
    u = x.float().flatten(1)
    mix = (u @ hc_fn.t()) * torch.rsqrt(u.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mix[:, :n] * hc_scale[0] + hc_base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mix[:, n:2 * n] * hc_scale[1] + hc_base[n:2 * n])
    comb = torch.softmax((mix[:, 2 * n:] * hc_scale[2] + hc_base[2 * n:]).view(-1, n, n), -1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    y = (pre.unsqueeze(-1) * x.float()).sum(1).to(torch.bfloat16)
    return y, post, comb


def _hc_post(x, residual, post, comb):
    CALLS["npu_hc_post"] += 1
    if x.dim() != 3 or residual.dim() != 4 or x.dtype != residual.dtype or post.dtype != comb.dtype:
        raise RuntimeError("npu_hc_post: x [b, s, d] and residual [b, s, hc, d] of one dtype, post/comb one dtype")
    c = comb.float().transpose(-1, -2) if "npu_hc_post" in BUG else comb.float()
    # out_i = post_i x + sum_j comb[j, i] residual_j
    mixed = torch.einsum("bsji,bsjd->bsid", c, residual.float())
    return (post.float().unsqueeze(-1) * x.float().unsqueeze(2) + mixed).to(residual.dtype)


def _gating(x, k, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1, routed_scaling_factor=1.0,
            eps=1e-20, group_select_mode=0, renorm=0, norm_type=0, out_flag=False):
    CALLS["moe_gating_top_k_hash"] += 1
    if x.dim() != 2 or x.shape[1] > 2048 or renorm != 0 or norm_type not in (0, 1, 2):
        raise RuntimeError("moe_gating_top_k_hash: x [rows, E<=2048], renorm 0, norm_type 0/1/2")
    if bias is not None and bias.dtype != x.dtype:
        raise RuntimeError("moe_gating_top_k_hash: bias must have x's dtype")
    xf = x.float()
    scores = {0: lambda: torch.softmax(xf, -1), 1: lambda: torch.sigmoid(xf),
              2: lambda: torch.sqrt(torch.log1p(torch.exp(xf)))}[norm_type]()
    if input_ids is not None and tid2eid is not None:  # hash-routed: ids looked up, not chosen
        ids = tid2eid.reshape(-1)[(input_ids.long()[:, None] * k + torch.arange(k)).reshape(-1)].view(-1, k).long()
    else:
        sel = scores if bias is None else scores + bias.float()
        ids = torch.topk(sel, k, dim=-1).indices
    w = scores.gather(1, ids)
    if norm_type in (1, 2):
        w = w / (w.sum(-1, keepdim=True) + eps)
    out = scores if out_flag else torch.full_like(scores, float("nan"))  # undefined unless out_flag
    return (w * routed_scaling_factor).to(x.dtype), ids.to(torch.int32), out


def _sas_check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"npu_sparse_attn_sharedkv: {msg}")


def _pages_ok(t: torch.Tensor) -> bool:  # [blocks, block_size, 1, D], block_size a multiple of 16 up to 1024
    return t.dim() == 4 and t.shape[2] == 1 and t.shape[1] % 16 == 0 and 16 <= t.shape[1] <= 1024


def _sas_metadata(num_heads_q, num_heads_kv, head_dim, cu_seqlens_q=None, cu_seqlens_ori_kv=None,
                  cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None, batch_size=0, max_seqlen_q=0,
                  max_seqlen_kv=0, ori_topk=0, cmp_topk=0, cmp_ratio=4, ori_mask_mode=4, cmp_mask_mode=3,
                  ori_win_left=128, ori_win_right=0, layout_q="BSND", layout_kv="PA_ND", has_ori_kv=True,
                  has_cmp_kv=True, device="npu"):
    # The AI-CPU task split: its content is the kernel's business; the double checks the arguments only.
    CALLS["npu_sparse_attn_sharedkv_metadata"] += 1
    _sas_check(num_heads_q == 64 and num_heads_kv == 1 and layout_kv == "PA_ND" and layout_q in ("TND", "BSND"),
               "metadata: N1 64, KV_N 1, PA_ND")
    _sas_check(seqused_kv is not None and batch_size == seqused_kv.shape[0], "metadata: batch_size != len(seqused_kv)")
    _sas_check(int(max_seqlen_kv) >= int(seqused_kv.max()), "metadata: max_seqlen_kv below a sequence's length")
    return torch.zeros(1024, dtype=torch.int32)


def _sparse_attn_sharedkv(q, *, ori_kv=None, cmp_kv=None, ori_sparse_indices=None, cmp_sparse_indices=None,
                          ori_block_table=None, cmp_block_table=None, cu_seqlens_q=None, cu_seqlens_ori_kv=None,
                          cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None, sinks=None, metadata=None,
                          softmax_scale=0.0, cmp_ratio=0, ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=128,
                          ori_win_right=0, layout_q="BSND", layout_kv="PA_ND", return_softmax_lse=False):
    """The README's three scenarios in TND / PA_ND: window (ori_kv), + compressed (cmp_kv, HCA), + picks
    (cmp_sparse_indices, CSA); query i of batch entry b (n queries) at p = seqused_kv[b] - n + i."""
    CALLS["npu_sparse_attn_sharedkv"] += 1
    _sas_check(layout_q == "TND" and layout_kv == "PA_ND", "the double implements TND / PA_ND only")
    _sas_check(q.dtype in (torch.bfloat16, torch.float16) and q.dim() == 3 and q.shape[1] == 64,
               f"q must be bf16/fp16 [T, 64, D], got {q.dtype} {tuple(q.shape)}")
    _sas_check(metadata is not None and metadata.shape == (1024,) and metadata.dtype == torch.int32,
               "metadata [1024] int32 is mandatory")
    _sas_check(ori_kv is not None and _pages_ok(ori_kv) and ori_kv.dtype == q.dtype, "ori_kv pages")
    _sas_check(ori_mask_mode == 4 and cmp_mask_mode == 3 and ori_win_left == 127 and ori_win_right == 0,
               "mask modes 4 / 3, ori_win_left 127, ori_win_right 0 only")
    _sas_check(not return_softmax_lse and ori_sparse_indices is None, "no lse, no ori_sparse_indices")
    if cmp_kv is not None:
        _sas_check(cmp_ratio in (4, 128) and _pages_ok(cmp_kv) and cmp_block_table is not None, "cmp_kv pages")
    if cmp_sparse_indices is not None:
        _sas_check(cmp_kv is not None and cmp_sparse_indices.dtype == torch.int32
                   and cmp_sparse_indices.shape == (q.shape[0], 1, 512), "cmp_sparse_indices [T, 1, 512] int32")
    for t in (q, ori_kv, cmp_kv, cmp_sparse_indices, ori_block_table, cmp_block_table, cu_seqlens_q, seqused_kv):
        _sas_check(t is None or t.numel() > 0, "empty tensors are not supported")
    window = "npu_sparse_attn_sharedkv" in BUG  # wrong on purpose: one position too many in the window
    out = torch.empty_like(q)
    cu, used = cu_seqlens_q.tolist(), seqused_kv.tolist()
    obs = ori_kv.shape[1]
    for b in range(len(used)):
        n = cu[b + 1] - cu[b]
        for i in range(n):
            t, p = cu[b] + i, used[b] - n + i
            pos = torch.arange(max(0, p - ori_win_left - int(window)), p + ori_win_right + 1)
            keys = [ori_kv[ori_block_table[b, pos // obs].long(), pos % obs, 0]]
            if cmp_kv is not None:
                limit = (p + 1) // cmp_ratio
                if cmp_sparse_indices is None:
                    j = torch.arange(limit)
                else:  # the kernel reads the first min(512, limit) slots, up to the first -1, and skips later picks
                    j = cmp_sparse_indices[t, 0, :min(512, limit)].long()
                    ends = (j < 0).nonzero()
                    j = j[:int(ends[0])] if ends.numel() else j
                    j = j[j < limit]
                cbs = cmp_kv.shape[1]
                keys.append(cmp_kv[cmp_block_table[b, j // cbs].long(), j % cbs, 0])
            k = torch.cat(keys).float()  # [n_keys, D]
            s = (q[t].float() @ k.t()) * softmax_scale  # [64, n_keys]
            sk = sinks.float()[:, None] if sinks is not None else torch.full((q.shape[1], 1), float("-inf"))
            m = torch.maximum(s.amax(-1, keepdim=True), sk)
            e = torch.exp(s - m)
            out[t] = ((e @ k) / (e.sum(-1, keepdim=True) + torch.exp(sk - m))).to(q.dtype)
    return out, torch.zeros(0)


def install() -> None:
    """Register the _C_ascend ops (once per process), as loading the .so would."""
    global _lib
    if _lib is not None:
        return
    _lib = torch.library.Library("_C_ascend", "FRAGMENT")
    for name, schema in SCHEMAS.items():
        _lib.define(schema)
    _lib.impl("npu_hc_pre_v2", _hc_pre, "CPU")
    _lib.impl("npu_hc_post", _hc_post, "CPU")
    _lib.impl("moe_gating_top_k_hash", _gating, "CPU")
    _lib.impl("npu_sparse_attn_sharedkv", _sparse_attn_sharedkv, "CPU")
    # no tensor input to dispatch on (as a backend-select op): CompositeExplicitAutograd stands for the AI-CPU kernel
    _lib.impl("npu_sparse_attn_sharedkv_metadata", _sas_metadata, "CompositeExplicitAutograd")
