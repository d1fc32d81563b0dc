"""A tile-by-tile CPU model of the two Ascend C kernels, standing in for the compiled op library in tests.

It defines `ascend_v4::npu_sparse_attn` and `ascend_v4::npu_moe_gemm` with the binding's schemas
(ops/npu/_loader.py BINDING_SCHEMAS = ops/csrc/torch_binding.cpp) and computes them the way the kernels in
ops/ascendc/*/op_kernel are written to: the work split and block sizes come from ops/npu/tiling.py for a given
SoC and core count; attention runs an online softmax over kv blocks of `kv_block` gathered rows with P
rounded to bf16 before the second matmul, splits of the index list are merged by the combine pass with the
sink; the grouped GEMM builds its unit list from the group counts and dequantises each [n_tile, k_tile]
weight tile (LUT + 2^(s-127)) to bf16 before multiplying. This checks the algorithm and the host/kernel
contract on CPU; it says nothing about the Ascend C code compiling or running.
"""

from __future__ import annotations

import torch

from ascend_v4.ops.npu import tiling as tl
from ascend_v4.ops.npu._loader import BINDING_SCHEMAS

FP4_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
CAPS, CORES = tl.SOCS["ascend910b"], 20
calls: dict[str, int] = {"npu_sparse_attn": 0, "npu_moe_gemm": 0}


def sparse_attn_model(q, kv, idx, sink, scale):
    T, H, D = q.shape
    K = idx.shape[1]
    t_ = tl.sparse_attn_tiling(CAPS, T, H, D, K, CORES)
    out = torch.zeros(T, H, D, dtype=q.dtype)
    partial = {}  # (t, h0, split) -> (O, m, l): the GM workspace of the split path
    for w in tl.sparse_attn_schedule(t_):
        if w.combine:  # merge the splits' partials with the sink (vector cores, after SyncAll)
            parts = [v for (tt, hh, _), v in sorted(partial.items()) if tt == w.t and hh == w.h0]
            sk = sink[w.h0:w.h1].float()
            M = torch.stack([p[1] for p in parts]).amax(0).maximum(sk)
            num = sum(p[0] * torch.exp(p[1] - M)[:, None] for p in parts)
            den = sum(p[2] * torch.exp(p[1] - M) for p in parts) + torch.exp(sk - M)
            out[w.t, w.h0:w.h1] = (num / den[:, None]).to(q.dtype)
            continue
        qt = q[w.t, w.h0:w.h1].float()
        n = w.h1 - w.h0
        m = torch.full((n,), float("-inf"))
        l = torch.zeros(n)
        o = torch.zeros(n, D)
        for s0 in range(w.slot0, w.slot1, t_.kv_block):
            ix = idx[w.t, s0:min(w.slot1, s0 + t_.kv_block)].long()
            ok = ix >= 0
            blk = kv[ix.clamp_min(0)].float()  # gathered rows (K = V)
            s = torch.zeros(n, ix.numel())
            for d0 in range(0, D, t_.d_qk):  # mm1 over D chunks, fp32 accumulation in L0C
                s += qt[:, d0:d0 + t_.d_qk] @ blk[:, d0:d0 + t_.d_qk].T
            s = (s * scale).masked_fill(~ok[None, :], float("-inf"))
            m_new = torch.maximum(m, s.amax(1))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - safe[:, None])
            alpha = torch.exp(m - safe)
            l = l * alpha + p.sum(1)
            pb = p.to(torch.bfloat16).float()  # P goes to the cube as bf16
            o = o * alpha[:, None]
            for d0 in range(0, D, t_.d_pv):  # mm2 over D chunks
                o[:, d0:d0 + t_.d_pv] += pb @ blk[:, d0:d0 + t_.d_pv]
            m = m_new
        if w.final:
            sk = sink[w.h0:w.h1].float()
            M = torch.maximum(m, sk)
            den = l * torch.exp(m - M) + torch.exp(sk - M)
            out[w.t, w.h0:w.h1] = (o * torch.exp(m - M)[:, None] / den[:, None]).to(q.dtype)
        else:
            partial[(w.t, w.h0, w.slot0)] = (o, m, l)
    calls["npu_sparse_attn"] += 1
    return out


def _dequant_tile(w, s, fmt, bn, bk, n0, n1, k0, k1):
    """One [n1-n0, k1-k0] weight tile -> bf16, as the vector cores do it."""
    if fmt == tl.MOE_KEY_FMT["fp4"]:
        b = w[n0:n1, k0 // 2:k1 // 2]
        codes = torch.stack((b & 0x0F, b >> 4), -1).flatten(-2).long()
        v = FP4_VALUES[codes]
    else:
        v = w[n0:n1, k0:k1].view(torch.float8_e4m3fn).float()
    rows = torch.arange(n0, n1) // bn
    cols = torch.arange(k0, k1) // bk
    sc = torch.exp2(s[rows][:, cols].float() - 127)
    return (v * sc).to(torch.bfloat16)


def moe_gemm_model(x, weight, scale, group_list, weight_fmt, scale_block_n, scale_block_k, out_dtype):
    M, K = x.shape
    N = weight[0].shape[0]
    E = len(weight)
    fmt = {v: k for k, v in tl.MOE_KEY_FMT.items()}[weight_fmt]
    t_ = tl.moe_gemm_tiling(CAPS, M, N, K, E, fmt, CORES)
    counts = group_list.tolist()
    counts_all = counts + [M - sum(counts)]  # rows past the groups (the phantom expert) are left at zero
    t_ = tl.MoeGemmTiling(**{**t_.__dict__, "E": E + 1})
    y = torch.zeros(M, N, dtype=out_dtype)
    for u in tl.moe_gemm_schedule(t_, counts_all):
        if u.group == E:
            continue
        acc = torch.zeros(u.row1 - u.row0, u.col1 - u.col0)
        for k0 in range(0, K, t_.k_tile):
            k1 = min(K, k0 + t_.k_tile)
            wt = _dequant_tile(weight[u.group], scale[u.group], weight_fmt, scale_block_n, scale_block_k,
                               u.col0, u.col1, k0, k1)
            acc += x[u.row0:u.row1, k0:k1].to(torch.bfloat16).float() @ wt.float().T
        y[u.row0:u.row1, u.col0:u.col1] = acc.to(out_dtype)
    calls["npu_moe_gemm"] += 1
    return y


_lib = None


def install() -> None:
    """Define the two binding ops (once per process) with the kernel models as their CPU implementation."""
    global _lib
    if _lib is not None:
        return
    _lib = torch.library.Library("ascend_v4", "FRAGMENT")
    for name, schema in BINDING_SCHEMAS.items():
        _lib.define(schema)
    _lib.impl("npu_sparse_attn", sparse_attn_model, "CPU")
    _lib.impl("npu_moe_gemm", moe_gemm_model, "CPU")
