"""Golden of the Ascend 950 native MX grouped GEMM (ops/ascendc/moe_gemm, tiling keys 11 / 12). Pure torch.

What the 950 kernel computes, and therefore what it is tested against (docs/npu.md "950 MX path"):

* **Activations -> MXFP8 per 1x32 block**: e4m3 elements, one UE8M0 (e8m0) scale per 32 consecutive K
  elements of a row. Scale rule = the QAT rule of model-spec §8.5 at a finer block: the smallest power of two
  `2^e >= amax / 448` (amax floored at 1e-4), so no element saturates; the same rule as `aclnnDynamicMxQuant`
  with scaleAlg=1 (hicann/ops-nn quant/dynamic_mx_quant/docs/aclnnDynamicMxQuant_en.md). The exponent is
  taken from the fp32 bits of amax (exact); `formats.pow2_scale_exponent` divides and takes log2, which can
  differ when amax/448 rounds onto a power of two (a 2^-19-odds event, see docs/kernels.md "Numerics notes").
* **Weights -> MXFP8 with 1x32 UE8M0**, losslessly: the cube multiplies fp8 x fp8 or fp4 x fp4 only
  (asc-devkit `asc_mmad_mx`, MxMatmul "supported data types"), so
  - FP8 weights keep their e4m3 bytes; each 128x128 block scale is repeated over the 4 x 128 (row, 32-block)
    MX scales it covers (exact);
  - FP4 weights are widened code by code to e4m3 bytes (every e2m1 value is an e4m3 value) and keep their
    1x32 scales (exact).
* **Product**: `y = sum_b (qa_b 2^sa_b) . (qw_b 2^sw_b)` with fp32 accumulation, cast to the activation dtype.

Compared with the dequant reference (`gemm.quant_gemm`): with `act_quant=True` the activations already carry
the 1x128 round-trip, which the 1x32 quantisation reproduces exactly (each 1x32 scale is <= its 1x128 scale, so
the e4m3 grid of the sub-block contains the coarser one), and the two agree up to fp32 summation order. With
`act_quant=False` the MX path adds a 1x32 e4m3 rounding of the activations that the dequant path does not
have: close, not equal (tests/unit/npu/test_moe_gemm_mx.py measures it).
"""

from __future__ import annotations

import torch

from .formats import E8M0_BIAS, FP8_MAX, unpack_fp4_codes

MX_BLOCK = 32  # elements per UE8M0 scale along K (OCP MX; asc-devkit MxMatmul)
MX_AMAX_FLOOR = 1e-4  # as the 1x128 activation quantisation (model-spec §8.5)
FP8_WEIGHT_BLOCK = 128  # FP8 checkpoint weights: one UE8M0 per 128x128 block (model-spec §8.3)

# e2m1 code -> the e4m3fn byte of the same value (bias 7, 3 mantissa bits; bit 7 = sign). Also in
# ops/ascendc/moe_gemm/op_kernel/moe_gemm_mx_kernel.h (E2M1_TO_E4M3); a test checks both against FP4_LUT.
FP4_TO_E4M3_BYTES = torch.tensor([0x00, 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48, 0x4C,
                                  0x80, 0xB0, 0xB8, 0xBC, 0xC0, 0xC4, 0xC8, 0xCC], dtype=torch.uint8)


def _check_k(name: str, k: int) -> None:
    if k % MX_BLOCK:
        raise ValueError(f"{name}: the last dim ({k}) must be a multiple of the MX block {MX_BLOCK}")


def mx_scale_exponent(amax: torch.Tensor, qmax: float = FP8_MAX, floor: float = MX_AMAX_FLOOR) -> torch.Tensor:
    """int32 e with 2^e the smallest power of two >= max(amax, floor) / qmax, exactly (from the fp32 bits).

    amax = f * 2^x with f in [0.5, 1) (torch.frexp); qmax = g * 2^y likewise; then
    e = x - y + (1 if f > g else 0). Valid for normal amax (the floor keeps it normal)."""
    a = amax.float().clamp_min(floor)
    f, x = torch.frexp(a)
    g, y = torch.frexp(torch.tensor(float(qmax)))
    return (x - int(y) + (f > g).to(x.dtype)).to(torch.int32)


def quant_mxfp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (K % 32 == 0) -> (e4m3 [..., K] float8_e4m3fn, e8m0 scale bytes [..., K/32] uint8)."""
    _check_k("quant_mxfp8: x", x.shape[-1])
    xb = x.float().reshape(*x.shape[:-1], -1, MX_BLOCK)  # [..., K/32, 32]
    e = mx_scale_exponent(xb.abs().amax(-1))  # [..., K/32]
    # 2^-e is exact; |x / 2^e| <= 448 by construction, so the clamp only guards rounding at exactly 448
    q = (xb * torch.exp2(-e.float())[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), (e + E8M0_BIAS).clamp(0, 254).to(torch.uint8)


def dequant_mx(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """MXFP8 (e4m3 [..., K] + e8m0 bytes [..., K/32]) -> fp32 [..., K]."""
    _check_k("dequant_mx: q", q.shape[-1])
    if s.shape != (*q.shape[:-1], q.shape[-1] // MX_BLOCK):
        raise ValueError(f"dequant_mx: scale shape {tuple(s.shape)} does not match q {tuple(q.shape)} / {MX_BLOCK}")
    scale = torch.exp2(s.view(torch.uint8).float() - E8M0_BIAS)
    v = q.float().reshape(*q.shape[:-1], -1, MX_BLOCK) * scale[..., None]
    return v.reshape(q.shape)


def mx_weight(w: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint weight as the 950 cube receives it: (e4m3 [N, K], e8m0 bytes [N, K/32]), exactly.

    FP8 (float8_e4m3fn [N, K] + UE8M0 [ceil(N/128), ceil(K/128)]): bytes unchanged, block scales repeated.
    FP4 (int8 [N, K/2] + UE8M0 [N, K/32]): codes widened to e4m3 bytes, scales unchanged."""
    sb = s.view(torch.uint8)
    if w.dtype == torch.int8:
        n, k = w.shape[0], 2 * w.shape[1]
        _check_k("mx_weight: FP4 weight", k)
        if sb.shape != (n, k // MX_BLOCK):
            raise ValueError(f"mx_weight: FP4 scale must be [{n}, {k // MX_BLOCK}], got {tuple(sb.shape)}")
        q = FP4_TO_E4M3_BYTES.to(w.device)[unpack_fp4_codes(w).long()].view(torch.float8_e4m3fn)
        return q, sb.clone()
    if w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"mx_weight: weight must be FP4 (int8) or FP8 (float8_e4m3fn), got {w.dtype}")
    n, k = w.shape
    _check_k("mx_weight: FP8 weight", k)
    grid = (-(-n // FP8_WEIGHT_BLOCK), -(-k // FP8_WEIGHT_BLOCK))
    if tuple(sb.shape) != grid:
        raise ValueError(f"mx_weight: FP8 scale must be {list(grid)}, got {tuple(sb.shape)}")
    per_row = sb.repeat_interleave(FP8_WEIGHT_BLOCK, 0)[:n]  # [N, ceil(K/128)]
    rep = FP8_WEIGHT_BLOCK // MX_BLOCK
    return w, per_row.repeat_interleave(rep, 1)[:, :k // MX_BLOCK].contiguous()


def mx_gemm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y = MXFP8(x) . MX(W)^T, fp32 accumulation, returned in x.dtype. x [M, K]; w, s as `mx_weight` takes."""
    if x.dim() != 2:
        raise ValueError(f"mx_gemm: x must be [M, K], got {tuple(x.shape)}")
    qa, sa = quant_mxfp8(x)
    qw, sw = mx_weight(w, s)
    if qw.shape[1] != x.shape[1]:
        raise ValueError(f"mx_gemm: x has K={x.shape[1]}, the weight K={qw.shape[1]}")
    # every product of two e4m3 values times two powers of two is exact in fp32; only the sums round
    return (dequant_mx(qa, sa) @ dequant_mx(qw, sw).T).to(x.dtype)


def mx_grouped_gemm(x: torch.Tensor, ws: list[torch.Tensor], ss: list[torch.Tensor],
                    counts: list[int]) -> torch.Tensor:
    """Rows of x sorted by group, counts[g] rows each, group g times (ws[g], ss[g]); rows past sum(counts)
    belong to no group and stay 0 (the phantom expert of ops/npu/kernels.py). Returns [M, N] x.dtype."""
    if len(counts) != len(ws) or len(ss) != len(ws):
        raise ValueError(f"mx_grouped_gemm: {len(ws)} weights, {len(ss)} scales, {len(counts)} counts")
    if sum(counts) > x.shape[0] or min(counts, default=0) < 0:
        raise ValueError(f"mx_grouped_gemm: counts {counts} do not fit x with {x.shape[0]} rows")
    n = mx_weight(ws[0], ss[0])[0].shape[0]
    y = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device)
    r = 0
    for w, s, c in zip(ws, ss, counts):
        if c:
            y[r:r + c] = mx_gemm(x[r:r + c], w, s)
        r += c
    return y


__all__ = ["FP4_TO_E4M3_BYTES", "MX_BLOCK", "dequant_mx", "mx_gemm", "mx_grouped_gemm", "mx_scale_exponent",
           "mx_weight", "quant_mxfp8"]
