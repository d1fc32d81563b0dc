"""NPU (PrivateUse1) implementations of the FP8 KV-cache ops: sparse_attn_fp8, kv_pack_fp8, kv_unpack_fp8.

Ledger: `ops/_backends.py` calls `register()` once per process, after `ops.npu.register()`; it installs
dispatcher entries only (no torch_npu import, no library load). The functions run for NPU tensors and use
the backend that `kernels.current()` resolves (op library, triton-ascend, torch_npu).

sparse_attn_fp8, per call (first match wins; `path()` names the choice):

| path           | when                                                              | what runs |
|----------------|-------------------------------------------------------------------|-----------|
| `ascendc-fp8`  | SoC is an Ascend 950, op library loaded and it has `ascend_v4::npu_sparse_attn_fp8`, q bf16, rope_dim % 16 == 0 | `aclnnSparseAttnKvQuant`: the Ascend C kernel gathers the entries and decodes them to bf16 on the vector cores |
| `decode+<bf16>`| otherwise (A2/A3 have no FP8)                                     | gather the referenced entries, decode them to q.dtype without FP8 dtypes, then `kernels.sparse_attn` (`<bf16>` = its choice: the BF16 Ascend C kernel, triton-ascend or the reference) |

The decode path gathers one entry per index slot when the batch has at most `SLOT_GATHER_MAX` slots (decode:
no host sync, capturable in an ACL graph), and otherwise the distinct entries of each 256-query chunk
(prefill, where window rows are shared by up to 128 queries; one host sync per chunk).

kv_pack_fp8 / kv_unpack_fp8 run without float8 dtypes (A2/A3 torch_npu has no FP8; ascend-notes.md §1):
e4m3 codes are computed from the fp32 bits and decoded by a 256-entry table, bit-exact with the reference.
Evidence: Python checked on CPU under the torch_npu test double (tests/unit/npu/test_npu_sparse_attn_fp8.py);
the 950 path and the binding are written only (docs/kernels.md).
"""

from __future__ import annotations

import functools

import torch

from ..reference.formats import E8M0_BIAS, FP8_MAX, e8m0_to_float, pow2_scale_exponent
from ..reference.kv_fp8 import (AMAX_FLOOR, SCALE_BLOCK, bf16_to_bytes, bytes_to_bf16, gather_entries,
                                kv_fp8_layout)

NS = "ascend_v4"
BINDING_OP = "npu_sparse_attn_fp8"
# Schema of the torch binding (ops/csrc/torch_binding.cpp; a test checks the string is there).
BINDING_SCHEMA = ("npu_sparse_attn_fp8(Tensor q, Tensor kv, Tensor idx, Tensor sink, float scale, int rope_dim) "
                  "-> Tensor")
KERNEL_ROPE_ALIGN = 16  # the Ascend C kernel copies rope bytes in whole 32-byte UB blocks
SOC_950 = range(260, 270)  # torch_npu get_soc_version() ids of the 950 family (ascend-notes.md §1: 260)
SLOT_GATHER_MAX = 1 << 16  # index slots decoded per call without dedup: 64 MiB of bf16 rows at D = 512
_Q_CHUNK = 256  # queries per deduplicated gather on the prefill path


# ---------------------------------------------------------------------------------------------- FP8-free codec
@functools.lru_cache(maxsize=None)
def _e4m3_table(device: torch.device) -> torch.Tensor:
    """fp32 value of every e4m3fn byte, built on the CPU (which has the dtype) and moved to `device`."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().to(device)


def e4m3_codes(v: torch.Tensor) -> torch.Tensor:
    """fp32 values with |v| <= 448 -> e4m3fn bytes, rounded to nearest even like torch's cast (NaN excluded).

    The ulp at |v| is 2^(max(E, -6) - 3) (E = the fp32 exponent; subnormals share the 2^-6 binade's step);
    n = |v| / ulp is rounded half-to-even, and code = 8 (max(E, -6) + 6) + n, which also carries n = 16
    into the next binade. The sign bit is copied (so -0.0 -> 0x80, as the cast gives)."""
    v = v.float().contiguous()
    a = v.abs()
    e = (((a.view(torch.int32) >> 23) & 0xFF) - 127).clamp_min(-6)
    n = torch.round(a / torch.exp2((e - 3).float())).to(torch.int32)  # exact division by a power of two
    code = 8 * (e + 6) + n
    return (code | ((v.view(torch.int32) < 0).to(torch.int32) << 7)).to(torch.uint8)


def kv_pack_fp8(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """reference.kv_fp8.kv_pack_fp8 without a float8 dtype (same scale rule, e4m3 bytes from `e4m3_codes`)."""
    n, hd = kv.shape
    lay = kv_fp8_layout(hd, rope_dim)
    out = torch.zeros(n, lay.entry_bytes, dtype=torch.uint8, device=kv.device)
    blocks = kv[:, :lay.nope].float().reshape(n, lay.scales, SCALE_BLOCK)
    e = pow2_scale_exponent(blocks.abs().amax(-1, keepdim=True), FP8_MAX, AMAX_FLOOR)
    v = (blocks / torch.exp2(e)).clamp(-FP8_MAX, FP8_MAX)
    out[:, :lay.nope] = e4m3_codes(v).reshape(n, lay.nope)
    out[:, lay.rope_offset:lay.scale_offset] = bf16_to_bytes(kv[:, lay.nope:])
    out[:, lay.scale_offset:lay.scale_offset + lay.scales] = (e.squeeze(-1) + E8M0_BIAS).to(torch.uint8)
    return out


def kv_unpack_fp8(packed: torch.Tensor, head_dim: int, rope_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """reference.kv_fp8.kv_unpack_fp8 by table lookup (no float8 dtype)."""
    lay = kv_fp8_layout(head_dim, rope_dim)
    n = packed.shape[0]
    q = _e4m3_table(packed.device)[packed[:, :lay.nope].long()].reshape(n, lay.scales, SCALE_BLOCK)
    scale = e8m0_to_float(packed[:, lay.scale_offset:lay.scale_offset + lay.scales])
    nope = (q * scale[..., None]).reshape(n, lay.nope)
    rope = bytes_to_bf16(packed[:, lay.rope_offset:lay.scale_offset]).float()
    return torch.cat((nope, rope), dim=-1).to(dtype)


# ---------------------------------------------------------------------------------------------- sparse_attn_fp8
def is_950(torch_npu: object) -> bool:
    """True when the visible NPU is an Ascend 950 (the only family with FP8; ascend-notes.md §1)."""
    try:
        return int(torch_npu.npu.get_soc_version()) in SOC_950
    except Exception:  # a half-initialised torch_npu (no driver) raises here: treat as no FP8
        return False


def path(b, q: torch.Tensor, rope_dim: int = 64) -> str:
    """Which implementation `sparse_attn_fp8` uses for `q` under backend `b` (table in the module docstring)."""
    if (b.lib.loaded and q.dtype == torch.bfloat16 and rope_dim % KERNEL_ROPE_ALIGN == 0 and is_950(b.torch_npu)
            and hasattr(getattr(torch.ops, NS), BINDING_OP)):
        return "ascendc-fp8"
    return f"decode+{b.choice('sparse_attn')}"


def _decoded_rows(kv, idx, D, rope_dim, dtype):
    """(rows [R, D] dtype, local idx [T, K]) for the slots of `idx`: one row per slot when there are few,
    else the distinct entries (one host sync)."""
    T, K = idx.shape
    if T * K <= SLOT_GATHER_MAX:
        ix = idx.long()
        rows = kv_unpack_fp8(kv[ix.clamp_min(0).reshape(-1)], D, rope_dim, dtype)  # [T*K, D]
        local = torch.arange(T * K, device=idx.device).view(T, K).masked_fill(ix < 0, -1)
        return rows, local
    packed, local = gather_entries(kv, idx)
    return kv_unpack_fp8(packed, D, rope_dim, dtype), local


def sparse_attn_fp8(q, kv, idx, sink, scale, rope_dim):
    from . import kernels

    b = kernels.current()
    if path(b, q, rope_dim) == "ascendc-fp8":
        return getattr(torch.ops, NS).npu_sparse_attn_fp8(q.contiguous(), kv.contiguous(),
                                                           idx.to(torch.int32).contiguous(),
                                                           sink.float().contiguous(), float(scale), int(rope_dim))
    T, _, D = q.shape
    if T * idx.shape[1] <= SLOT_GATHER_MAX:
        rows, local = _decoded_rows(kv, idx, D, rope_dim, q.dtype)
        return kernels.sparse_attn(q, rows, local, sink, scale)
    out = torch.empty_like(q)
    for t0 in range(0, T, _Q_CHUNK):
        t1 = min(T, t0 + _Q_CHUNK)
        rows, local = _decoded_rows(kv, idx[t0:t1], D, rope_dim, q.dtype)
        out[t0:t1] = kernels.sparse_attn(q[t0:t1], rows, local, sink, scale)
    return out


# ---------------------------------------------------------------------------------------------- registration
def kernel_table() -> dict:
    """{op: NPU implementation} of the FP8 KV-cache ops."""
    return {"sparse_attn_fp8": sparse_attn_fp8, "kv_pack_fp8": kv_pack_fp8, "kv_unpack_fp8": kv_unpack_fp8}


def register() -> None:
    """Install the PrivateUse1 kernels of the FP8 KV-cache ops (no torch_npu import, no library load)."""
    from . import privateuse1_name

    dev = privateuse1_name()
    for op, fn in kernel_table().items():
        torch.library.register_kernel(f"{NS}::{op}", dev, fn)


__all__ = ["BINDING_SCHEMA", "e4m3_codes", "kv_pack_fp8", "kv_unpack_fp8", "is_950", "path", "sparse_attn_fp8",
           "kernel_table", "register"]
