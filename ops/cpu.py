"""CPU kernels: the references (`ops/reference/`), except where plain torch spends more time dispatching ops than
computing. Chosen for CPU tensors by `ops._call` unless `ASCEND_V4_OP_BACKEND=reference`; each one equals its
reference bit for bit (tests/unit/ops/test_cpu_kernels.py), so choosing it changes speed only.

* `fp8_roundtrip`, `fp4_roundtrip`: the block amax and the quantise-dequantise pass in C (`cpu_native.py`), the
  scales between them in torch with the reference's own ops; fp32 only (anything else, or no C compiler: the
  reference). 5-25x faster than the torch ops at decode and prefill sizes.
* `hadamard`: the butterfly stages of each row in C (one pass instead of two torch ops per stage).
* `hc_pre`: mHC's Sinkhorn normalisation is 20 (row, column) steps over a [T, 4, 4] tensor, ~120 tiny torch ops of
  ~2.5 us dispatch each, 12 calls per decode step of `small`. It runs in C; without the C kernels, the same
  float32 steps through numpy (zero-copy views, ~0.8 us a step: 0.19 -> 0.08 ms a call) at decode sizes, torch
  above. The sums run over 4 elements in order in all three, so the results are identical.
* `apply_rope` (not a library op; `ops.apply_rope`): the in-place rotation in C, one pass instead of six ops.
* `lm_head` (not an op of the seam's library; `ops.lm_head`): the LM head GEMM, native tiles at a few rows, MKL
  otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu_native
from .reference import formats as _fmt
from .reference import mhc as _mhc
from .reference import rope as _rope


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


def _lib_for(*tensors: torch.Tensor):
    """The native library (built on first use) if every tensor is a non-empty contiguous fp32 CPU tensor and the
    library is available, else None: the callers then run their torch versions."""
    if any(t.dtype != torch.float32 or t.numel() == 0 or not t.is_contiguous() for t in tensors):
        return None
    return cpu_native.load()


def sinkhorn(comb: torch.Tensor, hc_eps: float, iters: int) -> torch.Tensor:
    """`reference.mhc.sinkhorn` in C (in place on the fresh row-softmaxed comb); numpy / torch without it."""
    lib = _lib_for(comb)
    return sinkhorn_numpy(comb, hc_eps, iters) if lib is None else cpu_native.sinkhorn_(lib, comb, hc_eps, iters)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
           hc_eps: float, sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`reference.mhc.hc_pre` with the C (or numpy) Sinkhorn."""
    return _mhc.hc_pre_using(sinkhorn, x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """`reference.formats.hadamard` in C for fp32 rows of at most 4096 values."""
    n = x.shape[-1]
    xc = x.contiguous()
    lib = _lib_for(xc) if n <= 4096 and n & (n - 1) == 0 else None
    return _fmt.hadamard(x) if lib is None else cpu_native.hadamard(lib, xc)


def _round_trip(kind: str, x: torch.Tensor, block: int, scale_of, reference) -> torch.Tensor:
    """A QAT round-trip with its block amax and its quantise-dequantise pass in C; `scale_of` turns the
    reference-shaped [rows, n/block, 1] amax into the scales with the reference's own ops (the same ATen loops on
    the same values: the same bits). `reference` runs where the C kernels do not apply."""
    xc = x.contiguous()
    lib = _lib_for(xc)
    if lib is None:
        return reference()
    amax = cpu_native.block_amax(lib, xc, block).view(-1, x.shape[-1] // block, 1)
    return cpu_native.apply_scaled(lib, kind, xc, scale_of(amax), block).view(x.shape)


def fp8_roundtrip(x: torch.Tensor, block: int = 128, amax_floor: float = 1e-4) -> torch.Tensor:
    """`reference.formats.fp8_roundtrip` with the amax and the e4m3 pass in C."""
    def scale_of(amax: torch.Tensor) -> torch.Tensor:  # the reference's in-place steps
        e = amax.clamp_min_(amax_floor).div_(_fmt.FP8_MAX).log2_().ceil_()
        return e.clamp_(-_fmt.E8M0_BIAS, 127).exp2_()

    return _round_trip("fp8", x, block, scale_of, lambda: _fmt.fp8_roundtrip(x, block, amax_floor))


def fp4_roundtrip(x: torch.Tensor, block: int = 32, amax_floor: float = 6 * 2.0 ** -126) -> torch.Tensor:
    """`reference.formats.fp4_roundtrip` with the amax and the e2m1 pass in C."""
    return _round_trip("fp4", x, block,
                       lambda amax: torch.exp2(_fmt.pow2_scale_exponent(amax, _fmt.FP4_MAX, amax_floor)),
                       lambda: _fmt.fp4_roundtrip(x, block, amax_floor))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """`reference.rope.apply_rope` in C (in place) for contiguous fp32 x and factors."""
    lib = _lib_for(x, cos, sin)
    return _rope.apply_rope(x, cos, sin, inverse) if lib is None else cpu_native.rope_(lib, x, cos, sin, inverse)


# Row counts at which MKL's fp32 GEMM runs the head faster as W @ y^T than as y @ W^T (no native kernel): it picks
# its kernel from the shape, and on [T, 512] x [512, 129280] (2-core AVX-512 VM, torch 2.13) y @ W^T streams the
# weight at memory speed for T <= 3 (10-12 ms) but takes 20-32 ms for 4 <= T <= 32, while W @ y^T holds 19-21 ms
# there; from 64 rows both are compute-bound and equal (docs/perf.md, fourth pass).
HEAD_WXT_ROWS = range(4, 33)
# Row counts at which the native head kernel (AVX-512 builds) runs: [T, 512] x [512, 129280] on the same VM,
# native / MKL's better form: 9.0 / 9.5 ms at T = 1, 9.7 / 10.5 at 2, 10.1 / 20.2 at 4, 11.7 / 20.1 at 8,
# 14.0 / 20.0 at 16, 20.9 / 25.4 at 32, 37.8 / 39.2 at 64 (docs/perf.md); beyond, prefill-sized row counts,
# MKL's packed GEMM is compute-bound and not worth competing with. Within the range each logit's summation order
# is the same whatever the row count.
HEAD_NATIVE_ROWS = range(1, 65)


def _rows_gemm_lib(y: torch.Tensor, w: torch.Tensor, rows: range):
    """The native library if its few-rows GEMM applies to y [T, K] @ w [V, K]^T, else None."""
    V, K = w.shape
    if y.shape[0] not in rows or K % 16 or V % 4:
        return None
    lib = _lib_for(y, w)
    return lib if lib is not None and cpu_native.has_rows_gemm(lib) else None


def lm_head(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 logits y [T, K] @ w [V, K]^T of a CPU LM head: the native tile kernel where it applies (AVX-512
    build, fp32 contiguous operands, K % 16 == 0, V % 4 == 0, HEAD_NATIVE_ROWS rows), otherwise
    MKL in its faster form for the row count. Every form sums the same fp32 products in its own order."""
    lib = _rows_gemm_lib(y, w, HEAD_NATIVE_ROWS)
    if lib is not None:
        return cpu_native.rows_gemm(lib, y, w)
    if y.shape[0] in HEAD_WXT_ROWS:
        return torch.mm(w, y.t()).t()  # [V, T] -> [T, V] view
    return F.linear(y, w)


# The CPU kernels by op name (ops/__init__.py merges them over the references).
KERNELS = {"hc_pre": hc_pre, "fp8_roundtrip": fp8_roundtrip, "fp4_roundtrip": fp4_roundtrip, "hadamard": hadamard}
