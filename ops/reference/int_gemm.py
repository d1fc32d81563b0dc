"""Reference integer GEMMs of the Ascend A2/A3 quantised formats (ascend-notes.md §0, §6.3). Pure torch.

* W8A8_DYNAMIC: int8 weight [N, K] with one fp32 scale per output channel ([N, 1], symmetric: zero offset);
  the activation is quantised per token (row) at run time: `a_scale = amax(|x_row|) / 127`,
  `x_q = round_half_even(x / a_scale)` clamped to [-127, 127]. The NPU's `npu_dynamic_quant` +
  `npu_quant_matmul` pair computes the same thing; its rounding mode is not documented (unverified).
* W4A8_DYNAMIC: as W8A8 but the weight is int4 in [-8, 7], two values per byte **packed along the output
  dim**: byte (j, k) holds row 2j in the low nibble and row 2j+1 in the high nibble ([N/2, K] int8), the
  msModelSlim "ascendV1" layout (vllm-ascend `w4a8.py` docstring).

Accumulation: int8 x int8 products summed exactly. We emulate the int32 accumulator with a float64 matmul,
which is exact here (|sum| <= 127 * 127 * K < 2^53 for any K below 5e11), then apply
`a_scale * w_scale` in fp32, as the NPU's dequantising epilogue does.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
INT4_MIN, INT4_MAX = -8, 7
# Per-token amax floor: an all-zero row quantises to zeros instead of dividing by zero.
ACT_AMAX_FLOOR = 1e-12


def act_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic int8 quantisation: x [M, K] float -> (int8 [M, K], fp32 scale [M, 1])."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(ACT_AMAX_FLOOR) / INT8_MAX
    q = torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_act_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Quantise x [..., K] per token (last dim) to int8 and back, keeping dtype (used when the int weights were
    expanded to dense at load: same activation numerics as `w8a8_gemm`)."""
    shape = x.shape
    q, s = act_quant_int8(x.reshape(-1, shape[-1]))
    return (q.float() * s).reshape(shape).to(x.dtype)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [N, K] (N even) -> int8 [N/2, K]: row 2j in the low nibble, 2j+1 in the high."""
    u = q.contiguous().view(torch.uint8)
    return ((u[0::2] & 0x0F) | (u[1::2] << 4)).view(torch.int8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_rows`: int8 [N/2, K] -> sign-extended int8 [N, K]."""
    b = packed.view(torch.uint8)
    lo = (b & 0x0F).to(torch.int8)
    hi = (b >> 4).to(torch.int8)
    lo = torch.where(lo > INT4_MAX, lo - 16, lo)
    hi = torch.where(hi > INT4_MAX, hi - 16, hi)
    return torch.stack((lo, hi), dim=1).reshape(-1, packed.shape[1])


def _int_gemm(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    xq, a_scale = act_quant_int8(x)
    acc = torch.matmul(xq.to(torch.float64), wq.to(torch.float64).t())  # exact int32-equivalent sums
    y = acc.to(torch.float32) * a_scale * w_scale.reshape(1, -1).float()
    return y.to(x.dtype)


def w8a8_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """y = x W^T with W = w * w_scale (int8 [N, K], fp32 [N, 1]) and per-token int8 activations.
    x [M, K] bf16/fp32 -> [M, N] in x.dtype."""
    return _int_gemm(x, w, w_scale)


def w4a8_gemm(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """As `w8a8_gemm` with an int4 weight packed along the output dim (int8 [N/2, K])."""
    return _int_gemm(x, unpack_int4_rows(w_packed), w_scale)


def moe_experts_int(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: list[torch.Tensor],
                    s1: list[torch.Tensor], w2: list[torch.Tensor], s2: list[torch.Tensor], w3: list[torch.Tensor],
                    s3: list[torch.Tensor], swiglu_limit: float, int4: bool) -> torch.Tensor:
    """Routed experts with W8A8 (int8 [N, K]) or W4A8 (int4 packed along N, int8 [N/2, K]) weights and per-channel
    fp32 scales [N, 1]: each projection is `w8a8_gemm` / `w4a8_gemm` (per-token int8 activations), with the
    clamped SwiGLU and the routing weight before w2 as in the FP8/FP4 experts. x [T, D]; topk_ids [T, k] local
    expert positions (-1 = another rank's); topk_weights [T, k] fp32. Returns [T, D] fp32."""
    from .gemm import expert_groups

    gemm = w4a8_gemm if int4 else w8a8_gemm
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e, pairs, tok in expert_groups(topk_ids, len(w1)):
        h = x[tok]
        g = gemm(h, w1[e], s1[e]).float().clamp(max=swiglu_limit)
        u = gemm(h, w3[e], s3[e]).float().clamp(-swiglu_limit, swiglu_limit)
        a = torch.nn.functional.silu(g) * u * topk_weights.reshape(-1)[pairs].float()[:, None]
        out.index_add_(0, tok, gemm(a.to(x.dtype), w2[e], s2[e]).float())
    return out

