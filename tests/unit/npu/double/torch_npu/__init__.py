"""Test double of torch_npu: exactly the torch_npu functions ascend-v4 calls, in plain torch on CPU tensors,
written to their documented semantics (torch_npu 2.13.0: schemas registered in libtorch_npu.so, text of
torch_npu/_op_plugin_docs.py, aclnnMoeInitRoutingV2 docs). Not a mock: each function computes its result and
rejects what the documentation rejects; outputs the documentation calls undefined are filled with NaN (floats)
or a sentinel (ints) so that code relying on them fails.

It is put on sys.path only inside tests (tests/unit/npu/test_npu_double.py); nothing in the package imports it.

Called by ascend-v4: ops/npu/kernels.py (npu_moe_init_routing_v2, npu_moe_token_unpermute,
npu_grouped_matmul, npu_dynamic_quant, npu_quant_matmul), ops/npu/torch_npu_mx.py (npu_dynamic_mx_quant and
npu_quant_matmul's MXFP8 form, float8_e8m0fnu), ascend_v4/cli/doctor.py (__version__, npu.is_available, npu.device_count,
npu.get_soc_version).
"""

from __future__ import annotations

import collections
import functools
import types

import torch

__version__ = "2.13.0+double"
CALLS: collections.Counter = collections.Counter()  # calls per function, for tests to see the path taken


def _counted(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        CALLS[fn.__name__] += 1
        return fn(*args, **kwargs)

    return wrapper
UNDEFINED_INT = -(2 ** 31) + 7

# ---------------------------------------------------------------------------------------------- device module
npu = types.SimpleNamespace(
    is_available=lambda: False,  # CPU tensors only: there is no device behind this double
    device_count=lambda: 0,
    get_soc_version=lambda: -1,
)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"torch_npu double: {msg}")


# ---------------------------------------------------------------------------------------------- MoE routing
@_counted
def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=(), row_idx_type=0, x_dtype=None):
    """Dropless routing: flatten expert_idx [NUM_ROWS, K] row-major, key-value sort by expert id (stable:
    the aclnn op is documented deterministic), keep ids in active_expert_range [start, end).

    Returns (expanded_x [NUM_ROWS*K, H], expanded_row_idx [NUM_ROWS*K] int32, expert_token_cumsum_or_count
    int64, expanded_scale [NUM_ROWS*K] fp32). expanded_x[i] = x[sorted_row_idx[i] // K] for the first
    `available` rows (rest undefined); row_idx_type 0: expanded_row_idx[sorted_row_idx[i]] = i, -1 for
    dropped sources; row_idx_type 1: expanded_row_idx[i] = sorted_row_idx[i] for the first `available`.
    """
    _check(x.dim() == 2 and expert_idx.dim() == 2 and x.shape[0] == expert_idx.shape[0],
           "x must be [NUM_ROWS, H] and expert_idx [NUM_ROWS, K]")
    _check(expert_idx.dtype == torch.int32, f"expert_idx must be int32, got {expert_idx.dtype}")
    _check(x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.int8), f"x dtype {x.dtype}")
    _check(drop_pad_mode == 0, "only drop_pad_mode=0 (dropless) is supported")
    _check(quant_mode == -1, "this double implements quant_mode=-1 (no quantisation) only")
    _check(expert_tokens_num_type in (1, 2) and expert_tokens_num_flag,
           "expert_tokens_num_type must be 1 or 2 with expert_tokens_num_flag=True (the documented support)")
    _check(expert_num > 0, "expert_num must be > 0")
    _check(row_idx_type in (0, 1), "row_idx_type must be 0 or 1")
    start, end = (active_expert_range if len(active_expert_range) else (0, expert_num))
    _check(0 <= start < end <= expert_num, f"active_expert_range {active_expert_range} vs expert_num {expert_num}")
    rows, k = expert_idx.shape
    flat = expert_idx.reshape(-1).long()
    _check(bool(((flat >= 0) & (flat < expert_num)).all()), "expert ids must lie in [0, expert_num)")
    sorted_ids, sorted_row = torch.sort(flat, stable=True)
    keep = (sorted_ids >= start) & (sorted_ids < end)
    sorted_ids, sorted_row = sorted_ids[keep], sorted_row[keep]
    avail = sorted_row.numel()
    if active_num > 0:
        avail = min(avail, active_num)
        sorted_ids, sorted_row = sorted_ids[:avail], sorted_row[:avail]

    fill = float("nan") if x.dtype.is_floating_point else 0
    expanded_x = torch.full((rows * k, x.shape[1]), fill, dtype=x.dtype)
    expanded_x[:avail] = x[sorted_row // k]
    if row_idx_type == 0:
        expanded_row_idx = torch.full((rows * k,), -1, dtype=torch.int32)
        expanded_row_idx[sorted_row] = torch.arange(avail, dtype=torch.int32)
    else:
        expanded_row_idx = torch.full((rows * k,), UNDEFINED_INT, dtype=torch.int32)
        expanded_row_idx[:avail] = sorted_row.to(torch.int32)
    hist = torch.bincount(sorted_ids - start, minlength=end - start).to(torch.int64)
    if expert_tokens_num_type == 1:
        tokens = hist
    else:  # key_value: (expert id, count) pairs with count > 0 first, then a (0, 0) terminator
        nz = torch.nonzero(hist).flatten()
        tokens = torch.zeros(expert_num, 2, dtype=torch.int64)
        tokens[:nz.numel(), 0] = nz + start
        tokens[:nz.numel(), 1] = hist[nz]
    expanded_scale = torch.full((rows * k,), float("nan"), dtype=torch.float32)
    if scale is not None:
        _check(scale.shape == (rows,), "scale must be [NUM_ROWS] in the non-quantised mode")
        expanded_scale[:avail] = scale.float()[sorted_row // k]
    return expanded_x, expanded_row_idx, tokens, expanded_scale


@_counted
def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    """out[t] = sum_j probs[t, j] * permuted_tokens[sorted_indices[t * topK + j]] (topK = probs.shape[1],
    or 1 without probs). Indices must be unique and in [0, tokens_num * topK)."""
    _check(not padded_mode and restore_shape is None, "padded_mode must be False and restore_shape None")
    _check(permuted_tokens.dim() == 2 and sorted_indices.dim() == 1, "permuted_tokens 2-D, sorted_indices 1-D")
    _check(sorted_indices.dtype == torch.int32, f"sorted_indices must be int32, got {sorted_indices.dtype}")
    # the _op_plugin_docs example runs float16; the review of the docs found no float32 (issue 12, finding 14)
    _check(permuted_tokens.dtype in (torch.float16, torch.bfloat16),
           f"permuted_tokens must be float16/bfloat16, got {permuted_tokens.dtype}")
    _check(probs is None or probs.dtype == permuted_tokens.dtype, "probs must have permuted_tokens' dtype")
    topk = 1 if probs is None else probs.shape[1]
    n = sorted_indices.numel()
    _check(n % topk == 0, "sorted_indices length must be tokens_num * topK")
    _check(topk <= 512, "topK must be <= 512 (A2/A3)")
    idx = sorted_indices.long()
    _check(bool(((idx >= 0) & (idx < permuted_tokens.shape[0])).all()), "sorted_indices out of range")
    _check(torch.unique(idx).numel() == n, "sorted_indices must not repeat")
    rows = permuted_tokens.float()[idx].view(n // topk, topk, -1)
    w = torch.ones(n // topk, topk) if probs is None else probs.float()
    _check(w.shape == (n // topk, topk), f"probs must be [tokens_num, topK], got {tuple(w.shape)}")
    return (rows * w[..., None]).sum(1).to(permuted_tokens.dtype)


# ---------------------------------------------------------------------------------------------- grouped GEMM
_GMM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@_counted
def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, tuning_config=None, output_dtype=None, x_dtype=None,
                       weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None):
    """Grouped matmul y_i = x_i @ weight_i (weight_i is [K, N]; transposed views are allowed).

    Scenarios implemented (group_list a tensor): group_type 0 with one x, a weight list and split_item 2/3
    ("single-multi-single": rows of x split by group_list, one output, equal N, at most 128 weights), and
    group_type -1 with x and weight lists of equal length, split_item 0/1 (one output per group). Non-quantised,
    or "pertoken full quantisation" (docs table 2): x int8, weight int8, scale per weight 1-D [N] bfloat16 (output
    bfloat16) or float32 (output float16), per_token_scale [1-D fp32 [M]]: y = (x @ w) * scale * per_token_scale."""
    _check(all(q is None for q in (offset, antiquant_scale, antiquant_offset, activation_input,
                                   activation_quant_scale, activation_quant_offset)),
           "offset / antiquant / activation inputs are not implemented by this double")
    quant = scale is not None or per_token_scale is not None
    if quant:
        _check(scale is not None and per_token_scale is not None and len(per_token_scale) == 1,
               "pertoken quantisation needs scale (one per weight) and per_token_scale (one tensor)")
        _check(len(scale) == len(weight) and all(t.dim() == 1 for t in scale), "scale: one 1-D [N] per weight")
        _check(all(t.dtype == scale[0].dtype for t in scale), "scale tensors must share one dtype")
        want = {torch.bfloat16: torch.bfloat16, torch.float32: torch.float16}.get(scale[0].dtype)
        _check(want is not None and output_dtype == want, f"pertoken: scale {scale[0].dtype} needs output_dtype "
               f"{want}, got {output_dtype}")
        _check(x[0].dtype == torch.int8 and all(w.dtype == torch.int8 for w in weight), "pertoken: int8 x, int8 w")
        _check(per_token_scale[0].dtype == torch.float32 and per_token_scale[0].shape == (x[0].shape[0],),
               "per_token_scale must be fp32 [M]")
    _check(act_type == 0, "act_type must be 0 (no activation) in the non-quantised scenario")
    _check(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), "x and weight are lists")
    _check(len(weight) <= 128, f"at most 128 weights per call, got {len(weight)}")
    for w in weight:
        _check(w.dim() == 2 and (w.dtype in _GMM_DTYPES or quant), "each weight must be a 2-D tensor [K, N]")
    out_dtype = x[0].dtype if output_dtype is None else output_dtype
    rows_seen = [0]

    def mm(a, w, b, i=0):
        _check(a.dtype == w.dtype, f"x {a.dtype} and weight {w.dtype} dtypes differ")
        _check(a.shape[-1] == w.shape[0], f"K mismatch: x {tuple(a.shape)} weight {tuple(w.shape)}")
        if quant:  # exact integer sums (float64), then the per-channel and per-token scales in fp32
            y = (a.double() @ w.double()).float() * scale[i].float()[None, :]
            r0 = rows_seen[0]
            rows_seen[0] += a.shape[0]
            return (y * per_token_scale[0][r0:r0 + a.shape[0], None]).to(out_dtype)
        y = a.float() @ w.float()
        if b is not None:
            y = y + b.float()
        return y.to(out_dtype)

    if group_type == 0:
        _check(len(x) == 1 and split_item in (2, 3), "group_type 0 with a weight list: one x, split_item 2 or 3")
        _check(group_list is not None and group_list.dtype == torch.int64 and group_list.dim() == 1,
               "group_list must be a 1-D int64 tensor")
        _check(group_list.numel() == len(weight), "group_list length must equal the number of weights")
        _check(len({w.shape[1] for w in weight}) == 1, "all weights must have the same N")
        _check(group_list_type in (0, 1), "group_list_type must be 0 (cumsum) or 1 (counts)")
        gl = group_list.tolist()
        counts = gl if group_list_type == 1 else [b - a for a, b in zip([0] + gl[:-1], gl)]
        _check(all(c >= 0 for c in counts), "group sizes must be non-negative (cumsum non-decreasing)")
        _check(sum(counts) == x[0].shape[0], f"groups cover {sum(counts)} rows, x has {x[0].shape[0]}")
        outs, r = [], 0
        for i, (w, c) in enumerate(zip(weight, counts)):
            outs.append(mm(x[0][r:r + c], w, None if bias is None else bias[i], i))
            r += c
        return [torch.cat(outs)]
    _check(group_type in (None, -1) and split_item in (0, 1) and group_list is None,
           "group_type -1: x and weight lists of equal length, split_item 0/1, no group_list")
    _check(len(x) == len(weight), "x and weight lists must have the same length")
    return [mm(a, w, None if bias is None else bias[i]) for i, (a, w) in enumerate(zip(x, weight))]


# ---------------------------------------------------------------------------------------------- int8 quantisation
@_counted
def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                      dst_type_max=0.0):
    """Per-token symmetric int8: scale = rowMax(|x|) / 127, y = round(x / scale) (formula of the docs; an
    all-zero row, 0/0 there, gives y = 0 here). x float16/bfloat16, dim > 1. Returns (y int8, scale fp32
    of shape x.shape[:-1])."""
    _check(input.dtype in (torch.float16, torch.bfloat16), f"x must be float16/bfloat16, got {input.dtype}")
    _check(input.dim() > 1, "x must have more than one dimension")
    _check(smooth_scales is None and group_index is None, "smooth_scales / group_index are not implemented")
    _check(dst_type in (None, torch.int8) and quant_mode == "pertoken", "only per-token int8 is implemented")
    xf = input.float()
    scale = xf.abs().amax(-1) / 127.0
    y = torch.where(scale[..., None] > 0, torch.round(xf / scale[..., None]), torch.zeros_like(xf))
    return y.clamp(-127, 127).to(torch.int8), scale


@_counted
def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                     x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                     y_scale=None):
    """int8 x int8 -> (x1 . x2) * scale (per output channel, [N] or [1]) * pertoken_scale ([M]), cast to
    output_dtype. Implemented: 2-D int8 inputs, x2 [K, N] (a transposed view is fine), fp32 scale, bf16/fp16
    output with pertoken_scale, no offset / bias. With scale_dtype float8_e8m0fnu: the MXFP8 form (below)."""
    if scale_dtype is not None:
        return _mx_quant_matmul(x1, x2, scale, pertoken_scale, output_dtype, pertoken_scale_dtype, scale_dtype,
                                group_sizes, offset, bias)
    _check(x1.dtype == torch.int8 and x2.dtype == torch.int8, "x1 and x2 must both be int8 (int4-in-int32 not implemented)")
    _check(x1.dim() == 2 and x2.dim() == 2 and x1.shape[1] == x2.shape[0], "x1 [M, K] and x2 [K, N] required")
    _check(x1.shape[1] <= 65535 and x2.shape[1] <= 65535, "last dims must not exceed 65535")
    _check(scale.dim() == 1 and scale.numel() in (1, x2.shape[1]), "scale must be [1] or [N]")
    _check(scale.dtype in (torch.float32, torch.bfloat16), f"scale dtype {scale.dtype}")
    _check(pertoken_scale is not None and pertoken_scale.shape == (x1.shape[0],)
           and pertoken_scale.dtype == torch.float32, "pertoken_scale must be fp32 [M] (the implemented mode)")
    _check(output_dtype in (torch.bfloat16, torch.float16), "output_dtype must be bfloat16/float16 here")
    _check(offset is None and bias is None, "offset / bias are not implemented")
    acc = torch.matmul(x1.to(torch.float64), x2.to(torch.float64))  # exact int32-range sums
    y = acc.to(torch.float32) * scale.float().reshape(1, -1) * pertoken_scale.reshape(-1, 1)
    return y.to(output_dtype)


# ---------------------------------------------------------------------------------------------- 950 MX (MXFP8)
# npu_dynamic_mx_quant to ops-nn aclnnDynamicMxQuant.md (scaleAlg 0: 2^(floor(log2 amax) - 8); scaleAlg 1: the
# exponent of amax / 448 rounded up from its fp32 bits; scale out [..., ceil(K/32/2), 2] e8m0, zero-padded) and
# the MXFP8 npu_quant_matmul as vllm-ascend's W8A8_MXFP8 linear calls it (x1 e4m3 [M, K], x2 e4m3 [K, N], scale
# [K/64, N, 2] and pertoken_scale [M, K/64, 2] e8m0 bytes, group_sizes [1, 1, 32]). Values past 448 saturate
# (our assumption for scaleAlg 0; torch's own cast would give NaN). dst_type ids as torch_npu's meta functions map
# them (op_plugin/meta/_meta_registrations.py TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP): e4m3 = 24 or 292, the
# default 296 = float4_e2m1fn_x2 (not implemented here). torch_npu's float8_e8m0fnu is its own dtype enum (293),
# not a torch dtype: an opaque value here, so code relying on it being torch's fails.
float8_e8m0fnu = types.SimpleNamespace(name="torch_npu.float8_e8m0fnu", value=293)
_E4M3_DST = (torch.float8_e4m3fn, 24, 292)  # the dtype as vllm-ascend passes it, and its two enum values


@_counted
def npu_dynamic_mx_quant(input, *, axis=-1, round_mode="rint", dst_type=296, block_size=32, scale_alg=0,
                         dst_type_max=0.0):
    _check(input.dtype in (torch.float16, torch.bfloat16), f"input must be float16/bfloat16, got {input.dtype}")
    _check(axis in (-1, input.dim() - 1) and round_mode == "rint" and dst_type in _E4M3_DST,
           f"implemented: the last axis, rint, float8_e4m3fn (dst_type {dst_type!r}; the default 296 is FP4)")
    _check(block_size == 32 and scale_alg in (0, 1), "block_size 32, scale_alg 0 or 1")
    k = input.shape[-1]
    nb = -(-k // 32)
    xb = torch.nn.functional.pad(input.float(), (0, nb * 32 - k)).reshape(*input.shape[:-1], nb, 32)
    amax = xb.abs().amax(-1)
    if scale_alg == 0:
        e = ((amax.view(torch.int32) >> 23) & 0xFF) - 8  # floor(log2 amax) - emax(e4m3) = 8, biased
    else:
        bits = (amax / 448.0).view(torch.int32)
        ef, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
        e = ef + (((ef > 0) & (ef < 254) & (mant > 0)) | ((ef == 0) & (mant > 0x400000))).to(torch.int32)
    e = e.clamp(0, 254)
    q = (xb / torch.exp2(e.float() - 127)[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.nn.functional.pad(e.to(torch.uint8), (0, nb % 2)).reshape(*input.shape[:-1], -1, 2)
    return q.reshape(*input.shape[:-1], nb * 32)[..., :k], scale


def _mx_quant_matmul(x1, x2, scale, pertoken_scale, output_dtype, pertoken_scale_dtype, scale_dtype, group_sizes,
                     offset, bias):
    _check(scale_dtype == float8_e8m0fnu and pertoken_scale_dtype == float8_e8m0fnu, "MX: e8m0 scales")
    _check(list(group_sizes or []) == [1, 1, 32], "MXFP8 x MXFP8: group_sizes [1, 1, 32]")
    _check(x1.dtype == torch.float8_e4m3fn and x2.dtype == torch.float8_e4m3fn, "MX: x1 and x2 float8_e4m3fn")
    _check(x1.dim() == 2 and x2.dim() == 2 and x1.shape[1] == x2.shape[0], "x1 [M, K] and x2 [K, N] required")
    m, k = x1.shape
    n = x2.shape[1]
    kp = -(-k // 64)
    _check(tuple(scale.shape) == (kp, n, 2) and tuple(pertoken_scale.shape) == (m, kp, 2),
           f"MX scales: scale [{kp}, {n}, 2], pertoken_scale [{m}, {kp}, 2]")
    _check(offset is None and bias is None, "offset / bias are not implemented")
    _check(output_dtype in (torch.bfloat16, torch.float16), "output_dtype must be bfloat16/float16 here")
    sa = torch.exp2(pertoken_scale.view(torch.uint8).reshape(m, -1)[:, :-(-k // 32)].double() - 127)  # [M, K/32]
    sw = torch.exp2(scale.view(torch.uint8).transpose(0, 1).reshape(n, -1)[:, :-(-k // 32)].double() - 127)
    a = x1.double() * sa.repeat_interleave(32, 1)[:, :k]
    w = x2.double() * sw.repeat_interleave(32, 1)[:, :k].t()
    return (a @ w).to(output_dtype)


# ---------------------------------------------------------------------------------------------- MC2 (expert parallel)
# npu_moe_distribute_dispatch_v2 / npu_moe_distribute_combine_v2 to the torch_npu API pages of the same names,
# over torch.distributed instead of HCCL: the test registers a (Gloo) process group under a communicator name
# and passes that name as group_ep, as the real code passes an HCCL communicator name. Called by
# ascend_v4.ops.npu.mc2 (runtime/expert_parallel_mc2.py).
# Implemented: quant_mode 0, no TP domain, no shared-expert ranks, no special (zero/copy/const) experts, no
# elastic scaling, 1-D x_active_mask. The documentation's chip limits on H, BS and EP size are the runtime's
# business (ops/npu/mc2.py `Mc2Limits`), so the tiny model can run here; the chip-independent rules are enforced.
# Layouts the pages call internal are THIS DOUBLE'S OWN and only its combine reads them:
#   assist_info_for_combine [A*128] int32: row i of expand_x -> (source rank, token, slot, global expert id) in
#   elements i*128 .. i*128+3, everything else UNDEFINED_INT; ep_recv_counts [ep_world_size * local experts]
#   int32: cumulative row counts per (local expert, source rank); tp_recv_counts: empty (no TP domain).
# Documented: expand_x rows grouped by local expert (within an expert: source rank, then token order here),
# rows past sum(expert_token_nums) undefined (NaN); combine x[t] = sum_k expert_scales[t, k] * row(t, k),
# summed here in fp32 in slot order and cast to expand_x's dtype (the real op's order / precision is not
# documented); rows of tokens that took no part (x_active_mask) are undefined (NaN).
MC2_GROUPS: dict = {}  # communicator name -> torch.distributed process group
_MC2_INFO = 128  # assist_info_for_combine elements per expand_x row (A * 128)
_MC2_DTYPES = (torch.float16, torch.bfloat16)


def register_mc2_group(name: str, group) -> None:
    """Make `name` usable as group_ep / group_tp: MC2 calls with it communicate over `group`."""
    MC2_GROUPS[name] = group


def _mc2_group(fn: str, group_ep, ep_world_size: int, ep_rank_id: int):
    import torch.distributed as dist

    _check(isinstance(group_ep, str) and 1 <= len(group_ep) < 128,
           f"{fn}: group_ep must be a string of length [1, 128), got {group_ep!r}")
    _check(group_ep in MC2_GROUPS, f"{fn}: group_ep {group_ep!r} names no communicator")
    g = MC2_GROUPS[group_ep]
    size, rank = dist.get_world_size(g), dist.get_rank(g)
    _check(ep_world_size == size, f"{fn}: ep_world_size={ep_world_size} but communicator {group_ep!r} has {size}")
    _check(ep_rank_id == rank, f"{fn}: ep_rank_id={ep_rank_id} but this process is rank {rank} of {group_ep!r}")
    return g


def _mc2_exchange(g, tensors: list, send_counts: torch.Tensor) -> tuple[list, list[int]]:
    """all_to_all_single of row blocks: rows [sum(send_counts[:r]), ...) of each tensor go to rank r."""
    import torch.distributed as dist

    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=g)
    sc, rc = send_counts.tolist(), recv_counts.tolist()
    out = []
    for t in tensors:
        r = t.new_empty((sum(rc),) + tuple(t.shape[1:]))
        dist.all_to_all_single(r, t.contiguous(), rc, sc, group=g)
        out.append(r)
    return out, rc


# comm_alg values the dispatch_v2 page lists: A2 "", "fullmesh", "hierarchy"; A3 "", "fullmesh_v1", "fullmesh_v2"
_COMM_ALGS = ("", "fullmesh", "hierarchy", "fullmesh_v1", "fullmesh_v2")
COMM_ALGS_SEEN: collections.Counter = collections.Counter()  # comm_alg per call, for tests


def _mc2_common(fn: str, expert_ids, moe_expert_num, ep_world_size, x_active_mask, group_tp, tp_world_size,
                shared_expert_rank_num, elastic_info, zero_expert_num, copy_expert_num, const_expert_num,
                comm_alg: str = "") -> int:
    """Checks shared by dispatch and combine; returns the number of active tokens."""
    _check(comm_alg in _COMM_ALGS, f"{fn}: comm_alg={comm_alg!r} is not one of {_COMM_ALGS}")
    COMM_ALGS_SEEN[comm_alg] += 1
    _check(expert_ids.dim() == 2 and expert_ids.dtype == torch.int32,
           f"{fn}: expert_ids must be a 2-D int32 tensor [BS, K], got {expert_ids.dtype} {tuple(expert_ids.shape)}")
    bs, k = expert_ids.shape
    _check(bs > 0, f"{fn}: BS must be > 0")
    _check(0 < k <= 16 and k <= moe_expert_num, f"{fn}: K={k} must be in (0, 16] and <= moe_expert_num")
    _check(1 <= moe_expert_num <= 1024 and moe_expert_num % (ep_world_size - shared_expert_rank_num) == 0,
           f"{fn}: moe_expert_num={moe_expert_num} must be in [1, 1024] and divisible by the MoE ranks")
    _check(shared_expert_rank_num == 0, f"{fn}: shared-expert ranks are not implemented by this double")
    _check(tp_world_size in (0, 1) and group_tp == "", f"{fn}: a TP domain is not implemented by this double")
    _check(elastic_info is None and zero_expert_num == copy_expert_num == const_expert_num == 0,
           f"{fn}: elastic scaling / special experts are not implemented by this double")
    ids = expert_ids.long()
    _check(bool(((ids >= 0) & (ids < moe_expert_num)).all()), f"{fn}: expert_ids must lie in [0, moe_expert_num)")
    _check(bool((ids.sort(1).values.diff(dim=1) != 0).all()), f"{fn}: the K expert ids of a row must be distinct")
    if x_active_mask is None:
        return bs
    _check(x_active_mask.dtype == torch.bool and x_active_mask.shape == (bs,),
           f"{fn}: x_active_mask must be a 1-D bool tensor [BS] (2-D masks are not implemented by this double)")
    active = int(x_active_mask.sum())
    _check(bool(x_active_mask[:active].all()), f"{fn}: x_active_mask must put every True before every False")
    return active


@_counted
def npu_moe_distribute_dispatch_v2(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *,
                                   scales=None, x_active_mask=None, expert_scales=None, elastic_info=None,
                                   group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
                                   shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0, global_bs=0,
                                   expert_token_nums_type=1, comm_alg="", zero_expert_num=0, copy_expert_num=0,
                                   const_expert_num=0):
    """Send row t of x to the ranks owning experts expert_ids[t, :] (owner = id // local experts).

    Returns (expand_x [A, H], dynamic_scales None (quant_mode 0), assist_info_for_combine [A*128] int32,
    expert_token_nums [local experts] int64 (counts, or cumulative with expert_token_nums_type 0),
    ep_recv_counts, tp_recv_counts, expand_scales [A] fp32 or None without expert_scales), with
    A = (global_bs or BS * ep_world_size) * min(local experts, K)."""
    import torch.distributed as dist

    fn = "npu_moe_distribute_dispatch_v2"
    _check(x.dim() == 2 and x.shape[0] == expert_ids.shape[0], f"{fn}: x must be [BS, H] matching expert_ids")
    _check(x.dtype in _MC2_DTYPES, f"{fn}: x must be bfloat16/float16, got {x.dtype}")
    _check(quant_mode == 0 and scales is None, f"{fn}: only quant_mode=0 (no quantisation) is implemented")
    _check(expert_token_nums_type in (0, 1), f"{fn}: expert_token_nums_type must be 0 or 1")
    active = _mc2_common(fn, expert_ids, moe_expert_num, ep_world_size, x_active_mask, group_tp, tp_world_size,
                         shared_expert_rank_num, elastic_info, zero_expert_num, copy_expert_num, const_expert_num,
                         comm_alg)
    g = _mc2_group(fn, group_ep, ep_world_size, ep_rank_id)
    bs, k = expert_ids.shape
    h = x.shape[1]
    n_local = moe_expert_num // ep_world_size
    all_bs = torch.empty(ep_world_size, dtype=torch.int64)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the torch version's name
    gather(all_bs, torch.tensor([bs]), group=g)
    if global_bs == 0:
        _check(bool((all_bs == bs).all()), f"{fn}: ranks send different BS {all_bs.tolist()}: pass global_bs")
    else:
        _check(global_bs == int(all_bs.max()) * ep_world_size, f"{fn}: global_bs must be max BS * ep_world_size")
    if expert_scales is not None:
        _check(expert_scales.shape == (bs, k) and expert_scales.dtype == torch.float32,
               f"{fn}: expert_scales must be fp32 [BS, K]")
    a = (global_bs or bs * ep_world_size) * min(n_local, k)

    # (token, slot) pairs of the active tokens by global expert id: grouped by owner, then local expert, then token
    eid = expert_ids[:active].reshape(-1).long()
    order = torch.argsort(eid, stable=True)
    tok, slot, eid = order // k, order % k, eid[order]
    owner = eid // n_local
    meta = torch.stack([torch.full_like(tok, ep_rank_id), tok, slot, eid], 1).to(torch.int32)
    payload = [x[tok], meta]
    if expert_scales is not None:
        payload.append(expert_scales[tok, slot][:, None])
    recv, _ = _mc2_exchange(g, payload, torch.bincount(owner, minlength=ep_world_size))
    rmeta = recv[1]
    lexp = rmeta[:, 3].long() - ep_rank_id * n_local
    regroup = torch.argsort(lexp, stable=True)  # by local expert; source rank, token order kept within one
    n = regroup.numel()
    _check(n <= a, f"{fn}: {n} rows received exceed A={a}")

    expand_x = torch.full((a, h), float("nan"), dtype=x.dtype)
    expand_x[:n] = recv[0][regroup]
    info = torch.full((a, _MC2_INFO), UNDEFINED_INT, dtype=torch.int32)
    info[:n, :4] = rmeta[regroup]
    counts = torch.bincount(lexp, minlength=n_local)
    expert_token_nums = counts if expert_token_nums_type == 1 else counts.cumsum(0)
    per_src = torch.bincount(lexp * ep_world_size + rmeta[:, 0].long(), minlength=n_local * ep_world_size)
    expand_scales = None
    if expert_scales is not None:
        expand_scales = torch.full((a,), float("nan"))
        expand_scales[:n] = recv[2][regroup, 0]
    return (expand_x, None, info.reshape(-1), expert_token_nums.to(torch.int64), per_src.cumsum(0).to(torch.int32),
            torch.empty(0, dtype=torch.int32), expand_scales)


@_counted
def npu_moe_distribute_combine_v2(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales,
                                  group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, tp_send_counts=None,
                                  x_active_mask=None, expand_scales=None, shared_expert_x=None, elastic_info=None,
                                  ori_x=None, const_expert_alpha_1=None, const_expert_alpha_2=None,
                                  const_expert_v=None, group_tp="", tp_world_size=0, tp_rank_id=0,
                                  expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, global_bs=0,
                                  comm_quant_mode=0, comm_alg="", zero_expert_num=0, copy_expert_num=0,
                                  const_expert_num=0):
    """Send row i of expand_x back to the (rank, token, slot) it came from, then
    x[t] = sum_k expert_scales[t, k] * row(t, k) on that rank: [BS, H] in expand_x's dtype."""
    fn = "npu_moe_distribute_combine_v2"
    _check(expand_x.dim() == 2 and expand_x.dtype in _MC2_DTYPES,
           f"{fn}: expand_x must be a 2-D bfloat16/float16 tensor, got {expand_x.dtype} {tuple(expand_x.shape)}")
    active = _mc2_common(fn, expert_ids, moe_expert_num, ep_world_size, x_active_mask, group_tp, tp_world_size,
                         shared_expert_rank_num, elastic_info, zero_expert_num, copy_expert_num, const_expert_num,
                         comm_alg)
    _check(comm_quant_mode == 0 and shared_expert_x is None and ori_x is None and const_expert_v is None,
           f"{fn}: comm_quant_mode / shared_expert_x / special experts are not implemented by this double")
    bs, k = expert_ids.shape
    _check(expert_scales.shape == (bs, k) and expert_scales.dtype == torch.float32,
           f"{fn}: expert_scales must be fp32 [BS, K] like expert_ids, got {expert_scales.dtype} "
           f"{tuple(expert_scales.shape)}")
    a, h = expand_x.shape
    _check(assist_info_for_combine.dtype == torch.int32 and assist_info_for_combine.shape == (a * _MC2_INFO,),
           f"{fn}: assist_info_for_combine must be dispatch's int32 [A*128] output (A={a})")
    n_local = moe_expert_num // ep_world_size
    _check(ep_send_counts.dtype == torch.int32 and ep_send_counts.shape == (ep_world_size * n_local,),
           f"{fn}: ep_send_counts must be dispatch's ep_recv_counts output")
    g = _mc2_group(fn, group_ep, ep_world_size, ep_rank_id)
    n = int(ep_send_counts[-1])
    full = assist_info_for_combine.view(a, _MC2_INFO)[:, :4]
    info = full[:n]
    _check(0 <= n <= a and bool((info != UNDEFINED_INT).all()) and bool((full[n:] == UNDEFINED_INT).all()),
           f"{fn}: assist_info_for_combine / ep_send_counts do not come from the same dispatch call")
    src = info[:, 0].long()
    order = torch.argsort(src, stable=True)
    (rows, meta), _ = _mc2_exchange(g, [expand_x[:n][order], info[order, 1:]],
                                    torch.bincount(src, minlength=ep_world_size))
    tok, slot = meta[:, 0].long(), meta[:, 1].long()
    _check(bool((expert_ids[tok, slot] == meta[:, 2]).all()),
           f"{fn}: expert_ids differ from the ones given to npu_moe_distribute_dispatch_v2")
    got = torch.zeros(bs, k, dtype=torch.bool)
    got[tok, slot] = True
    _check(bool(got[:active].all()) and not bool(got[active:].any()) and tok.numel() == active * k,
           f"{fn}: the rows coming back do not cover every (token, slot) of the active tokens exactly once")
    y = torch.zeros(bs, k, h)
    y[tok, slot] = rows.float()
    acc = torch.zeros(active, h)
    for j in range(k):  # slot order, fp32
        acc += expert_scales[:active, j:j + 1] * y[:active, j]
    out = torch.full((bs, h), float("nan"), dtype=expand_x.dtype)
    out[:active] = acc.to(expand_x.dtype)
    return out
