"""`int4_channel`: msModelSlim ascendV1 `W4A8_DYNAMIC` routed-expert linear (ascend-notes.md §6.3; the layout
vllm-ascend's `AscendW4A8DynamicFusedMoEMethod` loads for msModelSlim checkpoints).

Scale layout:
* `<linear>.weight` int8 [out/2, in]: int4 values in [-8, 7], two per byte **along the output dim**
  (row 2j in the low nibble, row 2j+1 in the high nibble; `ascend_v4.ops.reference.int_gemm.pack_int4_rows`);
* `<linear>.weight_scale` fp32 [out, 1], one scale per output channel; `<linear>.weight_offset` fp32 [out, 1]
  zeros (symmetric); W = int4 * weight_scale;
* `<linear>.scale_bias` fp32: [out, 1] for gate/up (w1/w3), [out, 16] for the down projection (w2) holding 16
  partial sums over consecutive K/16 input chunks (so a TP split of K can slice them). Value:
  `8 * weight_scale[n] * sum_k int4[n, k]` over the chunk - the offset-8 correction vllm-ascend computes at load
  for LLM-Compressor int4 checkpoints; we write the same quantity (not verified against an msModelSlim file).
  Our own runtime does not need it (it is derivable from weight and scale).

Quantisation: per-channel symmetric with a clipped range chosen per row to minimise the squared error
(data-free: msModelSlim's `flex_awq_ssz` also uses activation statistics, which a converter without
calibration data cannot). For a clip ratio `a` from `CLIP_GRID` (1.0 first, so ties keep the full range):
`clip = a * amax`, `weight_scale = clip / 7`, `int4 = clamp(round_half_even(W * (7 / clip)), -8, 7)`.
From FP4 the error of every candidate is evaluated on a per-row histogram of (block exponent, code) instead of
the values (a row holds only a few hundred distinct values), then the chosen clip runs through the byte table.
"""

from __future__ import annotations

import numpy as np
import torch

from ascend_v4.ops.reference.int_gemm import INT4_MAX, INT4_MIN, pack_int4_rows, unpack_int4_rows
from ascend_v4.quant import register_format

from . import _fp4_table as fp4t
from .base import TensorFormat, TensorLayout
from .int8_channel import AMAX_FLOOR, fp4_to_int_channel

CLIP_GRID = np.round(1.0 - 0.025 * np.arange(21), 3)  # 1.0, 0.975, ..., 0.5
SCALE_BIAS_CHUNKS = 16  # down projection: [out, 16 / tp] in the ascendV1 layout; tp = 1 here
OFFSET_CORRECTION = 8.0
# Histogram depth: blocks more than this many binades below the row's largest block exponent quantise to 0
# under every candidate clip, so they add the same error to all candidates and can be left out of the search.
SEARCH_DEPTH = 12
SEARCH_ROWS = 256


@register_format("int4_channel")
class Int4Channel(TensorFormat):
    linear_fmt = "int4"
    quant_type = "W4A8_DYNAMIC"

    def layout(self, out: int, inp: int, down: bool = False) -> dict[str, TensorLayout]:
        return {"weight": TensorLayout((out // 2, inp), torch.int8),
                "weight_scale": TensorLayout((out, 1), torch.float32),
                "weight_offset": TensorLayout((out, 1), torch.float32),
                "scale_bias": TensorLayout((out, SCALE_BIAS_CHUNKS if down else 1), torch.float32)}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return unpack_int4_rows(t["weight"]).float() * t["weight_scale"].float()

    def convert(self, src: TensorFormat, t: dict[str, torch.Tensor], down: bool = False) -> dict[str, torch.Tensor]:
        if src.name == self.name:
            return dict(t)
        if src.name == "fp4_mx":
            b, e = fp4t.split(t["weight"], t["scale"])
            blk = fp4t.block_amax(b, e)
            amax = np.maximum(blk.max(axis=1), np.float32(AMAX_FLOOR)).astype(np.float32)
            clip = (CLIP_GRID[search_clip_fp4(b, e, blk, amax)].astype(np.float32) * amax).astype(np.float32)
            q, _ = fp4_to_int_channel(t["weight"], t["scale"], INT4_MAX, lambda a: np.float32(INT4_MAX) / clip,
                                      qmin=INT4_MIN, parts=(b, e, blk))
        else:
            w = src.dequantize(t)
            amax = np.maximum(w.abs().amax(1).numpy().astype(np.float32), np.float32(AMAX_FLOOR))
            clip = (CLIP_GRID[search_clip_dense(w.numpy(), amax)].astype(np.float32) * amax).astype(np.float32)
            inv = torch.from_numpy(np.float32(INT4_MAX) / clip)
            q = torch.round(w * inv[:, None]).clamp_(INT4_MIN, INT4_MAX).to(torch.int8)
        scale = (clip / np.float32(INT4_MAX)).astype(np.float32)
        return pack(q, scale, down)


def pack(q: torch.Tensor, scale: np.ndarray, down: bool) -> dict[str, torch.Tensor]:
    """int4 values int8 [out, in] + fp32 scale [out] -> the four stored tensors."""
    o, k = q.shape
    s = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).reshape(-1, 1)
    chunks = SCALE_BIAS_CHUNKS if down else 1
    if k % chunks:
        raise ValueError(f"int4_channel: input dim {k} is not a multiple of {chunks} (scale_bias chunks)")
    sums = torch.from_numpy(q.numpy().reshape(o, chunks, k // chunks).sum(-1, dtype=np.int64))  # exact
    bias = (sums.double() * (OFFSET_CORRECTION * s.double())).float()
    return {"weight": pack_int4_rows(q), "weight_scale": s, "weight_offset": torch.zeros_like(s), "scale_bias": bias}


def _grid_error(v: np.ndarray, cnt: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """Squared error of every clip candidate: v, cnt [R, V] (values and their counts), amax [R] -> [R, A]."""
    used = cnt.any(axis=0)  # values absent from every row of the chunk cost nothing
    v, cnt = v[:, used], cnt[:, used]
    err = np.empty((v.shape[0], len(CLIP_GRID)))
    for j, a in enumerate(CLIP_GRID):
        clip = (np.float32(a) * amax).astype(np.float64)[:, None]
        s = clip / INT4_MAX
        q = np.clip(np.rint(v / s), INT4_MIN, INT4_MAX)
        err[:, j] = (cnt * (v - q * s) ** 2).sum(1)
    return err


def search_clip_dense(w: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """Index into CLIP_GRID of the best clip per row of a dense fp32 [out, in] weight."""
    best = np.empty(w.shape[0], dtype=np.intp)
    for r in range(0, w.shape[0], SEARCH_ROWS):
        v = w[r:r + SEARCH_ROWS].astype(np.float64)
        best[r:r + SEARCH_ROWS] = _grid_error(v, np.ones_like(v), amax[r:r + SEARCH_ROWS]).argmin(1)
    return best


# byte -> count of each of the 16 codes it holds (two per byte)
_CODE_COUNT = np.zeros((256, 16))
np.add.at(_CODE_COUNT, (np.arange(256), np.arange(256) & 15), 1)
np.add.at(_CODE_COUNT, (np.arange(256), np.arange(256) >> 4), 1)


def search_clip_fp4(b: np.ndarray, e: np.ndarray, blk_amax: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """Index into CLIP_GRID of the best clip per row of an MXFP4 weight (bytes [o, nb, 16], exponents and
    run amax [o, nb], row amax [o])."""
    o, nb, _ = b.shape
    nonzero = blk_amax > 0
    emax = np.where(nonzero, e, np.iinfo(np.int32).min).max(axis=1)
    emax = np.where(emax == np.iinfo(np.int32).min, 0, emax)
    depth = emax[:, None] - e  # binades below the row's top block
    keep = nonzero & (depth < SEARCH_DEPTH)
    best = np.empty(o, dtype=np.intp)
    for r in range(0, o, SEARCH_ROWS):
        n = min(SEARCH_ROWS, o - r)
        dump = n * SEARCH_DEPTH * 256  # histogram bin of the blocks left out
        key = (np.arange(n, dtype=np.intp)[:, None] * SEARCH_DEPTH + depth[r:r + n]) * 256
        key = np.where(keep[r:r + n], key, dump)[:, :, None] + b[r:r + n]
        hist = np.bincount(np.minimum(key, dump).ravel(), minlength=dump + 1)[:dump]
        cnt = hist.reshape(n * SEARCH_DEPTH, 256).astype(np.float64) @ _CODE_COUNT  # [n*D, 16]
        cnt = cnt.reshape(n, SEARCH_DEPTH * 16)
        v = np.ldexp(fp4t._LUT.astype(np.float64)[None, None, :],
                     (emax[r:r + n, None, None] - np.arange(SEARCH_DEPTH)[None, :, None]).astype(np.int32))
        best[r:r + n] = _grid_error(v.reshape(n, -1), cnt, amax[r:r + n]).argmin(1)
    return best
