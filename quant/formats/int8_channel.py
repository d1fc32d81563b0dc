"""`int8_channel`: msModelSlim ascendV1 `W8A8_DYNAMIC` linear (ascend-notes.md §6.3).

Scale layout: `<linear>.weight` int8 [out, in]; `<linear>.weight_scale` fp32 [out, 1], one scale per output
channel; `<linear>.weight_offset` fp32 [out, 1], all zeros (symmetric). W = weight * weight_scale.
Activations are quantised per token at run time (`ascend_v4.ops.w8a8_gemm`).

Quantisation (min-max, like the ModelSlim W8A8-dynamic recipe without its QuaRot / smooth-quant steps):
`amax` = max |W| of the row, `weight_scale = amax / 127`, `weight = clamp(round_half_even(W * (127 / amax)),
-127, 127)`, all in fp32. From FP4 (and from FP8 with 128-multiple input dims) the same arithmetic runs as a
byte table lookup (`_fp4_table`).
"""

from __future__ import annotations

import numpy as np
import torch

from ascend_v4.quant import register_format

from . import _fp4_table as fp4t
from .base import TensorFormat, TensorLayout

QMAX = 127
# A row whose amax is below this is all zeros: its scale would be 0 and 127/amax infinite.
AMAX_FLOOR = 1e-30


@register_format("int8_channel")
class Int8Channel(TensorFormat):
    linear_fmt = "int8"
    quant_type = "W8A8_DYNAMIC"

    def layout(self, out: int, inp: int, down: bool = False) -> dict[str, TensorLayout]:
        return {"weight": TensorLayout((out, inp), torch.int8),
                "weight_scale": TensorLayout((out, 1), torch.float32),
                "weight_offset": TensorLayout((out, 1), torch.float32)}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["weight"].float() * t["weight_scale"].float()

    def convert(self, src: TensorFormat, t: dict[str, torch.Tensor], down: bool = False) -> dict[str, torch.Tensor]:
        if src.name == self.name:
            return dict(t)
        if src.name == "fp4_mx":
            q, amax = fp4_to_int_channel(t["weight"], t["scale"], QMAX, lambda a: np.float32(QMAX) / a)
        elif src.name == "fp8_block" and t["weight"].shape[1] % fp4t.FP8_BLOCK == 0:
            q, amax = fp8_to_int8_channel(t["weight"], t["scale"])
        else:
            q, amax = quantize_dense(src.dequantize(t))
        scale = (amax / np.float32(QMAX)).astype(np.float32)
        return pack(q, scale)


def pack(q: torch.Tensor, scale: np.ndarray) -> dict[str, torch.Tensor]:
    s = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).reshape(-1, 1)
    return {"weight": q, "weight_scale": s, "weight_offset": torch.zeros_like(s)}


def row_amax(w: torch.Tensor) -> np.ndarray:
    return np.maximum(w.abs().amax(1).numpy().astype(np.float32), np.float32(AMAX_FLOOR))


def quantize_dense(w: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """fp32 [out, in] -> (int8 [out, in], row amax fp32 [out]). The generic path (FP8 / BF16 sources)."""
    w = w.float()
    amax = row_amax(w)
    inv = torch.from_numpy(np.float32(QMAX) / amax)
    q = torch.round(w * inv[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, amax


def fp4_to_int_channel(packed: torch.Tensor, scale: torch.Tensor, qmax: int, inv_of_amax, qmin: int | None = None,
                       parts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                       ) -> tuple[torch.Tensor, np.ndarray]:
    """MXFP4 -> per-row integers `clamp(round(W * inv), qmin, qmax)` with inv = inv_of_amax(row amax).

    Returns (int8 [out, in], row amax fp32 [out]). Bit-identical to the dense path on the dequantised weight:
    W * inv == LUT * (2^e * inv) exactly, since scaling by 2^e is exact in fp32.
    `parts`: (bytes, exponents, run amax) when the caller already split the tensor.
    """
    b, e, blk = parts if parts is not None else (*fp4t.split(packed, scale), None)
    if blk is None:
        blk = fp4t.block_amax(b, e)
    o = b.shape[0]
    amax = np.maximum(blk.max(axis=1), np.float32(AMAX_FLOOR)).astype(np.float32)
    inv = np.asarray(inv_of_amax(amax), dtype=np.float32)
    tid, factors = fp4t.factor_tables(e, inv)
    tables = fp4t.pair_tables_int(factors, -qmax if qmin is None else qmin, qmax)
    q = fp4t.gather(b, tid, tables)  # int16 = two int8
    return torch.from_numpy(q.view(np.int8).reshape(o, -1)), amax


def fp8_to_int8_channel(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """FP8 e4m3 [o, i] + UE8M0 128x128 scales -> (int8 [o, i], row amax), by one table lookup per byte (one
    table per distinct 2^e * 127/amax factor of a 1x128 run). Bit-identical to `quantize_dense` on the
    dequantised weight (the same fp32 products; scaling by 2^e is exact)."""
    o, i = w.shape
    b = w.contiguous().view(torch.uint8).numpy().reshape(o, i // fp4t.FP8_BLOCK, fp4t.FP8_BLOCK)
    e = np.repeat(scale.contiguous().view(torch.uint8).numpy().astype(np.int32) - fp4t.E8M0_BIAS,
                  fp4t.FP8_BLOCK, axis=0)[:o]  # [o, i/128]
    blk = fp4t.fp8_run_amax(b, e)
    amax = np.maximum(blk.max(axis=1), np.float32(AMAX_FLOOR)).astype(np.float32)
    tid, factors = fp4t.factor_tables(e, np.float32(QMAX) / amax)
    vals = np.rint(fp4t.E4M3_FINITE[None, :] * factors[:, None])  # NaN bytes (never in real weights) -> 0
    tables = np.clip(vals, -QMAX, QMAX).astype(np.int8)
    return torch.from_numpy(fp4t.gather(b, tid, tables).reshape(o, i)), amax
