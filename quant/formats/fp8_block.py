"""`fp8_block`: the official FP8 linear (model-spec.md §8.3).

Scale layout: `<linear>.weight` e4m3fn [out, in]; `<linear>.scale` UE8M0 (float8_e8m0fnu)
[ceil(out/128), ceil(in/128)], one power-of-two scale per 128x128 block: W = w8 * 2^(scale - 127).
Converting *into* this format from FP4 is the lossless recast of `fp8_recast.py`.
"""

from __future__ import annotations

import torch

from ascend_v4.ops.reference.formats import dequant_fp8_block
from ascend_v4.quant import register_format

from .base import TensorFormat, TensorLayout

BLOCK = 128


@register_format("fp8_block")
class FP8Block(TensorFormat):
    linear_fmt = "fp8"

    def layout(self, out: int, inp: int, down: bool = False) -> dict[str, TensorLayout]:
        return {"weight": TensorLayout((out, inp), torch.float8_e4m3fn),
                "scale": TensorLayout((-(-out // BLOCK), -(-inp // BLOCK)), torch.float8_e8m0fnu)}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequant_fp8_block(t["weight"], t["scale"], torch.float32)

    def convert(self, src: TensorFormat, t: dict[str, torch.Tensor], down: bool = False) -> dict[str, torch.Tensor]:
        if src.name == self.name:
            return dict(t)
        if src.name == "fp4_mx":
            from .fp8_recast import recast_fp4_to_fp8

            w, s = recast_fp4_to_fp8(t["weight"], t["scale"])
            return {"weight": w, "scale": s}
        return super().convert(src, t, down)
