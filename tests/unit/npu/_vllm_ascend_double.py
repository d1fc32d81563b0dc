"""Test double of the vllm-ascend ops ascend-v4 calls (`torch.ops._C_ascend.*`), in plain torch on CPU tensors.

What `vllm_ascend/vllm_ascend_C*.so` registers when loaded, for the ops we map (ops/npu/vllm_ascend_ops.py):
the schemas exactly as in vllm-ascend 0.23.0.post1 csrc/torch_binding.cpp, the input checks of its host
wrappers (x bf16 [T, 4, D] with D in {4096, 7168} for hc_pre; matching dtypes for hc_post) and the maths of
its kernels and of vllm_ascend/ops/mhc.py, written here from their description in docs/npu.md; moe_gating_top_k_hash
from its kernel's description (sqrt(log(1 + exp(x))) for norm_type 2, ids looked up as tid2eid[input_ids * k + j]
in hash-routed layers, weights / (sum + eps) * routed_scaling_factor in x's dtype). `install()`
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
