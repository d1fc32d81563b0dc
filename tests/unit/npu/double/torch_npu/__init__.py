"""Test double of torch_npu: exactly the torch_npu functions ascend-v4 calls, in plain torch on CPU tensors,
written to their documented semantics (torch_npu 2.13.0: schemas registered in libtorch_npu.so, text of
torch_npu/_op_plugin_docs.py, aclnnMoeInitRoutingV2 docs). Not a mock: each function computes its result and
rejects what the documentation rejects; outputs the documentation calls undefined are filled with NaN (floats)
or a sentinel (ints) so that code relying on them fails.

It is put on sys.path only inside tests (tests/unit/npu/test_npu_double.py); nothing in the package imports it.

Called by ascend-v4: ops/npu/kernels.py (npu_moe_init_routing_v2, npu_moe_token_unpermute,
npu_grouped_matmul, npu_dynamic_quant, npu_quant_matmul), ascend_v4/cli/doctor.py (__version__, npu.is_available, npu.device_count,
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
    _check(permuted_tokens.dtype in (torch.float16, torch.bfloat16, torch.float32), "permuted_tokens dtype")
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
    """Non-quantised grouped matmul y_i = x_i @ weight_i (weight_i is [K, N]; transposed views are allowed).

    Scenarios implemented (group_list a tensor): group_type 0 with one x, a weight list and split_item 2/3
    ("single-multi-single": rows of x split by group_list, one output, equal N, at most 128 weights), and
    group_type -1 with x and weight lists of equal length, split_item 0/1 (one output per group)."""
    _check(all(q is None for q in (scale, offset, antiquant_scale, antiquant_offset, per_token_scale,
                                   activation_input, activation_quant_scale, activation_quant_offset)),
           "only the non-quantised scenario is implemented by this double")
    _check(act_type == 0, "act_type must be 0 (no activation) in the non-quantised scenario")
    _check(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), "x and weight are lists")
    _check(len(weight) <= 128, f"at most 128 weights per call, got {len(weight)}")
    for w in weight:
        _check(w.dim() == 2 and w.dtype in _GMM_DTYPES, "each weight must be a 2-D float tensor [K, N]")
    out_dtype = x[0].dtype if output_dtype is None else output_dtype

    def mm(a, w, b):
        _check(a.dtype == w.dtype, f"x {a.dtype} and weight {w.dtype} dtypes differ")
        _check(a.shape[-1] == w.shape[0], f"K mismatch: x {tuple(a.shape)} weight {tuple(w.shape)}")
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
            outs.append(mm(x[0][r:r + c], w, None if bias is None else bias[i]))
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
    output with pertoken_scale, no offset / bias."""
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
