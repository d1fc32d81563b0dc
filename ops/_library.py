"""`torch.library` definitions of every ascend_v4 op: schema, fake (meta) impl, and the reference as the
default implementation for every device.

Ledger: importing this module registers the `ascend_v4::*` ops (once per process). Device kernels
(Triton on CUDA, Ascend C / triton-ascend on NPU) are registered on top by `_backends.py`, which
`ascend_v4.ops` calls once at import; with `ASCEND_V4_OP_BACKEND=reference` nothing is registered on top
and the references below run everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import attention as _attn
from .reference import formats as _fmt
from .reference import gemm as _gemm
from .reference import mhc as _mhc

NS = "ascend_v4"


# ---------------------------------------------------------------------------------------------- attention
@torch.library.custom_op(f"{NS}::sparse_attn", mutates_args=())
def sparse_attn(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float) -> Tensor:
    return _attn.sparse_attn(q, kv, idx, sink, scale)


@sparse_attn.register_fake
def _(q, kv, idx, sink, scale):
    return torch.empty_like(q)


@torch.library.custom_op(f"{NS}::indexer_topk", mutates_args=())
def indexer_topk(q: Tensor, k: Tensor, w: Tensor, k_start: Tensor, k_len: Tensor, topk: int) -> Tensor:
    return _attn.indexer_topk(q, k, w, k_start, k_len, topk)


@indexer_topk.register_fake
def _(q, k, w, k_start, k_len, topk):
    return q.new_empty((q.shape[0], topk), dtype=torch.long)


@torch.library.custom_op(f"{NS}::compress_kv", mutates_args=())
def compress_kv(kv: Tensor, score: Tensor) -> Tensor:
    return _attn.compress_kv(kv, score)


@compress_kv.register_fake
def _(kv, score):
    return kv.new_empty((kv.shape[0], kv.shape[2]), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- GEMMs
@torch.library.custom_op(f"{NS}::quant_gemm", mutates_args=())
def quant_gemm(x: Tensor, w: Tensor, s: Tensor, act_quant: bool) -> Tensor:
    return _gemm.quant_gemm(x, w, s, act_quant)


@quant_gemm.register_fake
def _(x, w, s, act_quant):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op(f"{NS}::moe_experts", mutates_args=())
def moe_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w1: list[Tensor], s1: list[Tensor],
                w2: list[Tensor], s2: list[Tensor], w3: list[Tensor], s3: list[Tensor], swiglu_limit: float,
                act_quant: bool) -> Tensor:
    return _gemm.moe_experts(x, topk_ids, topk_weights, w1, s1, w2, s2, w3, s3, swiglu_limit, act_quant)


@moe_experts.register_fake
def _(x, topk_ids, topk_weights, w1, s1, w2, s2, w3, s3, swiglu_limit, act_quant):
    return x.new_empty(x.shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- mHC
@torch.library.custom_op(f"{NS}::moe_gate", mutates_args=())
def moe_gate(logits: Tensor, bias: Tensor | None, tid2eid: Tensor | None, tokens: Tensor, topk: int,
             route_scale: float) -> tuple[Tensor, Tensor]:
    return _gemm.moe_gate(logits, bias, tid2eid, tokens, topk, route_scale)


@moe_gate.register_fake
def _(logits, bias, tid2eid, tokens, topk, route_scale):
    t = logits.shape[0]
    return logits.new_empty((t, topk), dtype=torch.long), logits.new_empty((t, topk), dtype=torch.float32)


@torch.library.custom_op(f"{NS}::hc_pre", mutates_args=())
def hc_pre(x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, norm_eps: float, hc_eps: float,
           sinkhorn_iters: int) -> tuple[Tensor, Tensor, Tensor]:
    return _mhc.hc_pre(x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters)


@hc_pre.register_fake
def _(x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters):
    T, n, D = x.shape
    f32 = torch.float32
    return x.new_empty((T, D)), x.new_empty((T, n), dtype=f32), x.new_empty((T, n, n), dtype=f32)


@torch.library.custom_op(f"{NS}::hc_post", mutates_args=())
def hc_post(f: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    return _mhc.hc_post(f, residual, post, comb)


@hc_post.register_fake
def _(f, residual, post, comb):
    return torch.empty_like(residual)


@torch.library.custom_op(f"{NS}::hc_head", mutates_args=())
def hc_head(x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, norm_eps: float, hc_eps: float) -> Tensor:
    return _mhc.hc_head(x, fn, base, scale, norm_eps, hc_eps)


@hc_head.register_fake
def _(x, fn, base, scale, norm_eps, hc_eps):
    return x.new_empty((x.shape[0], x.shape[2]))


# ---------------------------------------------------------------------------------------------- QAT round-trips
@torch.library.custom_op(f"{NS}::fp8_roundtrip", mutates_args=())
def fp8_roundtrip(x: Tensor, block: int) -> Tensor:
    return _fmt.fp8_roundtrip(x, block)


@fp8_roundtrip.register_fake
def _(x, block):
    return torch.empty_like(x)


@torch.library.custom_op(f"{NS}::fp4_roundtrip", mutates_args=())
def fp4_roundtrip(x: Tensor, block: int) -> Tensor:
    return _fmt.fp4_roundtrip(x, block)


@fp4_roundtrip.register_fake
def _(x, block):
    return torch.empty_like(x)


@torch.library.custom_op(f"{NS}::hadamard", mutates_args=())
def hadamard(x: Tensor) -> Tensor:
    return _fmt.hadamard(x)


@hadamard.register_fake
def _(x):
    return torch.empty_like(x)


# The pure-torch implementation of each op, by name (what the ops above call).
REFERENCE = {
    "sparse_attn": _attn.sparse_attn, "indexer_topk": _attn.indexer_topk, "compress_kv": _attn.compress_kv,
    "quant_gemm": _gemm.quant_gemm, "moe_experts": _gemm.moe_experts, "moe_gate": _gemm.moe_gate,
    "hc_pre": _mhc.hc_pre,
    "hc_post": _mhc.hc_post, "hc_head": _mhc.hc_head, "fp8_roundtrip": _fmt.fp8_roundtrip,
    "fp4_roundtrip": _fmt.fp4_roundtrip, "hadamard": _fmt.hadamard,
}

ALL_OPS = {f._name: f for f in (sparse_attn, indexer_topk, compress_kv, quant_gemm, moe_experts, moe_gate, hc_pre,
                                   hc_post, hc_head, fp8_roundtrip, fp4_roundtrip, hadamard)}


# ---------------------------------------------------------------------------------------------- integer GEMMs
# Appended for the Ascend A2/A3 W8A8 / W4A8 formats written by `ascend-v4 quantize` (reference: int_gemm.py).
from .reference import int_gemm as _int  # noqa: E402


@torch.library.custom_op(f"{NS}::w8a8_gemm", mutates_args=())
def w8a8_gemm(x: Tensor, w: Tensor, w_scale: Tensor) -> Tensor:
    return _int.w8a8_gemm(x, w, w_scale)


@w8a8_gemm.register_fake
def _(x, w, w_scale):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op(f"{NS}::w4a8_gemm", mutates_args=())
def w4a8_gemm(x: Tensor, w_packed: Tensor, w_scale: Tensor) -> Tensor:
    return _int.w4a8_gemm(x, w_packed, w_scale)


@w4a8_gemm.register_fake
def _(x, w_packed, w_scale):
    return x.new_empty((x.shape[0], 2 * w_packed.shape[0]))


@torch.library.custom_op(f"{NS}::int8_act_roundtrip", mutates_args=())
def int8_act_roundtrip(x: Tensor) -> Tensor:
    return _int.int8_act_roundtrip(x)


@int8_act_roundtrip.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op(f"{NS}::moe_experts_int", mutates_args=())
def moe_experts_int(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w1: list[Tensor], s1: list[Tensor],
                    w2: list[Tensor], s2: list[Tensor], w3: list[Tensor], s3: list[Tensor], swiglu_limit: float,
                    int4: bool) -> Tensor:
    return _int.moe_experts_int(x, topk_ids, topk_weights, w1, s1, w2, s2, w3, s3, swiglu_limit, int4)


@moe_experts_int.register_fake
def _(x, topk_ids, topk_weights, w1, s1, w2, s2, w3, s3, swiglu_limit, int4):
    return x.new_empty(x.shape, dtype=torch.float32)


REFERENCE.update({"w8a8_gemm": _int.w8a8_gemm, "w4a8_gemm": _int.w4a8_gemm,
                  "int8_act_roundtrip": _int.int8_act_roundtrip, "moe_experts_int": _int.moe_experts_int})
ALL_OPS.update({f._name: f for f in (w8a8_gemm, w4a8_gemm, int8_act_roundtrip, moe_experts_int)})


# ---------------------------------------------------------------------------------------------- FP8 KV cache
# Appended for the FP8 cache entry (model-spec.md §10.2; reference: kv_fp8.py): pack / unpack and the
# sparse attention that reads packed entries directly.
from .reference import kv_fp8 as _kv8  # noqa: E402


@torch.library.custom_op(f"{NS}::kv_pack_fp8", mutates_args=())
def kv_pack_fp8(kv: Tensor, rope_dim: int) -> Tensor:
    return _kv8.kv_pack_fp8(kv, rope_dim)


@kv_pack_fp8.register_fake
def _(kv, rope_dim):
    return kv.new_empty((kv.shape[0], _kv8.kv_fp8_entry_bytes(kv.shape[1], rope_dim)), dtype=torch.uint8)


@torch.library.custom_op(f"{NS}::kv_unpack_fp8", mutates_args=())
def kv_unpack_fp8(packed: Tensor, head_dim: int, rope_dim: int, dtype: torch.dtype) -> Tensor:
    return _kv8.kv_unpack_fp8(packed, head_dim, rope_dim, dtype)


@kv_unpack_fp8.register_fake
def _(packed, head_dim, rope_dim, dtype):
    return packed.new_empty((packed.shape[0], head_dim), dtype=dtype)


@torch.library.custom_op(f"{NS}::sparse_attn_fp8", mutates_args=())
def sparse_attn_fp8(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float, rope_dim: int) -> Tensor:
    return _kv8.sparse_attn_fp8(q, kv, idx, sink, scale, rope_dim)


@sparse_attn_fp8.register_fake
def _(q, kv, idx, sink, scale, rope_dim):
    return torch.empty_like(q)


REFERENCE.update({"kv_pack_fp8": _kv8.kv_pack_fp8, "kv_unpack_fp8": _kv8.kv_unpack_fp8,
                  "sparse_attn_fp8": _kv8.sparse_attn_fp8})
ALL_OPS.update({f._name: f for f in (kv_pack_fp8, kv_unpack_fp8, sparse_attn_fp8)})


# ---------------------------------------------------------------------------------------------- paged attention
# Appended for paged device kernels (vllm-ascend's npu_sparse_attn_sharedkv): sparse_attn with the block-table
# form of the same reads beside the row list (reference/paged.py says what each argument means).
@torch.library.custom_op(f"{NS}::sparse_attn_paged", mutates_args=())
def sparse_attn_paged(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float, win_table: Tensor,
                      comp_table: Tensor, cu_seqlens_q: Tensor, seqused_kv: Tensor, picks: Tensor | None,
                      max_seqlen_q: int, max_seqlen_kv: int, window: int, window_block: int, comp_base: int,
                      block_size: int, ratio: int) -> Tensor:
    # A device without a paged kernel reads the row form through sparse_attn (its device kernel, if any).
    return torch.ops.ascend_v4.sparse_attn(q, kv, idx, sink, scale)


@sparse_attn_paged.register_fake
def _(q, kv, idx, sink, scale, *_paged):
    return torch.empty_like(q)


def _sparse_attn_paged_reference(q, kv, idx, sink, scale, *_paged):
    """The reference reads the row form only (the block-table form describes the same rows)."""
    return _attn.sparse_attn(q, kv, idx, sink, scale)


REFERENCE["sparse_attn_paged"] = _sparse_attn_paged_reference
ALL_OPS[sparse_attn_paged._name] = sparse_attn_paged
