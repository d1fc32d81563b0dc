"""FP8 KV-cache entry (vLLM's `fp8_ds_mla` for V4, model-spec.md §10.2) and sparse attention over it.

One cache entry holds one K = V row of `head_dim` values, `rope_dim` of them RoPE'd, as raw bytes:

    [ nope e4m3 (1 B/dim) | rope bf16 (2 B/dim, little-endian) | UE8M0 scales (1 B / 64 nope dims), 0-padded ]
      0 .. nope            nope .. nope + 2 rope                  then up to a multiple of 8 bytes

head_dim 512, rope 64: 448 + 128 + 7 (+1 pad) = 584 bytes. The nope dims are quantised exactly as the model's
QAT simulation does (`formats.fp8_roundtrip(x, 64)`: 1x64 runs, scale 2^ceil(log2(max(amax, 1e-4) / 448))),
so decoding an entry gives `fp8_roundtrip(x, 64)` bit for bit, and packing a value that already went through
that round-trip (what the model writes into its cache) loses nothing. RoPE dims are rounded to bf16.

These functions are the CPU implementation and the golden of the `ascend_v4::kv_pack_fp8`,
`::kv_unpack_fp8` and `::sparse_attn_fp8` ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import attention as _attn
from .formats import E8M0_BIAS, FP8_MAX, e8m0_to_float, pow2_scale_exponent

SCALE_BLOCK = 64  # nope dims per UE8M0 scale (model-spec.md §8.5: KV round-trip block 64)
ENTRY_ALIGN = 8  # the scale bytes are zero-padded so that an entry is a multiple of 8 bytes
AMAX_FLOOR = 1e-4  # amax floor of the scale rule; equal to formats.fp8_roundtrip's default
_Q_CHUNK = 256  # queries per step of sparse_attn_fp8: bounds the decoded rows to chunk x K


@dataclass(frozen=True)
class KvFp8Layout:
    """Byte offsets of one entry. nope = head_dim - rope_dim dims, each 1 byte; rope dims 2 bytes each."""

    head_dim: int
    rope_dim: int
    nope: int  # nope dims = bytes of the e4m3 part
    rope_offset: int  # first byte of the bf16 rope part
    scale_offset: int  # first UE8M0 byte
    scales: int  # UE8M0 bytes in use (nope / 64); the rest up to entry_bytes is padding
    entry_bytes: int


def kv_fp8_layout(head_dim: int, rope_dim: int) -> KvFp8Layout:
    """The entry layout for `head_dim` values of which the last `rope_dim` are RoPE dims.

    Raises ValueError (naming the argument) unless 0 <= rope_dim < head_dim and head_dim - rope_dim is a
    positive multiple of 64.
    """
    # (no isinstance checks: under torch.compile the fake impl passes symbolic ints)
    if rope_dim < 0 or rope_dim >= head_dim:
        raise ValueError(f"kv_fp8: rope_dim must be in [0, head_dim={head_dim}), got {rope_dim}")
    nope = head_dim - rope_dim
    if nope % SCALE_BLOCK:
        raise ValueError(f"kv_fp8: the nope part head_dim - rope_dim = {head_dim} - {rope_dim} = {nope} is not a "
                         f"multiple of {SCALE_BLOCK}")
    scales = nope // SCALE_BLOCK
    scale_offset = nope + 2 * rope_dim
    entry = scale_offset + -(-scales // ENTRY_ALIGN) * ENTRY_ALIGN
    return KvFp8Layout(head_dim, rope_dim, nope, nope, scale_offset, scales, entry)


def kv_fp8_entry_bytes(head_dim: int, rope_dim: int) -> int:
    """Bytes per cache entry: 584 for head_dim 512 / rope_dim 64 (model-spec.md §10.2)."""
    return kv_fp8_layout(head_dim, rope_dim).entry_bytes


# ---------------------------------------------------------------------------------------------- bf16 <-> bytes
def bf16_to_bytes(x: torch.Tensor) -> torch.Tensor:
    """[..., n] -> uint8 [..., 2n]: each value rounded to bf16, low byte first (independent of host order)."""
    bits = x.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.stack((bits & 0xFF, bits >> 8), dim=-1).flatten(-2).to(torch.uint8)


def bytes_to_bf16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2n] (low byte first) -> bf16 [..., n]."""
    bits = b[..., 0::2].to(torch.int32) | (b[..., 1::2].to(torch.int32) << 8)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits)  # to the signed range before narrowing
    return bits.to(torch.int16).view(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- pack / unpack
def kv_pack_fp8(kv: torch.Tensor, rope_dim: int = 64) -> torch.Tensor:
    """kv [N, head_dim] float -> uint8 [N, entry_bytes] (layout in the module docstring)."""
    n, hd = kv.shape
    lay = kv_fp8_layout(hd, rope_dim)
    out = torch.zeros(n, lay.entry_bytes, dtype=torch.uint8, device=kv.device)
    blocks = kv[:, :lay.nope].float().reshape(n, lay.scales, SCALE_BLOCK)  # [N, nope/64, 64]
    e = pow2_scale_exponent(blocks.abs().amax(-1, keepdim=True), FP8_MAX, AMAX_FLOOR)  # [N, nope/64, 1]
    q = (blocks / torch.exp2(e)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out[:, :lay.nope] = q.view(torch.uint8).reshape(n, lay.nope)
    out[:, lay.rope_offset:lay.scale_offset] = bf16_to_bytes(kv[:, lay.nope:])
    out[:, lay.scale_offset:lay.scale_offset + lay.scales] = (e.squeeze(-1) + E8M0_BIAS).to(torch.uint8)
    return out


def kv_unpack_fp8(packed: torch.Tensor, head_dim: int, rope_dim: int = 64,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """uint8 [N, entry_bytes] -> [N, head_dim] `dtype`. The nope dims are e4m3 x 2^(s-127) computed in fp32,
    then cast (exact in bf16 and fp32), exactly as `formats.fp8_roundtrip` returns them."""
    lay = kv_fp8_layout(head_dim, rope_dim)
    n = packed.shape[0]
    q = packed[:, :lay.nope].view(torch.float8_e4m3fn).float().reshape(n, lay.scales, SCALE_BLOCK)
    scale = e8m0_to_float(packed[:, lay.scale_offset:lay.scale_offset + lay.scales])  # [N, nope/64]
    nope = (q * scale[..., None]).reshape(n, lay.nope)
    rope = bytes_to_bf16(packed[:, lay.rope_offset:lay.scale_offset]).float()
    return torch.cat((nope, rope), dim=-1).to(dtype)


# ---------------------------------------------------------------------------------------------- attention
def gather_entries(packed: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct entries `idx` refers to, and `idx` renumbered into them.

    packed [N, E]; idx [T, K] int (-1 = empty). Returns (rows [U, E], local [T, K] int64) with
    rows[local[t, k]] = packed[idx[t, k]] where idx >= 0 and local = -1 elsewhere; U >= 1 (a zero entry when
    nothing is referenced, so the attention has a row to point at). One host sync (the number of rows).
    """
    ix = idx.long()
    valid = ix >= 0
    uniq, inv = torch.unique(ix[valid], return_inverse=True)  # sorted: rows keep their pool order
    local = torch.full_like(ix, -1)
    local[valid] = inv
    if uniq.numel() == 0:
        return packed.new_zeros(1, packed.shape[1]), local
    return packed[uniq], local


def sparse_attn_fp8(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float,
                    rope_dim: int = 64) -> torch.Tensor:
    """`attention.sparse_attn` over a pool of packed FP8 entries.

    q [T, H, D]; kv uint8 [N, entry_bytes(D, rope_dim)]; idx [T, K] (-1 = skip); sink [H] fp32. Per chunk of
    queries only the referenced entries are gathered and decoded (to q.dtype, which is exact), then the
    reference attention runs on them. Returns [T, H, D] in q.dtype.
    """
    T, _, D = q.shape
    out = torch.empty_like(q)
    for t0 in range(0, T, _Q_CHUNK):
        t1 = min(T, t0 + _Q_CHUNK)
        rows, local = gather_entries(kv, idx[t0:t1])
        keys = kv_unpack_fp8(rows, D, rope_dim, q.dtype)  # [U, D]
        out[t0:t1] = _attn.sparse_attn(q[t0:t1], keys, local, sink, scale)
    return out
