"""Thin building blocks: run-time options, RMSNorm, linear layers over packed FP8/FP4 weights.

Parameter names and stored dtypes mirror the checkpoint (`<name>.weight` + `<name>.scale`), so the loader
assigns tensors by name. Dtype rule the loader follows: it converts a checkpoint tensor to the dtype the
module declares here; packed FP8 / FP4 / UE8M0 tensors are never converted.

Checkpoints converted by `ascend-v4 quantize` store some linears in the Ascend integer formats
(`int8` = ascendV1 W8A8_DYNAMIC, `int4` = W4A8_DYNAMIC; tensor names and layouts from `ascend_v4.quant`):
the loader calls `Linear.set_format` on the meta-built model before assigning tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ascend_v4 import ops
from ascend_v4.ops.reference.formats import dequant_fp4, dequant_fp8_block
from ascend_v4.quant import get_format

FP8, FP4, DENSE = "fp8", "fp4", "dense"
INT8, INT4 = "int8", "int4"  # per-channel int weights with per-token dynamic int8 activations
# Linear fmt -> tensor format (ascend_v4.quant) describing its stored tensors.
_QUANT_FORMAT = {FP8: "fp8_block", FP4: "fp4_mx", DENSE: "bf16", INT8: "int8_channel", INT4: "int4_channel"}
_LINEAR_FMT = {v: k for k, v in _QUANT_FORMAT.items()}
_INT_EXTRA = ("weight_scale", "weight_offset", "scale_bias")


@dataclass(frozen=True)
class ModelOptions:
    """How to run a checkpoint (not what it is: that is `ModelArgs`).

    Attributes:
        dtype: activation / dense-weight dtype (torch.bfloat16 in production, torch.float32 for parity).
        quant_sim: replay the official QAT numerics (FP8 1x128 activation quantisation before FP8/FP4
            GEMMs, FP8 round-trip of the KV nope dims, Hadamard + FP4 round-trips in the indexer).
            On by default; off reproduces a plain-precision implementation such as transformers'.
        dequantize_weights: expand FP8/FP4 weights to `dtype` once at load (more memory, faster matmuls
            where no FP8/FP4 kernel exists, e.g. on CPU). Numerically identical to the packed path.
    """

    dtype: torch.dtype = torch.bfloat16
    quant_sim: bool = True
    dequantize_weights: bool = False


def _param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class RMSNorm(nn.Module):
    """RMSNorm with weight; statistics in fp32 (model-spec §4.1)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _param((dim,), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float32 else x.float()
        w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * w
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-vector RMS normalisation without weight (the per-head q norm)."""
    xf = x if x.dtype == torch.float32 else x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


class Linear(nn.Module):
    """y = x W^T for a weight stored as in the checkpoint.

    fmt "fp8": weight e4m3 [out, in] + scale UE8M0 [ceil(out/128), ceil(in/128)];
    fmt "fp4": weight int8 [out, in/2] (two e2m1 per byte) + scale UE8M0 [out, in/32];
    fmt "dense": weight in `dtype` (BF16 in the checkpoint). `fp32_compute` runs a dense linear in fp32
    whatever the activation dtype (the compressors and the router do, per the reference).
    fmt "int8" / "int4": weight int8 [out, in] / int4 packed along out [out/2, in], plus `weight_scale`,
    `weight_offset` fp32 [out, 1] (+ int4 `scale_bias`), layouts in `ascend_v4.quant.formats`; the input is
    quantised per token to int8 (`ops.w8a8_gemm` / `ops.w4a8_gemm`). `down`: an MoE down projection (its int4
    `scale_bias` is [out, 16]).
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, opts: ModelOptions,
                 fp32_compute: bool = False, dtype: torch.dtype | None = None, down: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.opts, self.fp32_compute, self._dtype, self.down = opts, fp32_compute, dtype, down
        self.weight_scale = self.weight_offset = self.scale_bias = None
        self._declare()

    def _declare(self) -> None:
        fmt, in_features, out_features, opts, dtype = (self.fmt, self.in_features, self.out_features, self.opts,
                                                       self._dtype)
        if fmt in (INT8, INT4):
            lay = get_format(_QUANT_FORMAT[fmt]).layout(out_features, in_features, self.down)
            for sfx, t in lay.items():
                setattr(self, sfx, _param(t.shape, t.dtype))
            self.scale = None
        elif fmt == FP8:
            self.weight = _param((out_features, in_features), torch.float8_e4m3fn)
            self.scale = _param((-(-out_features // 128), -(-in_features // 128)), torch.float8_e8m0fnu)
        elif fmt == FP4:
            self.weight = _param((out_features, in_features // 2), torch.int8)
            self.scale = _param((out_features, in_features // 32), torch.float8_e8m0fnu)
        else:
            self.weight = _param((out_features, in_features), dtype or opts.dtype)
            self.scale = None

    def set_format(self, quant_format: str, down: bool | None = None) -> None:
        """Re-declare the parameters for a linear stored in tensor format `quant_format` (an `ascend_v4.quant`
        format name: fp8_block, fp4_mx, bf16, int8_channel, int4_channel). Call on the meta-built model, before
        loading a converted checkpoint."""
        if quant_format not in _LINEAR_FMT:
            raise ValueError(f"Linear cannot run tensor format {quant_format!r}; known: {sorted(_LINEAR_FMT)}")
        for name in ("weight", "scale", *_INT_EXTRA):
            if name in self._parameters:
                del self._parameters[name]
            setattr(self, name, None)
        self.fmt = _LINEAR_FMT[quant_format]
        if down is not None:
            self.down = down
        self._declare()

    @property
    def is_int(self) -> bool:
        """Integer weights still stored as such (not expanded by `dequantize_`)."""
        return self.fmt in (INT8, INT4) and self.weight_scale is not None

    @property
    def packed(self) -> bool:
        return self.scale is not None or self.is_int

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.is_int:
            t = {sfx: getattr(self, sfx) for sfx in ("weight", *_INT_EXTRA) if getattr(self, sfx) is not None}
            return get_format(_QUANT_FORMAT[self.fmt]).dequantize(t).to(dtype)
        if self.fmt == FP4 and self.packed:
            return dequant_fp4(self.weight, self.scale, dtype)
        if self.packed:
            return dequant_fp8_block(self.weight, self.scale, dtype)
        return self.weight.to(dtype)

    def dequantize_(self, dtype: torch.dtype) -> None:
        """Replace the packed weight by its exact dense expansion (after loading). Integer formats keep their
        per-token int8 activation quantisation (`quantize_input`), so the numerics stay those of the format."""
        if self.packed:
            self.weight = nn.Parameter(self.dense_weight(dtype), requires_grad=False)
            self.scale = None
            for name in _INT_EXTRA:
                setattr(self, name, None)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation this layer actually multiplies (FP8 1x128 round-trip under the QAT simulation; the
        per-token int8 round-trip for integer formats expanded to dense - the packed int ops quantise inside).
        Layers sharing one input quantise it once and pass `prequantized=True`."""
        if self.fmt in (INT8, INT4):
            return x if self.is_int else ops.int8_act_roundtrip(x)
        if self.fmt != DENSE and self.opts.quant_sim:
            return ops.fp8_roundtrip(x.reshape(-1, x.shape[-1]), 128).view(x.shape)
        return x

    def forward(self, x: torch.Tensor, prequantized: bool = False) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.is_int:
            gemm = ops.w8a8_gemm if self.fmt == INT8 else ops.w4a8_gemm
            y = gemm(x2, self.weight, self.weight_scale)
        elif self.packed:
            sim = self.opts.quant_sim
            y = ops.quant_gemm(x2, self.weight, self.scale, sim and not prequantized, on_grid=sim and prequantized)
        else:
            if not prequantized:
                x2 = self.quantize_input(x2)  # same activation numerics as the packed path
            # (dtype checks in Python: a no-op .to() still costs a dispatch, ~60 linears per decode step)
            dt = torch.float32 if self.fp32_compute else x2.dtype
            w = self.weight if self.weight.dtype == dt else self.weight.to(dt)
            y = F.linear(x2 if x2.dtype == dt else x2.to(dt), w)
        return y.reshape(*shape[:-1], self.out_features)
