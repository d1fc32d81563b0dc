"""Test double of the vllm-ascend ops ascend-v4 calls (`torch.ops._C_ascend.*`), in plain torch on CPU tensors.

What `vllm_ascend/vllm_ascend_C*.so` registers when loaded, for the ops we map (ops/npu/vllm_ascend_ops.py):
the schemas exactly as in vllm-ascend 0.23.0.post1 csrc/torch_binding.cpp, the input checks of its host
wrappers (x bf16 [T, 4, D] with D in {4096, 7168} for hc_pre; matching dtypes for hc_post) and the maths of
its kernels and of vllm_ascend/ops/mhc.py, written here from their description in docs/npu.md. `install()`
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
