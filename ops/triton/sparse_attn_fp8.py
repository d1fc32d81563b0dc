"""Triton sparse_attn over FP8 cache entries (`ascend_v4::sparse_attn_fp8`).

Golden: `ops/reference/kv_fp8.py::sparse_attn_fp8`; entry layout: `kv_fp8.kv_fp8_layout` (model-spec.md §10.2).
The kernel is `attention._sparse_attn_kernel` with the kv row load replaced by an in-register decode of the
gathered entries: e4m3 byte x 2^(UE8M0 - 127) for the nope dims, two little-endian bytes -> bf16 for the rope
dims. Only integer ops and bitcasts (no fp8 dtype), like the GEMM decoders in `_common.py`, so it runs under
the interpreter and on any CUDA arch. Not part of `_interpret._MODULES`/`OPS` (files owned elsewhere):
`ops/_backends.py` registers it for CUDA, the test loads it under the interpreter itself. Entry offsets for
head dim D and rope_dim R: nope = D - R e4m3 bytes at 0, rope bf16 at nope, scales at D + R.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_to, dot_in_fp32, e8m0_to_f32, fp8e4m3_to_f32, mma, next_pow2

# Entry layout constants of ops/reference/kv_fp8.py, repeated here so that ops/triton stays loadable on its own
# (tools/check_ascend_lowering.py imports it as a standalone package); the seam has validated the shapes.
SCALE_BLOCK = 64


@triton.jit
def _decode_entries(kv_ptr, ix, valid, d, stride_kv, D, NOPE: tl.constexpr, ROPE_OFF: tl.constexpr,
                    SCALE_OFF: tl.constexpr, SCALE_BLOCK_: tl.constexpr):
    """fp32 [BK, BD] rows of the entries `ix` (invalid rows and columns >= D read as 0)."""
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
def _sparse_attn_fp8_kernel(q_ptr, kv_ptr, idx_ptr, sink_ptr, out_ptr, H, D, K, scale,
                            stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh,
                            NOPE: tl.constexpr, ROPE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr,
                            SCALE_BLOCK_: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_D: tl.constexpr, F32: tl.constexpr):
    # One program = one query row t x BLOCK_H heads, BLOCK_K entries per step, fp32 online softmax seeded by
    # the sink (a logit with zero value), as in attention._sparse_attn_kernel.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hm, dm = h < H, d < D
    q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :], mask=hm[:, None] & dm[None, :],
                other=0.0)
    m_i = tl.load(sink_ptr + h, mask=hm, other=0.0).to(tl.float32)
    l_i = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ix = tl.load(idx_ptr + t * stride_it + kk, mask=kk < K, other=-1).to(tl.int64)
        valid = ix >= 0
        rows = _decode_entries(kv_ptr, tl.where(valid, ix, 0), valid, d, stride_kv, D, NOPE, ROPE_OFF,
                               SCALE_OFF, SCALE_BLOCK_)  # [BK, BD] fp32, exact in bf16
        s = mma(q, tl.trans(rows), F32) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p, rows, F32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :], cast_to(out, out_ptr.dtype.element_ty),
             mask=hm[:, None] & dm[None, :])


def sparse_attn_fp8_config(H: int, D: int, K: int) -> dict[str, int]:
    """Block shapes: as attention.sparse_attn_config (16 heads x all of D per program). CUDA only: on 910B
    the in-register decode overflows the unified buffer at these shapes (docs/kernels.md)."""
    return {"BLOCK_H": 16, "BLOCK_K": 32 if D > 128 else 64, "BLOCK_D": next_pow2(D, 16)}


def sparse_attn_fp8(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float,
                    rope_dim: int) -> torch.Tensor:
    """Triton sparse_attn_fp8: q [T, H, D], kv uint8 [N, entry_bytes], idx [T, K] (-1 = skip), sink [H]
    -> [T, H, D] q.dtype. bf16 q: bf16 tensor-core products (decoded entries are exact in bf16, P is rounded
    to bf16 for PV); fp32 q: exact fp32 products."""
    T, H, D = q.shape
    K = idx.shape[1]
    nope = D - rope_dim
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv.contiguous()
    idx = idx.contiguous()
    sink = sink.float().contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if T == 0 or H == 0:
        return out
    cfg = sparse_attn_fp8_config(H, D, K)
    grid = (T, triton.cdiv(H, cfg["BLOCK_H"]))
    _sparse_attn_fp8_kernel[grid](q, kv, idx, sink, out, H, D, K, float(scale),
                                  q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), out.stride(0),
                                  out.stride(1), NOPE=nope, ROPE_OFF=nope, SCALE_OFF=nope + 2 * rope_dim,
                                  SCALE_BLOCK_=SCALE_BLOCK, F32=dot_in_fp32(q), **cfg)
    return out


def register() -> dict[str, str]:
    """Register the launcher as the CUDA kernel of ascend_v4::sparse_attn_fp8 (the caller checked CUDA)."""
    torch.library.register_kernel("ascend_v4::sparse_attn_fp8", "cuda", sparse_attn_fp8)
    return {"sparse_attn_fp8": "triton"}


__all__ = ["sparse_attn_fp8", "sparse_attn_fp8_config", "register"]
