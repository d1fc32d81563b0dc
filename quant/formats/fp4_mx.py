"""`fp4_mx`: the official MXFP4 routed-expert linear (model-spec.md §8.4).

Scale layout: `<linear>.weight` int8 [out, in/2], two e2m1 codes per byte (low nibble = even input index);
`<linear>.scale` UE8M0 [out, in/32], one power-of-two scale per 1x32 run along the input dim:
W[o, k] = LUT[code(o, k)] * 2^(scale[o, k // 32] - 127). Only the identity conversion lands here.
"""

from __future__ import annotations

import torch

from ascend_v4.ops.reference.formats import dequant_fp4
from ascend_v4.quant import register_format

from .base import TensorFormat, TensorLayout

RUN = 32


@register_format("fp4_mx")
class FP4MX(TensorFormat):
    linear_fmt = "fp4"

    def layout(self, out: int, inp: int, down: bool = False) -> dict[str, TensorLayout]:
        return {"weight": TensorLayout((out, inp // 2), torch.int8),
                "scale": TensorLayout((out, inp // RUN), torch.float8_e8m0fnu)}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequant_fp4(t["weight"], t["scale"], torch.float32)

    def convert(self, src: TensorFormat, t: dict[str, torch.Tensor], down: bool = False) -> dict[str, torch.Tensor]:
        if src.name == self.name:
            return dict(t)
        return super().convert(src, t, down)
