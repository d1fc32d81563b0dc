"""CPU kernels: the references (`ops/reference/`), except where plain torch spends more time dispatching ops than
computing. Chosen for CPU tensors by `ops._call` unless `ASCEND_V4_OP_BACKEND=reference`; each one equals its
reference bit for bit (tests/unit/ops/test_cpu_kernels.py), so choosing it changes speed only.

* `fp8_roundtrip`, `fp4_roundtrip`: the block amax and the quantise-dequantise pass in C (`cpu_native.py`), the
  scales between them in torch with the reference's own ops; fp32 only (anything else, or no C compiler: the
  reference). ~4x faster at decode and prefill sizes.
* `hc_pre`: the Sinkhorn normalisation of mHC is 20 (row, column) steps over a [T, 4, 4] tensor, ~120 tiny torch
  ops of ~2.5 us dispatch each, 12 calls per decode step of `small`. The same float32 steps through numpy (zero
  copy views of the CPU tensor) cost ~0.8 us each: ~0.19 -> 0.08 ms a call (decode sizes; prefill sizes stay in
  torch). The sums run over 4 elements in order in both libraries, so the results are identical.
"""

from __future__ import annotations

import numpy as np
import torch

from . import cpu_native
from .reference import formats as _fmt
from .reference import mhc as _mhc


# Rows up to which numpy wins: beyond, torch's multi-threaded element-wise ops do (a 2048-token prefill: 6 ms a
# call in numpy, 3 ms in torch). Either way the result is the same, bit for bit.
NUMPY_MAX_ROWS = 256


def sinkhorn_numpy(comb: torch.Tensor, hc_eps: float, iters: int) -> torch.Tensor:
    """`reference.mhc.sinkhorn` in numpy float32 (same steps, same order) for a CPU fp32 tensor of at most
    NUMPY_MAX_ROWS rows (decode); the reference itself for more."""
    if comb.shape[0] > NUMPY_MAX_ROWS:
        return _mhc.sinkhorn(comb, hc_eps, iters)
    c, eps = comb.numpy(), np.float32(hc_eps)
    c = c / (c.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdims=True) + eps)
        c = c / (c.sum(-2, keepdims=True) + eps)
    return torch.from_numpy(c)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
           hc_eps: float, sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`reference.mhc.hc_pre` with the numpy Sinkhorn."""
    return _mhc.hc_pre_using(sinkhorn_numpy, x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters)

def fp8_roundtrip(x: torch.Tensor, block: int = 128, amax_floor: float = 1e-4) -> torch.Tensor:
    """`reference.formats.fp8_roundtrip` with the amax and the e4m3 pass in C."""
    lib = cpu_native.load()
    if lib is None or x.dtype != torch.float32 or x.numel() == 0:
        return _fmt.fp8_roundtrip(x, block, amax_floor)
    xc = x.contiguous()
    # the reference's [rows, n/block, 1] amax and its in-place scale steps on it: the same ATen loops, same bits
    amax = cpu_native.block_amax(lib, xc, block).view(-1, x.shape[-1] // block, 1)
    e = amax.clamp_min_(amax_floor).div_(_fmt.FP8_MAX).log2_().ceil_()
    scale = e.clamp_(-_fmt.E8M0_BIAS, 127).exp2_()
    return cpu_native.apply_scaled(lib, "fp8", xc, scale, block).view(x.shape)


def fp4_roundtrip(x: torch.Tensor, block: int = 32, amax_floor: float = 6 * 2.0 ** -126) -> torch.Tensor:
    """`reference.formats.fp4_roundtrip` with the amax and the e2m1 pass in C."""
    lib = cpu_native.load()
    if lib is None or x.dtype != torch.float32 or x.numel() == 0:
        return _fmt.fp4_roundtrip(x, block, amax_floor)
    xc = x.contiguous()
    amax = cpu_native.block_amax(lib, xc, block).view(-1, x.shape[-1] // block, 1)
    scale = torch.exp2(_fmt.pow2_scale_exponent(amax, _fmt.FP4_MAX, amax_floor))
    return cpu_native.apply_scaled(lib, "fp4", xc, scale, block).view(x.shape)


# The CPU kernels by op name (ops/__init__.py merges them over the references).
KERNELS = {"hc_pre": hc_pre, "fp8_roundtrip": fp8_roundtrip, "fp4_roundtrip": fp4_roundtrip}
