"""NPU (PrivateUse1) implementations of the ascend_v4:: ops. Each takes the reference's arguments and returns
the reference's result (shapes, dtypes), so the seam and the fake impls are shared.

The implementations here are one function per (op, backend); which ones an op has, in which order, and when
each can run is `candidates.py` (vllm-ascend's ops first, `vllm_ascend_ops.py`; then torch_npu built-ins, our
op library, triton-ascend, the reference). `Backend` holds what a process has (torch_npu, the libraries, the
SoC, the self-check's verdicts) and `Backend.run(op, *args)` calls the first candidate that can take the
inputs; `Backend.describe()` says which one each op uses for bf16 inputs.

torch_npu functions used, with the signatures of torch_npu 2.13.0 (schemas registered in `libtorch_npu.so`,
semantics from `torch_npu/_op_plugin_docs.py` and the aclnn docs):
* `npu_moe_init_routing_v2(x, expert_idx, *, active_num, expert_num, expert_tokens_num_type=1,
  expert_tokens_num_flag=True, quant_mode=-1, active_expert_range, row_idx_type=0)` ->
  (expanded_x [T*k, H], expanded_row_idx [T*k] int32, counts [E] int64, expanded_scale): expert_idx is
  flattened row-major and key-value sorted (deterministic), expanded_x[i] = x[sorted_row_idx[i] // k],
  expanded_row_idx[sorted_row_idx[i]] = i (row_idx_type 0, "gather" index).
* `npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs)` -> out[t] = sum_j probs[t, j] *
  permuted_tokens[sorted_indices[t*k + j]]; indices unique in [0, T*k); permuted_tokens bfloat16 / float16 (the
  `_op_plugin_docs` example runs float16; no float32 in the docs): fp32 takes the same sum in plain torch.
* `npu_grouped_matmul([x], weights, *, group_list, split_item=3, group_type=0, group_list_type=1)`: one x,
  one weight [K, N] per group (transposed views allowed), counts per group, one output; at most 128 groups.
  With int8 x and int8 weights plus `scale=[per-channel [N] bf16 | fp32]`, `per_token_scale=[fp32 [M]]` and
  `output_dtype` bf16 | fp16 ("pertoken full quantisation", table 2 of Ascend/op-plugin
  docs/context/torch_npu-npu_grouped_matmul.md at 07557e50): y = (x @ w) * scale * per_token_scale.
* `npu_dynamic_quant(x)` -> (int8 y, fp32 scale [rows]): scale = rowmax|x| / 127, y = round(x / scale);
  x float16/bfloat16 only.
* `npu_quant_matmul(x1 int8 [M, K], x2 int8 [K, N], scale [N] fp32, *, pertoken_scale [M] fp32,
  output_dtype=bf16|fp16)` -> (x1 . x2) * scale * pertoken_scale.
A2/A3 have no FP8: nothing on the NPU path casts to or from a float8 dtype (the reference does); FP8 and
FP4 bytes are decoded by table lookup.

(*) `npu_moe_gemm` has two kernel variants, chosen per call by its weight_fmt attribute (= the tiling key):
1 / 2 = vector-unit dequantisation to bf16 (every SoC), 11 / 12 = the Ascend 950 native MX path (activations
quantised to MXFP8 per 1x32 in the kernel; golden ops/reference/mx.py). The MX variant is written only, so it
is used only when asked for: ASCEND_V4_NPU_MX_GEMM=1 (or `make_backend(..., mx_requested=True)`), the SoC is
a 950 (`torch_npu.npu.get_soc_version() >= 260`), the op library is loaded and K % 64 == 0 (docs/npu.md).
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from ..reference import formats as _fmt
from . import tiling as _tiling
# re-exported: the backend's names were defined here before backend.py existed (tests and doctor use them)
from .backend import (MX_GEMM_ENV, SOC_ASCEND950, Backend,  # noqa: F401
                      backend, current, make_backend, mx_gemm_requested, soc_version, use_backend)

log = logging.getLogger("ascend_v4.ops")

GMM_MAX_GROUPS = 128  # npu_grouped_matmul: at most 128 weights per call (single x, weight list, single y)
FMT_BF16, FMT_FP8, FMT_FP4 = 0, 1, 2  # weight_fmt attribute of npu_moe_gemm (= tiling_rules.h WeightFmt)


# ---------------------------------------------------------------------------------------------- FP8-free decode
@functools.lru_cache(maxsize=None)
def _e4m3_table(device: torch.device) -> torch.Tensor:
    """fp32 value of every e4m3fn byte (256 entries), built on the CPU (which has the dtype) and moved."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().to(device)


def dense_weight(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed FP8 [N, K] (128x128 UE8M0 blocks) or FP4 int8 [N, K/2] (1x32 UE8M0) -> dense [N, K] `dtype`,
    by table lookup only (same values as reference.formats.dequant_*)."""
    scale = torch.exp2(s.view(torch.uint8).float() - _fmt.E8M0_BIAS)  # e8m0 byte 255 (NaN) never occurs
    if w.dtype == torch.int8:
        codes = _fmt.unpack_fp4_codes(w).long()
        v = _fmt.FP4_LUT.to(w.device)[codes].view(w.shape[0], -1, 32)
        return (v * scale[..., None]).view(w.shape[0], -1).to(dtype)
    n, k = w.shape
    v = _e4m3_table(w.device)[w.view(torch.uint8).long()]
    grid = scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return (v * grid).to(dtype)


def fp8_roundtrip(x: torch.Tensor, block: int) -> torch.Tensor:
    """reference.formats.fp8_roundtrip without a float8 dtype: round to the e4m3 grid in fp32.

    e4m3fn: 3 mantissa bits, normal exponents down to 2^-6, subnormal step 2^-9, max 448. Values are
    already clamped to +-448 and torch.round is round-half-even, like the fp8 cast."""
    shape, n = x.shape, x.shape[-1]
    xb = x.float().reshape(-1, n // block, block)
    scale = torch.exp2(_fmt.pow2_scale_exponent(xb.abs().amax(-1, keepdim=True), _fmt.FP8_MAX, 1e-4))
    v = (xb / scale).clamp(-_fmt.FP8_MAX, _fmt.FP8_MAX)
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -6)))  # subnormals share the 2^-6 binade's step
    step = torch.exp2(e - 3)
    q = torch.round(v / step) * step
    return (q * scale).reshape(shape).to(x.dtype)


# ---------------------------------------------------------------------------------------------- kernels
# One function per (op, backend); `candidates.py` orders them and says when each can run.
def sparse_attn_lib(q, kv, idx, sink, scale):
    return torch.ops.ascend_v4.npu_sparse_attn(q.contiguous(), kv.contiguous(), idx.to(torch.int32).contiguous(),
                                               sink.float().contiguous(), float(scale))


def _weight_fmt(w: torch.Tensor) -> tuple[int, int, int]:
    """(weight_fmt, scale_block_n, scale_block_k) of a packed weight (model-spec §8.3, §8.4)."""
    return (FMT_FP4, 1, 32) if w.dtype == torch.int8 else (FMT_FP8, 128, 128)


# uint8 views of the per-expert weight lists, built once per list (the model passes the same lists each step);
# keyed by id of the first weight, validated through a weak reference (tensors cannot be dict keys by value)
_views: dict[int, tuple[weakref.ref, int, list, list]] = {}


def _byte_views(ws: list[torch.Tensor], ss: list[torch.Tensor]) -> tuple[list, list]:
    hit = _views.get(id(ws[0]))
    if hit is not None and hit[0]() is ws[0] and hit[1] == len(ws):
        return hit[2], hit[3]
    wv, sv = [w.view(torch.uint8) for w in ws], [s.view(torch.uint8) for s in ss]
    _views[id(ws[0])] = (weakref.ref(ws[0]), len(ws), wv, sv)
    return wv, sv


def _lib_gemm(b: Backend, x, ws, ss, counts, out_dtype):
    fmt, bn, bk = _weight_fmt(ws[0])
    if b.mx_gemm and x.shape[1] % _tiling.MX_K_ALIGN == 0:
        fmt += _tiling.MOE_KEY_MX  # 11 / 12: the 950 native MX kernel (weight_fmt = tiling key)
    wv, sv = _byte_views(ws, ss)
    return torch.ops.ascend_v4.npu_moe_gemm(x.contiguous(), wv, sv, counts, fmt, bn, bk, out_dtype)


def _act(x, act_quant):
    # also before the MX kernel: its 1x32 MXFP8 quantisation of a 1x128-round-tripped x is exact, so the MX path
    # keeps the reference's act_quant numerics (ops/reference/mx.py)
    return fp8_roundtrip(x, 128) if act_quant else x


def quant_gemm_lib(x, w, s, act_quant):
    x = _act(x, act_quant)
    counts = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    return _lib_gemm(current(), x, [w], [s], counts, x.dtype)


def quant_gemm_triton(x, w, s, act_quant):
    return current().triton["quant_gemm"](_act(x, act_quant), w, s, False)


def quant_gemm_fp8_free(x, w, s, act_quant):
    x = _act(x, act_quant)
    return F.linear(x, dense_weight(w, s, x.dtype))


def _expert_chunks(counts: list[int]):
    """The experts that received rows, at most GMM_MAX_GROUPS per npu_grouped_matmul call (its limit for a weight
    list): yields (expert ids, first row, end row) of each call, rows sorted by expert as routing left them."""
    active = [e for e, c in enumerate(counts) if c]
    r0 = 0
    for i in range(0, len(active), GMM_MAX_GROUPS):
        chunk = active[i:i + GMM_MAX_GROUPS]
        r1 = r0 + sum(counts[e] for e in chunk)
        yield chunk, r0, r1
        r0 = r1


def _group_list(counts: list[int], chunk: list[int], device) -> torch.Tensor:
    return torch.tensor([counts[e] for e in chunk], dtype=torch.int64, device=device)


def _grouped_gemm_bf16(b: Backend, x, ws, ss, counts_dev, rows_total):
    """npu_grouped_matmul over the experts that received rows, their weights decoded to x.dtype.
    One host sync (the counts): fine eagerly, not capturable in an ACL graph (the op library path is)."""
    counts = counts_dev.tolist()
    out = x.new_zeros(rows_total, ws[0].shape[0])
    for chunk, r0, r1 in _expert_chunks(counts):
        wl = [dense_weight(ws[e], ss[e], x.dtype).t() for e in chunk]  # [K, N] views, "weight transposed"
        out[r0:r1] = b.torch_npu.npu_grouped_matmul([x[r0:r1]], wl, group_list=_group_list(counts, chunk, x.device),
                                                    split_item=3, group_type=0, group_list_type=1)[0]
    return out


def _route(tnpu, x, topk_ids, topk_weights, n_experts: int):
    """torch_npu routing of the (token, slot) pairs: (rows of x sorted by expert [T*k, D], row_idx, rows per real
    expert [E] (device), valid slots [T, k], routing weight of each sorted row [T*k] fp32). Slots with id -1
    (experts of other EP ranks) go to a phantom expert E: it sorts last, no GEMM touches its rows (they stay
    zero) and its unpermute weight is 0, so every index stays valid and unique."""
    T, k = topk_ids.shape
    E = n_experts
    valid = topk_ids >= 0
    ids = torch.where(valid, topk_ids, torch.full_like(topk_ids, E)).to(torch.int32)
    xs, row_idx, counts, _ = tnpu.npu_moe_init_routing_v2(
        x, ids, active_num=T * k, expert_num=E + 1, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        quant_mode=-1, active_expert_range=[0, E + 1], row_idx_type=0)
    wsorted = torch.zeros(T * k, dtype=torch.float32, device=x.device).scatter_(
        0, row_idx.long(), topk_weights.reshape(-1).float())
    return xs, row_idx, counts[:E], valid, wsorted


def _unpermute(tnpu, y, row_idx, valid) -> torch.Tensor:
    """Sum each token's k expert rows back (their routing weights were applied before w2): [T, D] fp32."""
    if y.dtype in (torch.bfloat16, torch.float16):
        # documented for half-precision permuted tokens (and probs of their dtype); the 0/1 probs are exact
        return tnpu.npu_moe_token_unpermute(y, row_idx, probs=valid.to(y.dtype)).float()
    # fp32 (parity runs): the same sum in plain torch
    rows = y.float()[row_idx.long()].view(*valid.shape, -1)  # row_idx[t*k + j] = the sorted row of slot (t, j)
    return (rows * valid.float()[..., None]).sum(1)


def moe_experts_lib(*args):
    """Routed experts with torch_npu routing and our grouped GEMM (`ascend_v4::npu_moe_gemm`)."""
    return _moe_experts(True, *args)


def moe_experts_gmm(*args):
    """Routed experts with torch_npu routing and `npu_grouped_matmul` on BF16-decoded active experts."""
    return _moe_experts(False, *args)


def _moe_experts(use_lib, x, topk_ids, topk_weights, w1, s1, w2, s2, w3, s3, swiglu_limit, act_quant):
    """Routed experts (reference.gemm.moe_experts semantics) with torch_npu routing (`_route`)."""
    b = current()
    T, k = topk_ids.shape
    xs, row_idx, counts, valid, wsorted = _route(b.torch_npu, x, topk_ids, topk_weights, len(w1))
    counts = counts.to(torch.int64)  # [E] rows per real expert; the phantom's rows are the tail
    if use_lib:
        gemm = lambda h, ws, ss: _lib_gemm(b, h, ws, ss, counts, x.dtype)  # noqa: E731  (rows past the groups: 0)
    else:
        gemm = lambda h, ws, ss: _grouped_gemm_bf16(b, h, ws, ss, counts, T * k)  # noqa: E731
    h = fp8_roundtrip(xs, 128) if act_quant else xs  # shared by w1 and w3, as in the reference
    g = gemm(h, w1, s1).float().clamp(max=swiglu_limit)
    u = gemm(h, w3, s3).float().clamp(-swiglu_limit, swiglu_limit)
    a = (F.silu(g) * u * wsorted[:, None]).to(x.dtype)  # routing weight before w2 (reference order)
    if act_quant:
        a = fp8_roundtrip(a, 128)
    return _unpermute(b.torch_npu, gemm(a, w2, s2), row_idx, valid)


def moe_experts_int_gmm(x, topk_ids, topk_weights, w1, s1, w2, s2, w3, s3, swiglu_limit, int4):
    """W8A8 / W4A8 routed experts (reference.int_gemm.moe_experts_int semantics): torch_npu routing, one
    `npu_dynamic_quant` per activation and ONE `npu_grouped_matmul` per projection for all active experts
    ("pertoken full quantisation": int8 x, int8 weights as [K, N] transposed views, per-channel scales, per-token
    scales; <= 128 experts per call). int4 weights are unpacked to int8 per call (the native int4 layout needs an
    offline repack, not done)."""
    tnpu = current().torch_npu
    T, k = topk_ids.shape
    xs, row_idx, counts, valid, wsorted = _route(tnpu, x, topk_ids, topk_weights, len(w1))
    counts = counts.tolist()  # the one host sync: which experts got rows
    # scale dtype decides the output dtype (docs table 2): bf16 scales -> bf16 out; fp32 scales -> fp16 out
    sdt = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32

    def gmm(hq, pt, ws, ss):
        n = ws[0].shape[0] * (2 if int4 else 1)
        out = torch.zeros(T * k, n, dtype=x.dtype, device=x.device)  # the phantom's rows stay zero
        for chunk, r0, r1 in _expert_chunks(counts):
            wl = [(_int().unpack_int4_rows(ws[e]) if int4 else ws[e]).t() for e in chunk]  # [K, N] views
            out[r0:r1] = tnpu.npu_grouped_matmul(
                [hq[r0:r1]], wl, scale=[ss[e].reshape(-1).to(sdt) for e in chunk], per_token_scale=[pt[r0:r1]],
                group_list=_group_list(counts, chunk, x.device), split_item=3, group_type=0, group_list_type=1,
                output_dtype=x.dtype)[0]
        return out

    xq, xpt = tnpu.npu_dynamic_quant(xs.contiguous())  # shared by w1 and w3
    g = gmm(xq, xpt, w1, s1).float().clamp(max=swiglu_limit)
    u = gmm(xq, xpt, w3, s3).float().clamp(-swiglu_limit, swiglu_limit)
    a = (F.silu(g) * u * wsorted[:, None]).to(x.dtype)  # routing weight before w2, as the reference
    aq, apt = tnpu.npu_dynamic_quant(a)
    return _unpermute(tnpu, gmm(aq, apt, w2, s2), row_idx, valid)


def _int():
    from ..reference import int_gemm  # the integer formats' reference (W8A8 / W4A8), imported when used

    return int_gemm


def w8a8_gemm_npu(x, w, w_scale):
    tnpu = current().torch_npu
    xq, a_scale = tnpu.npu_dynamic_quant(x.contiguous())  # per-token int8, scale [M]
    return tnpu.npu_quant_matmul(xq, w.t(), w_scale.reshape(-1).float(), pertoken_scale=a_scale.reshape(-1),
                                 output_dtype=x.dtype)


def w4a8_gemm_npu(x, w_packed, w_scale):
    # int4 rows -> int8 per call (exact); the native int4 npu_quant_matmul path needs an offline repack of the
    # weight into int32 words along K and is not done.
    return w8a8_gemm_npu(x, _int().unpack_int4_rows(w_packed), w_scale)


def int8_act_roundtrip_npu(x):
    shape = x.shape
    q, s = current().torch_npu.npu_dynamic_quant(x.reshape(-1, shape[-1]).contiguous())
    return (q.float() * s.reshape(-1, 1)).reshape(shape).to(x.dtype)


def _dispatch(op: str) -> Callable:
    def run(*args):
        return current().run(op, *args)

    run.__name__ = f"{op}_npu"
    return run


def kernel_table() -> dict[str, Callable]:
    """{op: NPU implementation} for every op registered on PrivateUse1: each runs the first candidate of
    `current()` that accepts its inputs (`candidates.py`), so registering never imports torch_npu or loads a
    library."""
    from .candidates import table

    return {op: _dispatch(op) for op in table()}


# the ops as module functions (tests and sparse_attn_fp8.py call them directly): each dispatches like the table
sparse_attn, quant_gemm, moe_experts = _dispatch("sparse_attn"), _dispatch("quant_gemm"), _dispatch("moe_experts")
w8a8_gemm, w4a8_gemm = _dispatch("w8a8_gemm"), _dispatch("w4a8_gemm")
int8_act_roundtrip = _dispatch("int8_act_roundtrip")


__all__ = ["Backend", "backend", "make_backend", "current", "use_backend", "kernel_table", "dense_weight",
           "fp8_roundtrip", "sparse_attn", "quant_gemm", "moe_experts", "mx_gemm_requested", "soc_version",
           "SOC_ASCEND950", "MX_GEMM_ENV"]
