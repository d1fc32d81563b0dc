"""Triton sparse_attn over FP8 cache entries (`ascend_v4::sparse_attn_fp8`).

Golden: `ops/reference/kv_fp8.py::sparse_attn_fp8`; entry layout: `kv_fp8.kv_fp8_layout` (model-spec.md §10.2).
The kernel is `attention._sparse_attn_kernel` with FP8_ENTRY set: the gathered entries are decoded in registers
(`attention._decode_entries`), so it runs under the interpreter and on any CUDA arch. Not part of
`_interpret._MODULES`/`OPS`: `ops/_backends.py` registers it for CUDA, the test loads it under the interpreter
itself. CUDA only: on 910B the in-register decode overflows the unified buffer at these shapes
(docs/kernels.md). Entry offsets for head dim D and rope_dim R: nope = D - R e4m3 bytes at 0, rope bf16 at
nope, scales at D + R.
"""

from __future__ import annotations

import torch

from ._common import dot_in_fp32
from .attention import launch_sparse_attn

# Entry layout constant of ops/reference/kv_fp8.py, repeated here so that ops/triton stays loadable on its own
# (tools/check_ascend_lowering.py imports it as a standalone package); the seam has validated the shapes.
SCALE_BLOCK = 64


def sparse_attn_fp8(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float,
                    rope_dim: int) -> torch.Tensor:
    """Triton sparse_attn_fp8: q [T, H, D], kv uint8 [N, entry_bytes], idx [T, K] (-1 = skip), sink [H]
    -> [T, H, D] q.dtype. bf16 q: bf16 tensor-core products (decoded entries are exact in bf16, P is rounded
    to bf16 for PV); fp32 q: exact fp32 products."""
    nope = q.shape[2] - rope_dim
    return launch_sparse_attn(q, kv, idx, sink, scale, dot_in_fp32(q), FP8_ENTRY=True, NOPE=nope, ROPE_OFF=nope,
                              SCALE_OFF=nope + 2 * rope_dim, SCALE_BLOCK_=SCALE_BLOCK)


def register() -> dict[str, str]:
    """Register the launcher as the CUDA kernel of ascend_v4::sparse_attn_fp8 (the caller checked CUDA)."""
    torch.library.register_kernel("ascend_v4::sparse_attn_fp8", "cuda", sparse_attn_fp8)
    return {"sparse_attn_fp8": "triton"}


__all__ = ["sparse_attn_fp8", "register"]
