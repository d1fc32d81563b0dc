"""Reference GEMMs on packed FP8 / FP4 weights (model-spec.md §8): dequantise, then a dense matmul.

On CPU the dense bf16/fp32 matmul is the fastest option there is (torch's `_scaled_mm` does not take
block scales on CPU), so the reference is also the CPU production path.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .formats import dequant_fp4, dequant_fp8_block, fp8_roundtrip


def _dense(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # FP4 experts are int8 [out, in/2] with [out, in/32] scales; FP8 weights are e4m3 with block scales.
    if w.dtype == torch.int8:
        return dequant_fp4(w, s, dtype)
    return dequant_fp8_block(w, s, dtype)


def quant_gemm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, act_quant: bool) -> torch.Tensor:
    """y = x @ W^T with W packed (FP8 e4m3 + 128x128 UE8M0, or FP4 e2m1 int8 + 1x32 UE8M0).

    x [M, K] (bf16/fp32); act_quant: simulate the 1x128 FP8 activation quantisation first.
    Returns [M, N] in x.dtype; accumulation in fp32 (bf16 inputs) or fp32 (fp32 inputs).
    """
    if act_quant:
        x = fp8_roundtrip(x, 128)
    return F.linear(x, _dense(w, s, x.dtype))


def expert_groups(topk_ids: torch.Tensor, n_experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Group the (token, slot) pairs of `topk_ids` [T, k] by expert: yields (expert, pair indices into the
    flattened [T*k] routing, their token rows) for every expert in [0, n_experts) that got tokens, in token
    order within each group. Ids of -1 (handled elsewhere) are skipped. One host sync for all the counts."""
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat.clamp_min(-1) + 1, minlength=n_experts + 1).tolist()
    pos = counts[0]  # skip the -1 group
    for e in range(n_experts):
        n = counts[e + 1]
        if n:
            pairs = order[pos:pos + n]
            pos += n
            yield e, pairs, pairs // k


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                w1: list[torch.Tensor], s1: list[torch.Tensor], w2: list[torch.Tensor], s2: list[torch.Tensor],
                w3: list[torch.Tensor], s3: list[torch.Tensor], swiglu_limit: float,
                act_quant: bool) -> torch.Tensor:
    """Routed experts: sum_k w_k * W2_e( silu(min(W1_e x, L)) * clamp(W3_e x, -L, L) ), e = topk_ids[:, k].

    x [T, D]; topk_ids [T, k] int (-1 = not handled here, e.g. another rank's expert);
    topk_weights [T, k] fp32; per-expert packed weights in lists indexed by expert id.
    The routing weight multiplies the activation *before* W2 (as the official reference does, which
    changes what the W2 input quantisation sees). Returns [T, D] fp32.
    """
    T, D = x.shape
    out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    for e, pairs, tok in expert_groups(topk_ids, len(w1)):
        h = x[tok]
        g = quant_gemm(h, w1[e], s1[e], act_quant).float()
        u = quant_gemm(h, w3[e], s3[e], act_quant).float()
        a = F.silu(g.clamp(max=swiglu_limit)) * u.clamp(-swiglu_limit, swiglu_limit)
        a = a * topk_weights.reshape(-1)[pairs].float()[:, None]
        y = quant_gemm(a.to(x.dtype), w2[e], s2[e], act_quant)
        out.index_add_(0, tok, y.float())
    return out


def moe_gate(logits: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None, tokens: torch.Tensor,
             topk: int, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """V4 router (model-spec §6): scores = sqrt(softplus(logits)) in fp32; experts = top-k of scores + bias (the
    bias only picks), or tid2eid[token] in the hash-routed layers; weights = the chosen scores normalised to sum 1,
    times route_scale. logits [T, E]; bias [E] or tid2eid [V, k] (exactly one); tokens [T].
    Returns (ids [T, k] int64, weights [T, k] fp32)."""
    scores = torch.sqrt(F.softplus(logits.float()))
    ids = tid2eid[tokens] if tid2eid is not None else torch.topk(scores + bias, topk, dim=-1).indices
    w = scores.gather(1, ids)
    return ids, w / w.sum(-1, keepdim=True) * route_scale

