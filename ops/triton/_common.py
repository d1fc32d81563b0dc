"""Device-side helpers shared by the Triton kernels: number-format decoding and the QAT round-trip.

Everything here is plain integer / fp32 arithmetic plus bitcasts, on purpose: no fp8 or fp4 dtypes in the
kernels, so the same code runs under `TRITON_INTERPRET=1`, on any CUDA arch (fp8 loads need sm89+) and
through triton-ascend (910B has no fp8 unit). Formats: model-spec.md §8; host-side goldens:
`ops/reference/formats.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def next_pow2(n: int, floor: int = 1) -> int:
    """Smallest power of two >= max(n, floor) (Triton block shapes must be powers of two)."""
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def dot_in_fp32(*ts: torch.Tensor) -> bool:
    """tl.dot runs in bf16 (fp32 accumulate) only when every operand is bf16; otherwise fp32 'ieee'."""
    return any(t.dtype != torch.bfloat16 for t in ts)


@triton.jit
def _probe():
    pass


# True when this module was decorated under TRITON_INTERPRET=1 (the jit decorator picks the interpreter at
# decoration time, so this is exactly the mode of every kernel module imported with it).
INTERPRETED = tl.constexpr(type(_probe).__name__ == "InterpretedFunction")


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """fp32 `x` -> `dtype` rounding to nearest even, as a GPU cast does. The interpreter's fp32 -> bf16 cast
    truncates instead, so there the rounding is applied to the fp32 bits first and the cast is then exact.
    """
    if INTERPRETED:
        if dtype == tl.bfloat16:
            b = x.to(tl.int32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
            x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mma(a, b, F32: tl.constexpr):
    """a @ b with fp32 accumulation; bf16 operands, or exact fp32 ('ieee', never TF32) when F32.

    The interpreter's numpy matmul cannot multiply bf16 (it sees the raw 16-bit patterns), so there the
    bf16 product is emulated as an exact fp32 dot of the bf16-rounded operands: bf16 x bf16 products are
    exact in fp32, so the numerics are those of a bf16 MMA with fp32 accumulation.
    """
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif INTERPRETED:
        a = cast_to(a.to(tl.float32), tl.bfloat16).to(tl.float32)
        b = cast_to(b.to(tl.float32), tl.bfloat16).to(tl.float32)
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def e8m0_to_f32(b):
    """UE8M0 bytes (any int tensor) -> 2^(b-127) as fp32, built from the exponent bits.

    Bytes 0 (2^-127, an fp32 subnormal) and 255 (NaN) do not occur in V4 checkpoints; here they decode to
    0.0 and +inf (the reference gives 2^-127 and NaN).
    """
    b = b.to(tl.int32) & 0xFF
    return (b << 23).to(tl.float32, bitcast=True)


@triton.jit
def fp8e4m3_to_f32(b):
    """e4m3fn bytes -> fp32: normals rebuilt as fp32 bits (bias 7 -> 127), subnormals as m * 2^-9.

    0x7F / 0xFF (NaN in e4m3fn) decode to +-480; they do not occur in V4 weights.
    """
    b = b.to(tl.int32) & 0xFF
    e = (b >> 3) & 0xF
    m = b & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    return tl.where(b >= 128, -mag, mag)


@triton.jit
def fp4e2m1_to_f32(code):
    """e2m1 nibble codes 0..15 -> fp32 (0, .5, 1, 1.5, 2, 3, 4, 6 and negatives; bit 3 = sign)."""
    c = code.to(tl.int32) & 0xF
    e = (c >> 1) & 0x3
    m = c & 0x1
    normal = (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
    return tl.where(c >= 8, -mag, mag)


@triton.jit
def load_wt_tile(w_ptr, s_ptr, n, k, N, K, stride_wn, stride_sn, IS_FP4: tl.constexpr):
    """Dequantised W^T tile [BK, BN] (fp32) of a packed weight, for logical rows `n` [BN], columns `k` [BK].

    FP4: w uint8 [N, K/2] (element 2j in the low nibble of byte j), s [N, K/32].
    FP8: w uint8 (e4m3 bits) [N, K], s [ceil(N/128), ceil(K/128)]. Out-of-range entries are 0.
    """
    mask = (k[:, None] < K) & (n[None, :] < N)
    if IS_FP4:
        byte = tl.load(w_ptr + n[None, :] * stride_wn + (k[:, None] >> 1), mask=mask, other=0).to(tl.int32)
        v = fp4e2m1_to_f32(byte >> ((k[:, None] & 1) * 4))
        sb = tl.load(s_ptr + n[None, :] * stride_sn + (k[:, None] >> 5), mask=mask, other=127)
    else:
        byte = tl.load(w_ptr + n[None, :] * stride_wn + k[:, None], mask=mask, other=0)
        v = fp8e4m3_to_f32(byte)
        sb = tl.load(s_ptr + (n[None, :] >> 7) * stride_sn + (k[:, None] >> 7), mask=mask, other=127)
    return v * e8m0_to_f32(sb)


@triton.jit
def _pow2_exp_bits(e):
    # 2^e as fp32 from an integer exponent tensor (|e| < 127).
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3(y):
    """Round fp32 values with |y| <= 448 to the nearest e4m3fn value, ties to even (what torch's cast does).

    Exact: the ulp of e4m3 at |y| is 2^(max(E, -6) - 3); y / ulp < 16 is split into floor + remainder
    in fp32 without rounding error.
    """
    a = tl.abs(y)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6) - 3
    n = a * _pow2_exp_bits(-e)
    f = tl.floor(n)
    r = n - f
    odd = (f.to(tl.int32) & 1) == 1
    q = f + tl.where((r > 0.5) | ((r == 0.5) & odd), 1.0, 0.0)
    q = q * _pow2_exp_bits(e)
    return tl.where(y < 0, -q, q)


@triton.jit
def fp8_roundtrip_rows(x):
    """QAT round-trip of a [BM, B] fp32 tile, one 1xB run per row (B = the quantisation block, 128):
    scale = 2^ceil(log2(max(amax, 1e-4) / 448)), q = e4m3(x / scale), returns q * scale.

    The ceil is taken on the fp32 bits (exact); the reference goes through torch.log2, which can round a
    ratio just above a power of two down to it (odds ~2^-19 per run).
    """
    amax = tl.max(tl.abs(x), axis=1)
    ratio = tl.maximum(amax, 1e-4) / 448.0
    bits = ratio.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 + tl.where((bits & 0x7FFFFF) != 0, 1, 0)
    scale = _pow2_exp_bits(e)
    y = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
    return round_to_e4m3(y) * scale[:, None]
