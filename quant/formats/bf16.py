"""`bf16`: a dense BF16 linear, what ModelSlim keeps "FLOAT" and what the `bf16` output format uses everywhere.

Scale layout: none; `<linear>.weight` bfloat16 [out, in]. Dequantising FP8 (e4m3 x 2^k) and FP4
(e2m1 x 2^k) into BF16 is exact: both need at most 4 significant bits and the exponents stay in range.
"""

from __future__ import annotations

import numpy as np
import torch

from ascend_v4.ops.reference.formats import dequant_fp8_block
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
            return {"weight": dequant_fp8_block(t["weight"], t["scale"], torch.bfloat16)}
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
