"""Triton GEMMs on packed FP8 / FP4 weights, dequantised tile by tile inside the kernel, and grouped MoE.

Goldens: `ops/reference/gemm.py`; formats: model-spec.md §8.3–8.5. Weights and scales are read as raw
bytes (uint8 views) and decoded in registers (`_common.load_wt_tile`), so no dense copy of a weight ever
exists in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_to, dot_in_fp32, fp8_roundtrip_rows, load_wt_tile, mma, next_pow2

ACT_BLOCK = 128  # activation quantisation runs along K (model-spec.md §8.5)
BLOCK_N = 64  # output columns per program on CUDA
# Ascend 910B variant (unified buffer 192 KiB = 1572864 bits): decoding a [128 x 64] FP8/FP4 weight tile in
# registers needs 2.4-3.4 Mbit there, so NPU builds use narrower tiles; `tools/check_ascend_lowering.py`
# compiles these widths (the gate/up kernel holds two weight tiles, hence 16).
NPU_BLOCK_N = {"quant_gemm": 32, "moe_gate_up": 16, "moe_down": 32}


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _block_k(K: int, act_quant: bool) -> int:
    if act_quant:
        if K % ACT_BLOCK:
            raise ValueError(f"act_quant needs K divisible by {ACT_BLOCK}, got K={K}")
        return ACT_BLOCK  # one tile = one quantisation run
    return min(ACT_BLOCK, next_pow2(K, 16))


def _block_m(rows_per_group: int) -> int:
    return 16 if rows_per_group <= 16 else (32 if rows_per_group <= 32 else 64)  # tl.dot needs >= 16


# ---------------------------------------------------------------------------------------------- quant_gemm
@triton.jit
def _quant_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                       IS_FP4: tl.constexpr, ACT_QUANT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :], mask=mm[:, None] & (k[None, :] < K),
                    other=0.0).to(tl.float32)
        if ACT_QUANT:
            x = fp8_roundtrip_rows(x)  # the tile is exactly one 1x128 run per row
        acc += mma(x, load_wt_tile(w_ptr, s_ptr, n, k, N, K, stride_wn, stride_sn, IS_FP4), F32)
    tl.store(y_ptr + m[:, None].to(tl.int64) * stride_ym + n[None, :], cast_to(acc, y_ptr.dtype.element_ty),
             mask=mm[:, None] & (n[None, :] < N))


def quant_gemm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, act_quant: bool) -> torch.Tensor:
    """Triton quant_gemm: x [M, K] @ W^T, W FP8 e4m3 [N, K] + UE8M0 [ceil(N/128), ceil(K/128)] or FP4 packed
    int8 [N, K/2] + UE8M0 [N, K/32]. act_quant: 1x128 FP8 round-trip of x inside the kernel. -> [M, N] x.dtype.
    """
    fp4 = w.dtype == torch.int8
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    x = x.contiguous()
    wb, sb = _as_bytes(w), _as_bytes(s)
    cfg = {"BLOCK_M": _block_m(M), "BLOCK_N": BLOCK_N, "BLOCK_K": _block_k(K, act_quant)}
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _quant_gemm_kernel[grid](x, wb, sb, y, M, N, K, x.stride(0), wb.stride(0), sb.stride(0), y.stride(0),
                             IS_FP4=fp4, ACT_QUANT=bool(act_quant), F32=dot_in_fp32(x), **cfg)
    return y


# ---------------------------------------------------------------------------------------------- moe_experts
# Grouped layout: the T*k (token, slot) pairs are sorted by expert; each expert's run is cut into BLOCK_M
# row blocks, and one launch covers every block of every expert (grid axis 0). Experts' weights stay where
# they are: the kernels get the first expert's tensor as base pointer plus a table of byte offsets of each
# expert's tensor from it (flat device address space), so no stacking copy is made per call.

@triton.jit
def _block_rows(blk_expert_ptr, blk_row0_ptr, grp_start_ptr, grp_count_ptr, BLOCK_M: tl.constexpr):
    # Which expert this row block belongs to and which sorted positions it covers. Padding blocks
    # (expert -1) get zero valid rows, so every load and store below is masked off.
    b = tl.program_id(0)
    e = tl.load(blk_expert_ptr + b)
    valid = e >= 0
    e = tl.maximum(e, 0)
    cnt = tl.where(valid, tl.load(grp_count_ptr + e), 0)
    g0 = tl.load(grp_start_ptr + e)
    r = tl.load(blk_row0_ptr + b) + tl.arange(0, BLOCK_M)
    return e, valid, g0, r, r < cnt


@triton.jit
def _moe_gate_up_kernel(x_ptr, order_ptr, blk_expert_ptr, blk_row0_ptr, grp_start_ptr, grp_count_ptr, tw_ptr,
                        w1_ptr, s1_ptr, w3_ptr, s3_ptr, off_ptr, a_ptr, E, D, I, TOPK, stride_xm, stride_wn,
                        stride_sn, limit, IS_FP4: tl.constexpr, ACT_QUANT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32: tl.constexpr):
    # a[sorted row, n] = tw * silu(min(W1 x, L)) * clamp(W3 x, -L, L): W1 and W3 share the x tile (one pass).
    e, valid, g0, r, rm = _block_rows(blk_expert_ptr, blk_row0_ptr, grp_start_ptr, grp_count_ptr, BLOCK_M)
    pair = tl.load(order_ptr + g0 + r, mask=rm, other=0)
    tok = (pair // TOPK).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w1e = w1_ptr + tl.load(off_ptr + 0 * E + e)
    s1e = s1_ptr + tl.load(off_ptr + 1 * E + e)
    w3e = w3_ptr + tl.load(off_ptr + 2 * E + e)
    s3e = s3_ptr + tl.load(off_ptr + 3 * E + e)
    g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_end = tl.where(valid, D, 0)
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + tok[:, None] * stride_xm + k[None, :], mask=rm[:, None] & (k[None, :] < D),
                     other=0.0).to(tl.float32)
        if ACT_QUANT:
            xt = fp8_roundtrip_rows(xt)
        g += mma(xt, load_wt_tile(w1e, s1e, n, k, I, D, stride_wn, stride_sn, IS_FP4), F32)
        u += mma(xt, load_wt_tile(w3e, s3e, n, k, I, D, stride_wn, stride_sn, IS_FP4), F32)
    # The reference's projections return x.dtype: round the same way before the activation.
    g = tl.minimum(cast_to(g, a_ptr.dtype.element_ty).to(tl.float32), limit)
    u = cast_to(u, a_ptr.dtype.element_ty).to(tl.float32)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    tw = tl.load(tw_ptr + pair, mask=rm, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)) * u * tw[:, None]  # routing weight multiplied in before W2 (reference order)
    tl.store(a_ptr + (g0 + r)[:, None].to(tl.int64) * I + n[None, :], cast_to(act, a_ptr.dtype.element_ty),
             mask=rm[:, None] & (n[None, :] < I))


@triton.jit
def _moe_down_kernel(a_ptr, order_ptr, blk_expert_ptr, blk_row0_ptr, grp_start_ptr, grp_count_ptr,
                     w2_ptr, s2_ptr, off_ptr, y_ptr, E, D, I, stride_wn, stride_sn,
                     IS_FP4: tl.constexpr, ACT_QUANT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32: tl.constexpr):
    # y[pair, n] = (W2 a)[n] for the pair's expert, written at the pair's original (token, slot) position.
    e, valid, g0, r, rm = _block_rows(blk_expert_ptr, blk_row0_ptr, grp_start_ptr, grp_count_ptr, BLOCK_M)
    pair = tl.load(order_ptr + g0 + r, mask=rm, other=0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w2e = w2_ptr + tl.load(off_ptr + 4 * E + e)
    s2e = s2_ptr + tl.load(off_ptr + 5 * E + e)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_end = tl.where(valid, I, 0)
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        at = tl.load(a_ptr + (g0 + r)[:, None].to(tl.int64) * I + k[None, :], mask=rm[:, None] & (k[None, :] < I),
                     other=0.0).to(tl.float32)
        if ACT_QUANT:
            at = fp8_roundtrip_rows(at)
        acc += mma(at, load_wt_tile(w2e, s2e, n, k, D, I, stride_wn, stride_sn, IS_FP4), F32)
    y = cast_to(acc, a_ptr.dtype.element_ty).to(tl.float32)  # the reference's W2 output is x.dtype
    tl.store(y_ptr + pair[:, None].to(tl.int64) * D + n[None, :], y, mask=rm[:, None] & (n[None, :] < D))


def moe_schedule(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> dict[str, torch.Tensor]:
    """Sort (token, slot) pairs by expert and cut each expert's run into `block_m` row blocks, on the device
    and without a host sync. Ids outside [0, E) (-1 = another rank's expert) are left out.

    Returns order [P] (pair ids grouped by expert), grp_start / grp_count [E], and per row block
    blk_expert (-1 = padding block) and blk_row0 (first row inside the expert's run). The number of blocks
    is the bound ceil(P / block_m) + min(E, P); blocks past the real count are padding.
    """
    flat = topk_ids.reshape(-1).long()
    P, E, dev = flat.numel(), n_experts, flat.device
    key = torch.where((flat >= 0) & (flat < E), flat, torch.full_like(flat, E))
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))[:E]
    grp_start = torch.cumsum(counts, 0) - counts
    nblk = (counts + block_m - 1) // block_m
    blk_end = torch.cumsum(nblk, 0)
    b = torch.arange(triton.cdiv(P, block_m) + min(E, P), device=dev)
    e = torch.searchsorted(blk_end, b, right=True)
    ec = e.clamp(max=E - 1)
    return {"order": order.to(torch.int32), "grp_start": grp_start.to(torch.int32),
            "grp_count": counts.to(torch.int32),
            "blk_expert": torch.where(e < E, e, torch.full_like(e, -1)).to(torch.int32),
            "blk_row0": ((b - (blk_end[ec] - nblk[ec])) * block_m).to(torch.int32)}


def _offset_table(groups: list[list[torch.Tensor]],
                  device: torch.device) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    # Per weight list: base = expert 0's bytes; offsets[i, e] = address of expert e minus the base.
    # The byte views are returned so that any contiguous copy stays alive until the kernels have run.
    views = [[_as_bytes(t) for t in ts] for ts in groups]
    rows = [[t.data_ptr() - bs[0].data_ptr() for t in bs] for bs in views]
    return views, torch.tensor(rows, dtype=torch.int64).to(device)


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: list[torch.Tensor],
                s1: list[torch.Tensor], w2: list[torch.Tensor], s2: list[torch.Tensor], w3: list[torch.Tensor],
                s3: list[torch.Tensor], swiglu_limit: float, act_quant: bool) -> torch.Tensor:
    """Triton moe_experts: two launches over all experts (W1/W3 + clamped SwiGLU fused; then W2).

    x [T, D]; topk_ids [T, k] (-1 = skip); topk_weights [T, k]; per-expert FP4 (int8 [I, D/2] / [D, I/2])
    or FP8 ([I, D] / [D, I]) weights with UE8M0 scales; all experts the same shape. Returns [T, D] fp32:
    each pair's W2 output lands at its (token, slot) position and the k slots are summed, so the result
    is deterministic (no atomics).
    """
    T, D = x.shape
    E, k = len(w1), topk_ids.shape[1]
    out = torch.zeros((T, D), dtype=torch.float32, device=x.device)
    if T == 0 or E == 0 or k == 0 or D == 0:
        return out
    for name, ts in (("w1", w1), ("s1", s1), ("w2", w2), ("s2", s2), ("w3", w3), ("s3", s3)):
        if any(t.shape != ts[0].shape or t.dtype != ts[0].dtype for t in ts):
            raise ValueError(f"moe_experts: every expert's {name} must share shape and dtype")
    fp4 = w1[0].dtype == torch.int8
    I = w1[0].shape[0]
    P = T * k
    block_m = _block_m(P // E)
    sched = moe_schedule(topk_ids, E, block_m)
    views, offs = _offset_table([w1, s1, w3, s3, w2, s2], x.device)
    w1b, s1b, w3b, s3b, w2b, s2b = (v[0] for v in views)
    x = x.contiguous()
    tw = topk_weights.reshape(-1).float().contiguous()
    a = torch.empty((P, I), dtype=x.dtype, device=x.device)  # activations in sorted-pair order
    y = torch.zeros((P, D), dtype=torch.float32, device=x.device)  # per (token, slot); -1 pairs stay 0
    nb = sched["blk_expert"].numel()
    f32 = dot_in_fp32(x)
    cfg_up = {"BLOCK_M": block_m, "BLOCK_N": BLOCK_N, "BLOCK_K": _block_k(D, act_quant)}
    _moe_gate_up_kernel[(nb, triton.cdiv(I, BLOCK_N))](
        x, sched["order"], sched["blk_expert"], sched["blk_row0"], sched["grp_start"], sched["grp_count"], tw,
        w1b, s1b, w3b, s3b, offs, a, E, D, I, k, x.stride(0), w1b.stride(0), s1b.stride(0), float(swiglu_limit),
        IS_FP4=fp4, ACT_QUANT=bool(act_quant), F32=f32, **cfg_up)
    cfg_down = {"BLOCK_M": block_m, "BLOCK_N": BLOCK_N, "BLOCK_K": _block_k(I, act_quant)}
    _moe_down_kernel[(nb, triton.cdiv(D, BLOCK_N))](
        a, sched["order"], sched["blk_expert"], sched["blk_row0"], sched["grp_start"], sched["grp_count"],
        w2b, s2b, offs, y, E, D, I, w2b.stride(0), s2b.stride(0),
        IS_FP4=fp4, ACT_QUANT=bool(act_quant), F32=f32, **cfg_down)
    return y.view(T, k, D).sum(1)
