"""`bf16`: a dense BF16 linear, what ModelSlim keeps "FLOAT" and what the `bf16` output format uses everywhere.

Scale layout: none; `<linear>.weight` bfloat16 [out, in]. Dequantising FP8 (e4m3 x 2^k) and FP4
(e2m1 x 2^k) into BF16 is exact: both need at most 4 significant bits and the exponents stay in range.
Both conversions run as one byte-table lookup per input byte (`_fp4_table.gather`: a 256-entry table per
distinct block scale), bit-identical to the float reference (`dequant_fp8_block` / `dequant_fp4`).
"""

from __future__ import annotations

import numpy as np
import torch

from ascend_v4.ops.reference.formats import dequant_fp8_block, e8m0_to_float
from ascend_v4.quant import register_format

from . import _fp4_table as fp4t
from .base import TensorFormat, TensorLayout


@register_format("bf16")
class BF16(TensorFormat):
    linear_fmt = "dense"

    def layout(self, out: int, inp: int, down: bool = False) -> dict[str, TensorLayout]:
        return {"weight": TensorLayout((out, inp), torch.bfloat16)}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["weight"].float()

    def convert(self, src: TensorFormat, t: dict[str, torch.Tensor], down: bool = False) -> dict[str, torch.Tensor]:
        if src.name == self.name:
            return dict(t)
        if src.name == "fp8_block":
            return {"weight": fp8_to_bf16(t["weight"], t["scale"])}
        if src.name == "fp4_mx":
            return {"weight": fp4_to_bf16(t["weight"], t["scale"])}
        return super().convert(src, t, down)


def fp4_to_bf16(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """MXFP4 -> bfloat16 [out, in], exactly, by byte-pair table lookup (one table per block exponent)."""
    b, e = fp4t.split(packed, scale)
    o = b.shape[0]
    tid, factors = fp4t.factor_tables(e, np.ones(o, dtype=np.float32))
    vals = torch.from_numpy(np.ascontiguousarray(fp4t.PAIR[None] * factors[:, None, None]))  # exact (pow2)
    tables = vals.to(torch.bfloat16).view(torch.int32).numpy().reshape(len(factors), 256)
    out = fp4t.gather(b, tid, tables)  # int32 = two bf16
    return torch.from_numpy(out).view(torch.bfloat16).reshape(o, -1)


# Scale bytes below this make some e4m3 x 2^(s - 127) products fp32-subnormal (2^-9 x 2^-118 = 2^-127), where a
# vectorised and a scalar fp32 -> bf16 cast need not agree; such tensors (never in a real checkpoint) and NaN
# bytes take the reference path, so the table path's bytes never depend on where an element sat in a vector.
_MIN_TABLE_SCALE_BYTE = 10


def fp8_to_bf16(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 [o, i] + UE8M0 128x128 scales -> bfloat16 [o, i], bit-identical to `dequant_fp8_block(w, scale,
    torch.bfloat16)`, by one table lookup per byte: one 256-entry table per distinct scale byte, each entry
    `bf16(fp32(e4m3) * e8m0_to_float(scale))` computed by the same torch fp32 multiply and cast as the reference.
    Input dims that are not a multiple of 128, NaN weight bytes and NaN / tiny scales use the reference."""
    o, i = w.shape
    blk = fp4t.FP8_BLOCK
    s8 = scale.contiguous().view(torch.uint8).numpy()
    if i % blk or o == 0 or s8.size == 0 or int(s8.min()) < _MIN_TABLE_SCALE_BYTE or int(s8.max()) == 255:
        return dequant_fp8_block(w, scale, torch.bfloat16)
    b = w.contiguous().view(torch.uint8).numpy().reshape(o, i // blk, blk)
    if np.any((b & 0x7F) == 0x7F):  # e4m3fn NaN bytes (0x7F / 0xFF)
        return dequant_fp8_block(w, scale, torch.bfloat16)
    uniq, inv = np.unique(s8, return_inverse=True)
    tid = np.repeat(inv.reshape(s8.shape), blk, axis=0)[:o].astype(np.intp)  # [o, i/128]
    factors = e8m0_to_float(torch.from_numpy(uniq))  # [T] fp32, exactly the reference's scale values
    tables = (torch.from_numpy(fp4t.E4M3)[None, :] * factors[:, None]).to(torch.bfloat16)  # [T, 256]
    out = fp4t.gather(b, tid, tables.view(torch.int16).numpy())
    return torch.from_numpy(out).view(torch.bfloat16).reshape(o, i)
