"""THE op seam of ascend-v4: the only way the model reaches heavy computation.

Every function here checks its inputs (messages name the argument), then calls a `torch.ops.ascend_v4.*`
op. Each op has a schema, a fake impl (for graph capture / torch.compile), a pure-torch reference that is
the CPU fallback and the test golden (`ascend_v4.ops.reference`), and device kernels registered on top for
CUDA / NPU once at import (`_backends.py`; `ASCEND_V4_OP_BACKEND=reference` forces the references).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _library  # (registers the ascend_v4:: ops)
from ._backends import active_backends, register_device_kernels
from .npu import privateuse1_name
from .reference import rope as _rope

_ops = torch.ops.ascend_v4
# The CPU implementation of each op: the reference, or its CPU kernel (ops/cpu.py, bit-identical) unless the
# references are forced (ASCEND_V4_OP_BACKEND=reference).
_CPU = dict(_library.REFERENCE)
# Two in-between helpers (not torch.library ops) likewise: their CPU kernels unless the references are forced
_CPU_LM_HEAD, _CPU_ROPE = None, _rope.apply_rope
if register_device_kernels()["cpu"] == "cpu":
    from .cpu import KERNELS as _CPU_KERNELS
    from .cpu import apply_rope as _CPU_ROPE
    from .cpu import lm_head as _CPU_LM_HEAD

    _CPU.update(_CPU_KERNELS)
_CPU_OWN = dict(_CPU)  # as chosen at import (tests may route _CPU through device kernels)


def _own_cpu(name: str) -> bool:
    """Whether the CPU path of op `name` runs the project's own implementation (not rerouted by a test)."""
    return _CPU[name] is _CPU_OWN[name]


def _on_npu(x: Tensor) -> bool:
    return x.device.type == privateuse1_name()


def _call(name: str, x: Tensor, *args):
    """Run op `name`. CPU tensors in eager mode call the CPU implementation directly (the reference or its
    CPU kernel): skipping the custom-op dispatcher saves ~30 us a call (about 160 calls per decode step).
    Anything traced (torch.compile, graph capture) or on a device goes through torch.ops.ascend_v4."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _CPU[name](x, *args)
    return getattr(_ops, name)(x, *args)


class OpInputError(ValueError):
    """An op was called with inputs that violate its documented contract."""


def _check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise OpInputError(f"ascend_v4.ops.{op}: {msg}")


def sparse_attn(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float) -> Tensor:
    """Sparse MQA over a shared K=V latent with an attention sink.

    Args:
        q: [T, H, D] queries (bf16/fp32).
        kv: [N, D] key = value rows (window entries and compressed entries of all sequences, any order).
        idx: [T, K] int32/int64 row numbers into `kv` per query, distinct within a row; -1 = empty slot.
        sink: [H] fp32 per-head sink logit, added to the softmax denominator only (zero value).
        scale: softmax scale (D^-0.5 for V4).
    Returns:
        [T, H, D] in q.dtype. Softmax in fp32.
    """
    _check(q.dim() == 3 and kv.dim() == 2 and q.shape[2] == kv.shape[1], "sparse_attn",
           f"q must be [T,H,D] and kv [N,D] with equal D; got q{tuple(q.shape)} kv{tuple(kv.shape)}")
    _check(idx.dim() == 2 and idx.shape[0] == q.shape[0], "sparse_attn",
           f"idx must be [T,K] with T={q.shape[0]}; got {tuple(idx.shape)}")
    _check(not idx.dtype.is_floating_point, "sparse_attn", f"idx must be integer, got {idx.dtype}")
    _check(sink.shape == (q.shape[1],), "sparse_attn", f"sink must be [H={q.shape[1]}], got {tuple(sink.shape)}")
    return _call("sparse_attn", q, kv, idx, sink, scale)


def indexer_topk(q: Tensor, k: Tensor, w: Tensor, k_start: Tensor, k_len: Tensor, topk: int) -> Tensor:
    """Lightning-indexer top-k: score[t, s] = sum_h w[t,h] * relu(q[t,h] . k[s]) for s in the query's range.

    Args:
        q: [T, h, d] indexer queries; k: [N, d] indexer keys of all sequences; w: [T, h] head weights.
        k_start, k_len: [T] int64, the rows of `k` visible to each query (its sequence's causal prefix).
        topk: entries to keep per query.
    Returns:
        [T, topk] int64 global row numbers into `k`, best first (ties: lower row first), -1 where fewer
        than topk are visible.
    """
    _check(q.dim() == 3 and k.dim() == 2 and q.shape[2] == k.shape[1], "indexer_topk",
           f"q must be [T,h,d] and k [N,d]; got q{tuple(q.shape)} k{tuple(k.shape)}")
    _check(w.shape == q.shape[:2], "indexer_topk", f"w must be [T,h]={tuple(q.shape[:2])}, got {tuple(w.shape)}")
    _check(k_start.shape == (q.shape[0],) and k_len.shape == (q.shape[0],), "indexer_topk",
           "k_start and k_len must be [T]")
    _check(topk >= 0, "indexer_topk", f"topk must be >= 0, got {topk}")
    return _call("indexer_topk", q, k, w, k_start.long(), k_len.long(), topk)


def compress_kv(kv: Tensor, score: Tensor) -> Tensor:
    """Gated pooling of the KV compressor: per-channel softmax of `score` over the slot axis, weighted sum.

    Args:
        kv, score: [N, L, d]; L = 8 for CSA (previous window's A half + this window's B half), 128 for HCA.
            Unused slots carry score -inf.
    Returns:
        [N, d] fp32 pooled entries (before the compressor's RMSNorm and RoPE).
    """
    _check(kv.dim() == 3 and kv.shape == score.shape, "compress_kv",
           f"kv and score must both be [N,L,d]; got {tuple(kv.shape)} and {tuple(score.shape)}")
    return _call("compress_kv", kv, score)


def quant_gemm(x: Tensor, w: Tensor, s: Tensor, act_quant: bool, on_grid: bool = False) -> Tensor:
    """x @ W^T for a packed weight: FP8 e4m3 [N, K] + UE8M0 [ceil(N/128), ceil(K/128)], or FP4 e2m1 packed
    int8 [N, K/2] + UE8M0 [N, K/32]. `act_quant` simulates the 1x128 FP8 activation quantisation.

    x: [M, K] bf16/fp32. Returns [M, N] in x.dtype.
    on_grid: the caller vouches that x already went through that quantisation (a layer sharing a quantised
        input). The round trip is idempotent, so on an NPU the op gets act_quant=True, which lets kernels that
        quantise activations themselves (the 950's MX products) take the call for the same result; elsewhere
        the redundant round trip is skipped.
    """
    fp4 = w.dtype == torch.int8
    k = w.shape[1] * 2 if fp4 else w.shape[1]
    _check(x.dim() == 2 and x.shape[1] == k, "quant_gemm",
           f"x must be [M,{k}] for weight {tuple(w.shape)} ({'fp4' if fp4 else str(w.dtype)}), got {tuple(x.shape)}")
    _check(w.dtype in (torch.int8, torch.float8_e4m3fn), "quant_gemm", f"weight dtype {w.dtype} is not fp8/fp4")
    _check(s.dtype == torch.float8_e8m0fnu, "quant_gemm", f"scale dtype {s.dtype} is not float8_e8m0fnu")
    if on_grid and (_on_npu(x) or (x.device.type == "cpu" and not _own_cpu("quant_gemm"))):
        act_quant = True  # (the NPU's MX products use it; elsewhere the redundant round trip is skipped)
    return _call("quant_gemm", x, w, s, act_quant)


def moe_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w1: list[Tensor], s1: list[Tensor],
                w2: list[Tensor], s2: list[Tensor], w3: list[Tensor], s3: list[Tensor], swiglu_limit: float,
                act_quant: bool) -> Tensor:
    """Routed experts with clamped SwiGLU: sum_k wt_k * W2_e(silu(min(W1_e x, L)) * clamp(W3_e x, -L, L)).

    Args:
        x: [T, D]; topk_ids: [T, k] expert ids (-1 = skip); topk_weights: [T, k] fp32 routing weights
            (multiplied in before W2, as the official reference does).
        w1/w3: per expert [I, D/2] int8 FP4 (or [I, D] FP8); w2: [D, I/2] (or [D, I]); s*: UE8M0 scales.
    Returns:
        [T, D] fp32.
    """
    E = len(w1)
    _check(all(len(l) == E for l in (s1, w2, s2, w3, s3)), "moe_experts", "weight/scale lists differ in length")
    _check(topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == x.shape[0], "moe_experts",
           f"topk_ids/topk_weights must be [T={x.shape[0]},k]; got {tuple(topk_ids.shape)}, "
           f"{tuple(topk_weights.shape)}")
    return _call("moe_experts", x, topk_ids, topk_weights, w1, s1, w2, s2, w3, s3, swiglu_limit, act_quant)


def hc_pre(x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, norm_eps: float, hc_eps: float,
           sinkhorn_iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """mHC pre-mix: x [T, n, D] -> (block input [T, D], post [T, n], comb [T, n, n]) with Sinkhorn.

    fn [(2+n)n, nD], base [(2+n)n], scale [3], all fp32.
    """
    _check(x.dim() == 3 and fn.shape == ((2 + x.shape[1]) * x.shape[1], x.shape[1] * x.shape[2]), "hc_pre",
           f"x [T,n,D] / fn [(2+n)n, nD] mismatch: x{tuple(x.shape)} fn{tuple(fn.shape)}")
    return _call("hc_pre", x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters)


def moe_gate(logits: Tensor, bias: Tensor | None, tid2eid: Tensor | None, tokens: Tensor, topk: int,
             route_scale: float) -> tuple[Tensor, Tensor]:
    """V4 MoE router: sqrt(softplus) scores, top-k of scores + bias (selection only) or the hash table's experts.

    Args:
        logits: [T, E] router logits (x @ gate.weight^T, fp32).
        bias: [E] fp32 selection bias (scored layers), or None in a hash-routed layer.
        tid2eid: [V, k] int64 token -> experts table (hash-routed layers), or None.
        tokens: [T] token ids (read in hash-routed layers).
        topk, route_scale: experts per token; scale of the normalised weights.
    Returns:
        (ids [T, k] int64, weights [T, k] fp32 summing to route_scale per row).
    """
    _check((bias is None) != (tid2eid is None), "moe_gate", "give exactly one of bias (scored layers) and tid2eid "
           "(hash-routed layers)")
    _check(logits.dim() == 2 and tokens.shape == (logits.shape[0],), "moe_gate",
           f"logits must be [T, E] and tokens [T]; got {tuple(logits.shape)} and {tuple(tokens.shape)}")
    _check(0 < topk <= logits.shape[1], "moe_gate", f"topk must be in 1..E={logits.shape[1]}, got {topk}")
    return _call("moe_gate", logits, bias, tid2eid, tokens, topk, route_scale)


def hc_post(f: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """mHC post-mix: X'_j = post_j * f + sum_i comb[i, j] * residual_i. f [T, D]; residual [T, n, D]."""
    _check(residual.dim() == 3 and f.shape == (residual.shape[0], residual.shape[2]), "hc_post",
           f"f must be [T,D] for residual [T,n,D]; got f{tuple(f.shape)} residual{tuple(residual.shape)}")
    return _call("hc_post", f, residual, post, comb)


def hc_head(x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, norm_eps: float, hc_eps: float) -> Tensor:
    """mHC final collapse of the n streams: x [T, n, D] -> [T, D]. fn [n, nD], base [n], scale [1]."""
    _check(x.dim() == 3 and fn.shape == (x.shape[1], x.shape[1] * x.shape[2]), "hc_head",
           f"x [T,n,D] / fn [n, nD] mismatch: x{tuple(x.shape)} fn{tuple(fn.shape)}")
    return _call("hc_head", x, fn, base, scale, norm_eps, hc_eps)


def lm_head(y: Tensor, w: Tensor) -> Tensor:
    """fp32 LM-head logits y [T, D] @ w [V, D]^T (model-spec §3: the head runs in fp32, y and w fp32).

    Not a `torch.library` op: on every device this is torch's own GEMM, except that CPU tensors take the CPU
    head kernel (`ops/cpu.py` `lm_head`: a native tile kernel, or MKL's faster form for the row count), which sums
    the same fp32 products in another order. With ASCEND_V4_OP_BACKEND=reference, plain `F.linear`.
    """
    _check(y.dim() == 2 and w.dim() == 2 and y.shape[1] == w.shape[1], "lm_head",
           f"y must be [T, D] and w [V, D] with equal D; got y{tuple(y.shape)} w{tuple(w.shape)}")
    _check(y.dtype == w.dtype == torch.float32, "lm_head", f"y and w must be fp32; got {y.dtype}, {w.dtype}")
    if y.device.type == "cpu" and _CPU_LM_HEAD is not None:
        return _CPU_LM_HEAD(y, w)
    return torch.nn.functional.linear(y, w)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Interleaved RoPE of the last rd = cos.shape[-1] dims of x [T, ..., D], IN PLACE; returns x.

    cos, sin: [T, rd] fp32 factors (`model.rope.cos_sin`: C = (cos, cos), S = (-sin, sin) per pair); `inverse`
    rotates back. Not a `torch.library` op (it writes into x): the reference (`reference/rope.py`) on every device,
    its C kernel for CPU tensors (bit-identical).
    """
    rd = cos.shape[-1]
    _check(cos.shape == sin.shape and cos.dim() == 2 and cos.shape[0] == x.shape[0] and rd % 2 == 0
           and rd <= x.shape[-1], "apply_rope",
           f"cos, sin must be [T={x.shape[0]}, rd] with an even rd <= {x.shape[-1]}; got {tuple(cos.shape)}, "
           f"{tuple(sin.shape)}")
    if x.device.type == "cpu":
        return _CPU_ROPE(x, cos, sin, inverse)
    return _rope.apply_rope(x, cos, sin, inverse)


def fp8_roundtrip(x: Tensor, block: int) -> Tensor:
    """QAT simulation: quantise the last dim to e4m3 in 1x`block` runs (pow2 scales, rounded up), dequantise."""
    _check(x.shape[-1] % block == 0, "fp8_roundtrip", f"last dim {x.shape[-1]} not a multiple of {block}")
    return _call("fp8_roundtrip", x, block)


def fp4_roundtrip(x: Tensor, block: int) -> Tensor:
    """QAT simulation: quantise the last dim to e2m1 in 1x`block` runs (pow2 scales, rounded up), dequantise."""
    _check(x.shape[-1] % block == 0, "fp4_roundtrip", f"last dim {x.shape[-1]} not a multiple of {block}")
    return _call("fp4_roundtrip", x, block)


def hadamard(x: Tensor) -> Tensor:
    """Orthonormal Walsh-Hadamard rotation of the last dim (power of two), Sylvester order."""
    n = x.shape[-1]
    _check(n > 0 and n & (n - 1) == 0, "hadamard", f"last dim {n} is not a power of two")
    return _call("hadamard", x)


__all__ = ["sparse_attn", "indexer_topk", "compress_kv", "quant_gemm", "moe_experts", "moe_gate", "hc_pre", "hc_post",
           "hc_head", "fp8_roundtrip", "fp4_roundtrip", "hadamard", "OpInputError", "active_backends"]


# ---------------------------------------------------------------------------------------------- integer GEMMs
def w8a8_gemm(x: Tensor, w: Tensor, w_scale: Tensor) -> Tensor:
    """W8A8_DYNAMIC linear: y = x W^T with W = w * w_scale and per-token dynamic int8 activations.

    Args:
        x: [M, K] bf16/fp32 activations (quantised per row inside the op: scale = amax/127).
        w: [N, K] int8 weight; w_scale: [N, 1] fp32 per-output-channel scale (symmetric, zero offset).
    Returns:
        [M, N] in x.dtype (exact integer accumulation, then a_scale * w_scale in fp32).
    """
    _check(w.dtype == torch.int8 and w.dim() == 2, "w8a8_gemm", f"w must be int8 [N,K], got {w.dtype} {tuple(w.shape)}")
    _check(x.dim() == 2 and x.shape[1] == w.shape[1], "w8a8_gemm",
           f"x must be [M,{w.shape[1]}] for w {tuple(w.shape)}, got {tuple(x.shape)}")
    _check(w_scale.numel() == w.shape[0] and w_scale.dtype == torch.float32, "w8a8_gemm",
           f"w_scale must be fp32 [{w.shape[0]},1], got {w_scale.dtype} {tuple(w_scale.shape)}")
    return _call("w8a8_gemm", x, w, w_scale)


def w4a8_gemm(x: Tensor, w_packed: Tensor, w_scale: Tensor) -> Tensor:
    """W4A8_DYNAMIC linear: as `w8a8_gemm` with an int4 weight in [-8, 7] packed two per byte along the output
    dim (int8 [N/2, K]: row 2j low nibble, row 2j+1 high nibble; msModelSlim ascendV1 layout).

    Args:
        x: [M, K] bf16/fp32; w_packed: [N/2, K] int8; w_scale: [N, 1] fp32.
    Returns:
        [M, N] in x.dtype.
    """
    _check(w_packed.dtype == torch.int8 and w_packed.dim() == 2, "w4a8_gemm",
           f"w_packed must be int8 [N/2,K], got {w_packed.dtype} {tuple(w_packed.shape)}")
    _check(x.dim() == 2 and x.shape[1] == w_packed.shape[1], "w4a8_gemm",
           f"x must be [M,{w_packed.shape[1]}] for w_packed {tuple(w_packed.shape)}, got {tuple(x.shape)}")
    _check(w_scale.numel() == 2 * w_packed.shape[0] and w_scale.dtype == torch.float32, "w4a8_gemm",
           f"w_scale must be fp32 [{2 * w_packed.shape[0]},1], got {w_scale.dtype} {tuple(w_scale.shape)}")
    return _call("w4a8_gemm", x, w_packed, w_scale)


def int8_act_roundtrip(x: Tensor) -> Tensor:
    """Per-token (last dim) dynamic int8 quantise + dequantise, keeping dtype: the activation numerics of
    `w8a8_gemm` / `w4a8_gemm` for layers whose int weights were expanded to dense at load."""
    _check(x.dim() >= 1 and x.shape[-1] > 0, "int8_act_roundtrip",
           f"x must have a non-empty last dim, got {tuple(x.shape)}")
    return _call("int8_act_roundtrip", x)


def moe_experts_int(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w1: list[Tensor], s1: list[Tensor],
                    w2: list[Tensor], s2: list[Tensor], w3: list[Tensor], s3: list[Tensor], swiglu_limit: float,
                    int4: bool) -> Tensor:
    """Routed experts with integer weights (W8A8 / W4A8 of `ascend-v4 quantize`), the maths of `moe_experts` with
    every projection a `w8a8_gemm` (`w4a8_gemm` when `int4`).

    Args:
        x: [T, D]; topk_ids: [T, k] expert positions in the lists (-1 = skip); topk_weights: [T, k] fp32.
        w1/w3: per expert int8 [I, D] (int4: [I/2, D], packed along the output dim); w2: [D, I] ([D/2, I]);
        s*: per expert fp32 per-channel scales [N, 1].
    Returns:
        [T, D] fp32. On the NPU each projection is one grouped `npu_grouped_matmul` call for all experts.
    """
    E = len(w1)
    _check(E > 0 and all(len(t) == E for t in (s1, w2, s2, w3, s3)), "moe_experts_int",
           f"w1, s1, w2, s2, w3, s3 must be lists of the same length E > 0, got "
           f"{[len(t) for t in (w1, s1, w2, s2, w3, s3)]}")
    _check(all(w.dtype == torch.int8 for w in (*w1, *w2, *w3)), "moe_experts_int", "weights must be int8 tensors")
    _check(topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == x.shape[0], "moe_experts_int",
           f"topk_ids and topk_weights must both be [T={x.shape[0]}, k], got {tuple(topk_ids.shape)} and "
           f"{tuple(topk_weights.shape)}")
    return _call("moe_experts_int", x, topk_ids, topk_weights, w1, s1, w2, s2, w3, s3, swiglu_limit, int4)


__all__ += ["w8a8_gemm", "w4a8_gemm", "int8_act_roundtrip", "moe_experts_int"]


# ---------------------------------------------------------------------------------------------- FP8 KV cache
from .reference.kv_fp8 import kv_fp8_entry_bytes, kv_fp8_layout  # noqa: E402  (pure functions, no op)

_KV_FLOAT = (torch.bfloat16, torch.float16, torch.float32)


def _kv_layout(op: str, head_dim: int, rope_dim: int):
    for name, v in (("head_dim", head_dim), ("rope_dim", rope_dim)):
        _check(isinstance(v, int) and not isinstance(v, bool), op, f"{name} must be an int, got {v!r}")
    try:
        return kv_fp8_layout(head_dim, rope_dim)
    except ValueError as e:
        raise OpInputError(f"ascend_v4.ops.{op}: {e}") from None


def kv_pack_fp8(kv: Tensor, rope_dim: int = 64) -> Tensor:
    """Pack K = V rows into FP8 cache entries (model-spec.md §10.2, vLLM `fp8_ds_mla`).

    Entry: nope dims as e4m3 (1 B each) | rope dims as bf16 (2 B each, low byte first) | one UE8M0 exponent
    byte per 64 nope dims, zero-padded to a multiple of 8 bytes (584 B for head_dim 512, rope_dim 64). The
    nope quantisation is `fp8_roundtrip(x, 64)`'s, so `kv_unpack_fp8(kv_pack_fp8(x))` equals
    `fp8_roundtrip(x[:, :nope], 64)` bit for bit in the nope dims; rope dims are rounded to bf16.

    Args:
        kv: [N, head_dim] bf16/fp16/fp32; head_dim - rope_dim must be a positive multiple of 64.
        rope_dim: trailing RoPE dims kept in bf16 (64 for V4).
    Returns:
        uint8 [N, kv_fp8_entry_bytes(head_dim, rope_dim)].
    """
    _check(kv.dim() == 2, "kv_pack_fp8", f"kv must be [N, head_dim], got {tuple(kv.shape)}")
    _check(kv.dtype in _KV_FLOAT, "kv_pack_fp8", f"kv must be bf16/fp16/fp32, got {kv.dtype}")
    _kv_layout("kv_pack_fp8", kv.shape[1], rope_dim)
    return _call("kv_pack_fp8", kv, rope_dim)


def kv_unpack_fp8(packed: Tensor, head_dim: int, rope_dim: int = 64, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Decode FP8 cache entries (layout: `kv_pack_fp8`).

    Args:
        packed: uint8 [N, kv_fp8_entry_bytes(head_dim, rope_dim)].
        head_dim, rope_dim: the row width and its trailing RoPE dims.
        dtype: bf16/fp16/fp32 result dtype (bf16 and fp32 represent every decoded value exactly).
    Returns:
        [N, head_dim] `dtype`.
    """
    lay = _kv_layout("kv_unpack_fp8", head_dim, rope_dim)
    _check(packed.dtype == torch.uint8, "kv_unpack_fp8", f"packed must be uint8 entry bytes, got {packed.dtype}")
    _check(packed.dim() == 2 and packed.shape[1] == lay.entry_bytes, "kv_unpack_fp8",
           f"packed must be [N, {lay.entry_bytes}] for head_dim={head_dim} rope_dim={rope_dim}, "
           f"got {tuple(packed.shape)}")
    _check(dtype in _KV_FLOAT, "kv_unpack_fp8", f"dtype must be bf16/fp16/fp32, got {dtype}")
    return _call("kv_unpack_fp8", packed, head_dim, rope_dim, dtype)


def sparse_attn_fp8(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float, rope_dim: int = 64) -> Tensor:
    """`sparse_attn` over a pool of FP8 cache entries: same maths as `sparse_attn(q, kv_unpack_fp8(kv, D,
    rope_dim, q.dtype), idx, sink, scale)`, without decoding the whole pool.

    Args:
        q: [T, H, D] queries (bf16/fp32).
        kv: uint8 [N, kv_fp8_entry_bytes(D, rope_dim)] packed K = V entries (`kv_pack_fp8`).
        idx: [T, K] int32/int64 entry numbers per query, distinct within a row; -1 = empty slot.
        sink: [H] fp32 per-head sink logit.
        scale: softmax scale.
        rope_dim: trailing RoPE dims of each entry (64 for V4).
    Returns:
        [T, H, D] in q.dtype. Softmax in fp32.
    """
    _check(q.dim() == 3 and q.dtype.is_floating_point, "sparse_attn_fp8",
           f"q must be a float [T,H,D], got {q.dtype} {tuple(q.shape)}")
    lay = _kv_layout("sparse_attn_fp8", q.shape[2], rope_dim)
    _check(kv.dtype == torch.uint8, "sparse_attn_fp8", f"kv must be uint8 FP8 cache entries, got {kv.dtype}")
    _check(kv.dim() == 2 and kv.shape[1] == lay.entry_bytes, "sparse_attn_fp8",
           f"kv must be [N, {lay.entry_bytes}] (entry bytes for D={q.shape[2]}, rope_dim={rope_dim}), "
           f"got {tuple(kv.shape)}")
    _check(idx.dim() == 2 and idx.shape[0] == q.shape[0], "sparse_attn_fp8",
           f"idx must be [T,K] with T={q.shape[0]}; got {tuple(idx.shape)}")
    _check(not idx.dtype.is_floating_point, "sparse_attn_fp8", f"idx must be integer, got {idx.dtype}")
    _check(sink.shape == (q.shape[1],), "sparse_attn_fp8",
           f"sink must be [H={q.shape[1]}], got {tuple(sink.shape)}")
    return _call("sparse_attn_fp8", q, kv, idx, sink, scale, rope_dim)


__all__ += ["kv_pack_fp8", "kv_unpack_fp8", "sparse_attn_fp8", "kv_fp8_entry_bytes", "kv_fp8_layout"]


# ---------------------------------------------------------------------------------------------- paged attention
from .paged import RATIOS as _PAGED_RATIOS  # noqa: E402
from .paged import PagedKV, PagedTables  # noqa: E402


def sparse_attn_paged(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float, paged: PagedKV) -> Tensor:
    """`sparse_attn` over one layer's paged pool, given in two forms that name the same rows: the row list
    `idx` (what the reference and the row-list kernels read) and the block-table form `paged` (what paged
    kernels such as vllm-ascend's `npu_sparse_attn_sharedkv` read; ops/reference/paged.py defines it and
    `paged_rows` turns it into `idx`).

    Args:
        q, kv, idx, sink, scale: as `sparse_attn`; kv [N, D] is the layer's pool (window region, then the
            compressed region from row `paged.comp_base`).
        paged: `PagedKV` (ops/paged.py); its tables are built only on an NPU, the one device with a paged
            kernel (elsewhere the row list goes to `sparse_attn`'s kernel).
    Returns:
        [T, H, D] in q.dtype, equal to `sparse_attn(q, kv, idx, sink, scale)`.
    """
    _check(q.dim() == 3 and kv.dim() == 2 and q.shape[2] == kv.shape[1], "sparse_attn_paged",
           f"q must be [T,H,D] and kv [N,D] with equal D; got q{tuple(q.shape)} kv{tuple(kv.shape)}")
    _check(idx.dim() == 2 and idx.shape[0] == q.shape[0], "sparse_attn_paged",
           f"idx must be [T,K] with T={q.shape[0]}; got {tuple(idx.shape)}")
    _check(sink.shape == (q.shape[1],), "sparse_attn_paged",
           f"sink must be [H={q.shape[1]}], got {tuple(sink.shape)}")
    _check(paged.ratio in _PAGED_RATIOS, "sparse_attn_paged", f"ratio must be one of {_PAGED_RATIOS}, got {paged.ratio}")
    _check(0 <= paged.comp_base <= kv.shape[0] and paged.window_block > 0 and paged.comp_base % paged.window_block == 0,
           "sparse_attn_paged", f"comp_base {paged.comp_base} must be a whole number of window blocks "
           f"({paged.window_block} rows) within kv's {kv.shape[0]} rows")
    cpu = q.device.type == "cpu" and not torch.compiler.is_compiling()
    if (cpu and _own_cpu("sparse_attn_paged")) or (not cpu and not _on_npu(q)):
        # only the NPU has a paged kernel (vllm-ascend's): elsewhere the row list, and no tables are built
        return _call("sparse_attn", q, kv, idx, sink, scale)
    args = (q, kv, idx, sink, scale, *paged.flat())
    return _CPU["sparse_attn_paged"](*args) if cpu else _ops.sparse_attn_paged(*args)


__all__ += ["sparse_attn_paged", "PagedKV", "PagedTables"]
