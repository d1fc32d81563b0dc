"""Triton kernels for the `ascend_v4::*` ops (CUDA). The same sources are compile-checked for Ascend by
`tools/check_ascend_lowering.py` (triton-ascend + ascendnpu-ir) and run on CPU tensors under
`TRITON_INTERPRET=1` in `tests/unit/ops/test_triton_*.py`. Evidence per kernel: docs/kernels.md.

One module per kernel family; each exposes plain launchers taking the reference's arguments and returning
the reference's result:
* `attention`: sparse_attn, indexer_topk, compress_kv
* `gemm`: quant_gemm, moe_experts
* `mhc`: hc_pre, hc_post, hc_head

Ledger: importing this package imports neither triton nor a kernel module. `ops/_backends.py` calls
`register()` once per process; only on a machine where CUDA is available does it import the kernels and
register them as the "cuda" implementation of the custom ops (the reference stays the default elsewhere).
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch

log = logging.getLogger("ascend_v4.ops")

NS = "ascend_v4"
# op name -> (kernel module, launcher); the fp8/fp4 round-trips and the Hadamard stay on the reference.
OPS: dict[str, tuple[str, str]] = {
    "sparse_attn": ("attention", "sparse_attn"),
    "indexer_topk": ("attention", "indexer_topk"),
    "compress_kv": ("attention", "compress_kv"),
    "quant_gemm": ("gemm", "quant_gemm"),
    "moe_experts": ("gemm", "moe_experts"),
    "hc_pre": ("mhc", "hc_pre"),
    "hc_post": ("mhc", "hc_post"),
    "hc_head": ("mhc", "hc_head"),
}


def launchers() -> dict[str, Callable]:
    """{op name: Triton launcher}; imports triton and the kernel modules (raises ImportError without triton)."""
    return {op: getattr(importlib.import_module(f"{__name__}.{mod}"), fn) for op, (mod, fn) in OPS.items()}


def register() -> dict[str, str]:
    """Register the Triton launchers as the CUDA kernels of the ascend_v4 ops.

    Returns {"cuda": "triton"} when registered, {} when CUDA is not available (nothing is imported then)
    or triton cannot be imported (one warning). Never raises for a missing triton.
    """
    if not torch.cuda.is_available():
        return {}
    try:
        fns = launchers()
    except ImportError as e:
        log.warning("CUDA is available but the Triton kernels cannot be imported (%s); using the reference ops", e)
        return {}
    for op, fn in fns.items():
        torch.library.register_kernel(f"{NS}::{op}", "cuda", fn)
    return {"cuda": "triton"}


__all__ = ["OPS", "launchers", "register"]
