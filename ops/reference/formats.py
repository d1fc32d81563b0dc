"""Bit-level helpers for the DeepSeek-V4 number formats (model-spec.md §8). Pure torch, any device.

* UE8M0 scale: one unsigned exponent byte, value `2^(b - 127)`; torch dtype `float8_e8m0fnu`.
  torch's cast *to* e8m0 rounds to nearest, which is wrong for scales: we build the byte ourselves
  from `ceil(log2(amax / qmax))` (model-spec.md §16).
* FP8 weights: e4m3fn with one UE8M0 scale per 128x128 block.
* FP4 weights (MXFP4): e2m1 codes packed two per byte, **low nibble = even element**, one UE8M0 scale
  per 1x32 run along the input dim. torch's `float4_e2m1fn_x2` cannot be cast, so we use a LUT.
* Quantisation-aware-training round-trips used by the numerics simulation: activations 1x128 FP8,
  KV 1x64 FP8, indexer 1x32 FP4, all with power-of-two scales rounded *up*.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
E8M0_BIAS = 127
# e2m1 code -> value; bit 3 is the sign.
FP4_LUT = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)
# Decision boundaries between consecutive non-negative e2m1 magnitudes (0, .5, 1, 1.5, 2, 3, 4, 6).
_FP4_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- UE8M0
def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes (dtype float8_e8m0fnu or uint8) -> fp32 powers of two. Byte 255 (NaN) stays NaN."""
    b = s.view(torch.uint8) if s.dtype != torch.uint8 else s
    out = torch.exp2(b.to(torch.float32) - E8M0_BIAS)
    return torch.where(b == 255, torch.full_like(out, float("nan")), out)


def pow2_scale_exponent(amax: torch.Tensor, qmax: float, floor: float) -> torch.Tensor:
    """Integer exponent e with 2^e >= amax/qmax (scale rounded *up* to a power of two), amax floored."""
    ratio = amax.float().clamp_min(floor) / qmax
    return torch.ceil(torch.log2(ratio)).clamp(-E8M0_BIAS, 127)


def exponent_to_e8m0(e: torch.Tensor) -> torch.Tensor:
    """Integer exponents -> UE8M0 tensor (float8_e8m0fnu) holding 2^e."""
    return (e + E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)


# ---------------------------------------------------------------------------------------------- FP8
def _block_scale_grid(s: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """Expand a [ceil(rows/b), ceil(cols/b)] block-scale grid to [rows, cols] fp32."""
    f = e8m0_to_float(s)
    return f.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


def dequant_fp8_block(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32,
                      block: int = 128) -> torch.Tensor:
    """FP8 e4m3 weight [out, in] with UE8M0 scales [ceil(out/b), ceil(in/b)] -> dense `dtype`.

    Exact in bf16 and fp32: an e4m3 value times a power of two needs 4 significant bits.
    """
    o, i = w.shape
    if o % block == 0 and i % block == 0:  # fast path: broadcast one scale per block, no full-size grid
        blocks = w.to(torch.float32).view(o // block, block, i // block, block)
        return (blocks * e8m0_to_float(s)[:, None, :, None]).view(o, i).to(dtype)
    return (w.to(torch.float32) * _block_scale_grid(s, o, i, block)).to(dtype)


def quant_fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [out, in] -> (e4m3 weight, UE8M0 scales [ceil(out/b), ceil(in/b)]) with pow2 scales rounded up."""
    o, i = w.shape
    ob, ib = -(-o // block), -(-i // block)
    wp = torch.zeros(ob * block, ib * block, dtype=torch.float32, device=w.device)
    wp[:o, :i] = w.float()
    blocks = wp.view(ob, block, ib, block)
    amax = blocks.abs().amax(dim=(1, 3))  # [ob, ib]
    e = pow2_scale_exponent(amax, FP8_MAX, 1e-30)
    q = (blocks / torch.exp2(e)[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(ob * block, ib * block)[:o, :i].to(torch.float8_e4m3fn)
    return q.contiguous(), exponent_to_e8m0(e)


# ---------------------------------------------------------------------------------------------- FP4
def unpack_fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [..., n/2] -> uint8 codes [..., n]; byte k holds element 2k (low) and 2k+1 (high)."""
    b = packed.view(torch.uint8)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)


def pack_fp4_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] (n even, values 0..15) -> int8 [..., n/2], low nibble first."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def fp4_codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    return FP4_LUT.to(codes.device)[codes.long()]


def float_to_fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already scaled into [-6, 6]) to the nearest e2m1 code."""
    mag = torch.bucketize(x.abs().clamp(max=FP4_MAX), _FP4_MIDPOINTS.to(x.device))
    return (mag + 8 * (x < 0)).to(torch.uint8)


def dequant_fp4(packed: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32,
                block: int = 32) -> torch.Tensor:
    """MXFP4 weight: packed int8 [out, in/2] + UE8M0 [out, in/32] -> dense [out, in] `dtype`."""
    o = packed.shape[0]
    v = fp4_codes_to_float(unpack_fp4_codes(packed)).view(o, -1, block)  # [out, in/32, 32]
    return (v * e8m0_to_float(s)[..., None]).view(o, -1).to(dtype)


def quant_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [out, in] -> (packed int8 [out, in/2], UE8M0 [out, in/32]); scale = pow2 >= amax/6."""
    o, i = w.shape
    blocks = w.float().view(o, i // block, block)
    e = pow2_scale_exponent(blocks.abs().amax(-1), FP4_MAX, 1e-30)  # [o, i/32]
    codes = float_to_fp4_codes(blocks / torch.exp2(e)[..., None]).view(o, i)
    return pack_fp4_codes(codes), exponent_to_e8m0(e)


# ---------------------------------------------------------------------------------------------- QAT round-trips
def fp8_roundtrip(x: torch.Tensor, block: int = 128, amax_floor: float = 1e-4) -> torch.Tensor:
    """Quantise the last dim in 1x`block` runs to e4m3 with pow2 scales (rounded up), dequantise, keep dtype."""
    shape, n = x.shape, x.shape[-1]
    # (the steps of pow2_scale_exponent, in place where the tensor is ours: decode calls this ~50 times a step,
    # and there every skipped dispatch counts)
    xb = (x if x.dtype == torch.float32 else x.float()).reshape(-1, n // block, block)
    e = xb.abs().amax(-1, keepdim=True).clamp_min_(amax_floor).div_(FP8_MAX).log2_().ceil_()
    scale = e.clamp_(-E8M0_BIAS, 127).exp2_()
    q = (xb / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    q = q.mul_(scale).reshape(shape)
    return q if x.dtype == torch.float32 else q.to(x.dtype)


def round_to_fp4(x: torch.Tensor) -> torch.Tensor:
    """The e2m1 value `float_to_fp4_codes` picks for fp32 x (scaled into [-6, 6]), computed arithmetically: the
    grid steps are 0.5 below 2, 1 below 4 and 2 up to 6, and a tie goes to the smaller magnitude (as bucketize's
    `x <= midpoint`), i.e. ceil(|x| / step - 1/2) * step. Every operation is exact in fp32 (step a power of two,
    |x|/step - 1/2 representable), so this equals the LUT path bit for bit, -0.0 included; about 4x faster on
    CPU than bucketize."""
    mag = x.abs().clamp_(max=FP4_MAX)
    # step = 0.5 * 2^([mag > 1.75] + [mag > 3.5]); in place from here on: at prefill sizes (MBs per call) fresh
    # buffers cost as much as the arithmetic.
    step = (mag > 1.75).to(torch.float32).add_((mag > 3.5).to(torch.float32)).exp2_().mul_(0.5)
    q = mag.div_(step).sub_(0.5).ceil_().mul_(step).add_(0.0)  # + 0.0: ceil(-0.4) is -0.0
    return torch.where(x < 0, -q, q)


def fp4_roundtrip(x: torch.Tensor, block: int = 32, amax_floor: float = 6 * 2.0 ** -126) -> torch.Tensor:
    """Quantise the last dim in 1x`block` runs to e2m1 with pow2 scales (rounded up), dequantise, keep dtype."""
    shape, n = x.shape, x.shape[-1]
    xb = x.float().reshape(-1, n // block, block)
    scale = torch.exp2(pow2_scale_exponent(xb.abs().amax(-1, keepdim=True), FP4_MAX, amax_floor))
    q = round_to_fp4(xb / scale)
    return q.mul_(scale).reshape(shape).to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of the last dim (Sylvester order, scaled by n^-1/2)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard: last dim {n} is not a power of two")
    shape, y = x.shape, x.float().reshape(-1, n)
    # Butterfly stages between two fresh buffers (never into x): each stage writes a + b and a - b straight into
    # the other one, no stack copy; the same sums in the same order as the textbook recursion.
    bufs = (torch.empty_like(y), torch.empty_like(y)) if n > 2 else (torch.empty_like(y),)
    h, i = 1, 0
    while h < n:
        src = y.view(-1, n // (2 * h), 2, h)
        dst = bufs[i % len(bufs)].view(-1, n // (2 * h), 2, h)
        a, b = src[:, :, 0, :], src[:, :, 1, :]
        torch.add(a, b, out=dst[:, :, 0, :])
        torch.sub(a, b, out=dst[:, :, 1, :])
        y = dst.view(-1, n)
        h, i = 2 * h, i + 1
    return (y.reshape(shape) * n ** -0.5).to(x.dtype)
