"""The tensor inventory of an official DeepSeek-V4 checkpoint (model-spec.md §8.1, §9; the DSpark stages of the
0731 / 0813 releases: dspark-spec.md §1).

`expected_tensors(args)` is the single source of truth for names, shapes and dtypes: the dummy writer
writes exactly these, the loader checks a real checkpoint against them, and the model's parameter names
are the same strings (tests assert it), so loading needs no rename table.

Shapes are the *stored* shapes as torch sees them after `safe_open(...).get_tensor`: FP4 experts are
I8 `[out, in/2]` (two e2m1 values per byte, low nibble first).

Checkpoints converted by `ascend-v4 quantize` store some linears in another tensor format: `linear_formats`
(`{linear base name: ascend_v4.quant format}`) replaces those linears' `.weight` / `.scale` by the tensors of
their format (e.g. `.weight` I8 + `.weight_scale` / `.weight_offset` F32 for `int8_channel`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ascend_v4.model.args import CSA, HCA, WINDOW, ModelArgs, ceil_div
from ascend_v4.model.placement import DRAFT_PREFIX, EXPERT_TENSOR
from ascend_v4.quant import get_format
from ascend_v4.quant.ascend_v1 import mtp_copy_names
from ascend_v4.quant.recipes import is_down_proj
from ascend_v4.quant.st_io import dtype_nbytes, tensor_nbytes

# safetensors dtype names (header "dtype" field)
F8, E8M0, I8, BF16, F32, I64 = "F8_E4M3", "F8_E8M0", "I8", "BF16", "F32", "I64"
BLOCK = 128  # FP8 weight block (both dims)
FP4_BLOCK = 32  # FP4 scale run along the input dim


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    kind: str  # what the tensor is, for grouping and error messages: "fp8", "fp4", "scale", "bf16", ...


def _fp8(out: dict, name: str, o: int, i: int) -> None:
    out[f"{name}.weight"] = TensorSpec((o, i), F8, "fp8")
    out[f"{name}.scale"] = TensorSpec((ceil_div(o, BLOCK), ceil_div(i, BLOCK)), E8M0, "scale")


def _expert(out: dict, name: str, o: int, i: int, expert_dtype: str) -> None:
    if expert_dtype == "fp8":
        _fp8(out, name, o, i)
    else:
        out[f"{name}.weight"] = TensorSpec((o, i // 2), I8, "fp4")
        out[f"{name}.scale"] = TensorSpec((o, i // FP4_BLOCK), E8M0, "scale")


def _bf16(out: dict, name: str, *shape: int) -> None:
    out[name] = TensorSpec(tuple(shape), BF16, "bf16")


def _f32(out: dict, name: str, *shape: int) -> None:
    out[name] = TensorSpec(tuple(shape), F32, "f32")


def block_tensors(args: ModelArgs, prefix: str, layer_id: int) -> dict[str, TensorSpec]:
    """Tensors of one transformer block (`layers.{l}` or `mtp.{i}`), experts included."""
    a, out = args, {}
    d, hd, n = a.dim, a.head_dim, a.hc_mult
    mix = (2 + n) * n
    for unit in ("attn", "ffn"):
        _f32(out, f"{prefix}.hc_{unit}_fn", mix, n * d)
        _f32(out, f"{prefix}.hc_{unit}_base", mix)
        _f32(out, f"{prefix}.hc_{unit}_scale", 3)
    _bf16(out, f"{prefix}.attn_norm.weight", d)
    _bf16(out, f"{prefix}.ffn_norm.weight", d)
    at = f"{prefix}.attn"
    _fp8(out, f"{at}.wq_a", a.q_lora_rank, d)
    _fp8(out, f"{at}.wq_b", a.n_heads * hd, a.q_lora_rank)
    _fp8(out, f"{at}.wkv", hd, d)
    _fp8(out, f"{at}.wo_a", a.o_groups * a.o_lora_rank, (a.n_heads // a.o_groups) * hd)
    _fp8(out, f"{at}.wo_b", d, a.o_groups * a.o_lora_rank)
    _bf16(out, f"{at}.q_norm.weight", a.q_lora_rank)
    _bf16(out, f"{at}.kv_norm.weight", hd)
    _f32(out, f"{at}.attn_sink", a.n_heads)
    kind, ratio = a.kind(layer_id), a.ratio(layer_id)
    if kind != WINDOW:
        c = 2 if kind == CSA else 1  # CSA pools overlapping windows: two series per token
        _bf16(out, f"{at}.compressor.wkv.weight", c * hd, d)
        _bf16(out, f"{at}.compressor.wgate.weight", c * hd, d)
        _f32(out, f"{at}.compressor.ape", ratio, c * hd)
        _bf16(out, f"{at}.compressor.norm.weight", hd)
    if kind == CSA:
        ih = a.index_head_dim
        _fp8(out, f"{at}.indexer.wq_b", a.index_n_heads * ih, a.q_lora_rank)
        _bf16(out, f"{at}.indexer.weights_proj.weight", a.index_n_heads, d)
        _bf16(out, f"{at}.indexer.compressor.wkv.weight", 2 * ih, d)
        _bf16(out, f"{at}.indexer.compressor.wgate.weight", 2 * ih, d)
        _f32(out, f"{at}.indexer.compressor.ape", ratio, 2 * ih)
        _bf16(out, f"{at}.indexer.compressor.norm.weight", ih)
    ff = f"{prefix}.ffn"
    _bf16(out, f"{ff}.gate.weight", a.n_routed_experts, d)
    if a.is_hash_layer(layer_id) and layer_id < a.n_layers:
        out[f"{ff}.gate.tid2eid"] = TensorSpec((a.vocab_size, a.n_activated_experts), I64, "i64")
    else:
        _f32(out, f"{ff}.gate.bias", a.n_routed_experts)
    for e in range(a.n_routed_experts):
        _expert(out, f"{ff}.experts.{e}.w1", a.moe_inter_dim, d, a.expert_dtype)
        _expert(out, f"{ff}.experts.{e}.w2", d, a.moe_inter_dim, a.expert_dtype)
        _expert(out, f"{ff}.experts.{e}.w3", a.moe_inter_dim, d, a.expert_dtype)
    for w, (o, i) in {"w1": (a.moe_inter_dim, d), "w2": (d, a.moe_inter_dim), "w3": (a.moe_inter_dim, d)}.items():
        _fp8(out, f"{ff}.shared_experts.{w}", o, i)
    return out


def _hc_head(out: dict, prefix: str, args: ModelArgs) -> None:
    """The mHC head collapsing the hc_mult streams into one (`hc_head_fn` / `_base` / `_scale`)."""
    _f32(out, f"{prefix}hc_head_fn", args.hc_mult, args.hc_mult * args.dim)
    _f32(out, f"{prefix}hc_head_base", args.hc_mult)
    _f32(out, f"{prefix}hc_head_scale", 1)


def mtp_extra_tensors(args: ModelArgs, prefix: str) -> dict[str, TensorSpec]:
    """What an April MTP block holds besides its transformer block."""
    a, out = args, {}
    _fp8(out, f"{prefix}.e_proj", a.dim, a.dim)
    _fp8(out, f"{prefix}.h_proj", a.dim, a.dim)
    for nm in ("enorm", "hnorm", "norm"):
        _bf16(out, f"{prefix}.{nm}.weight", a.dim)
    _hc_head(out, f"{prefix}.", a)
    return out


def dspark_extra_tensors(args: ModelArgs, stage: int) -> dict[str, TensorSpec]:
    """What DSpark stage `mtp.{stage}` holds besides its window-only block (dspark-spec.md §1): stage 0 the context
    projection `main_proj` (FP8 [d, n_targets * d], over the target layers' streams) and `main_norm`; the last
    stage the draft head: `norm`, its own mHC head, the rank-r Markov head (`markov_w1` looked up by the previous
    token, `markov_w2` projecting to the vocabulary, BF16 [V, r] each) and the confidence head (`proj`, BF16
    [1, d + r], no bias). Embedding and LM head are the target's (`embed.weight`, `head.weight`)."""
    a, out, p = args, {}, f"mtp.{stage}"
    if stage == 0:
        _fp8(out, f"{p}.main_proj", a.dim, len(a.dspark_target_layer_ids) * a.dim)
        _bf16(out, f"{p}.main_norm.weight", a.dim)
    if stage == a.n_dspark_stages - 1:
        _bf16(out, f"{p}.norm.weight", a.dim)
        _hc_head(out, f"{p}.", a)
        _bf16(out, f"{p}.markov_head.markov_w1.weight", a.vocab_size, a.dspark_markov_rank)
        _bf16(out, f"{p}.markov_head.markov_w2.weight", a.vocab_size, a.dspark_markov_rank)
        _bf16(out, f"{p}.confidence_head.proj.weight", 1, a.dim + a.dspark_markov_rank)
    return out


def expected_tensors(args: ModelArgs, include_mtp: bool = True,
                     linear_formats: Mapping[str, str] | None = None,
                     shared_copies: bool = False) -> dict[str, TensorSpec]:
    """Every tensor of the official checkpoint for `args`, in file order (top-level, layers, then the draft blocks
    `mtp.*`: April MTP blocks or DSpark stages, left out when not `include_mtp`); with
    `linear_formats`, of a converted checkpoint storing those linears in those formats; with `shared_copies`
    (msModelSlim ascendV1 layout, `ascend_v4.quant.ascend_v1`), plus each MTP layer's copies of the main
    embedding and head (`mtp.{i}.emb.tok_emb.weight`, `mtp.{i}.head.weight`: same shape and dtype), last (April
    MTP only: DSpark stages get no copies, `ascend_v4.quant.ascend_v1`)."""
    out = _official_tensors(args, include_mtp)
    if shared_copies and include_mtp:
        for dst, src in mtp_copy_names(args.n_mtp_layers).items():
            out[dst] = out[src]
    return apply_linear_formats(out, linear_formats) if linear_formats else out


def official_linears(specs: Mapping[str, TensorSpec]) -> dict[str, str]:
    """{linear base name: its official tensor format (`fp8_block` / `fp4_mx`)} of an inventory."""
    return {name[:-len(".weight")]: ("fp8_block" if s.kind == "fp8" else "fp4_mx")
            for name, s in specs.items() if s.kind in ("fp8", "fp4") and name.endswith(".weight")}


def apply_linear_formats(specs: Mapping[str, TensorSpec], linear_formats: Mapping[str, str]) -> dict[str, TensorSpec]:
    """The inventory with each linear of `linear_formats` stored in its format instead (same position)."""
    out: dict[str, TensorSpec] = {}
    for name, s in specs.items():
        base, _, leaf = name.rpartition(".")
        fmt = linear_formats.get(base)
        if fmt is None or leaf not in ("weight", "scale"):
            out[name] = s
            continue
        if leaf == "weight":
            o, i = s.shape[0], s.shape[1] * (2 if s.kind == "fp4" else 1)
            for sfx, lay in get_format(fmt).layout(o, i, is_down_proj(base)).items():
                out[f"{base}.{sfx}"] = TensorSpec(lay.shape, lay.st_dtype, fmt)
    return out


def _official_tensors(args: ModelArgs, include_mtp: bool) -> dict[str, TensorSpec]:
    a, out = args, {}
    _bf16(out, "embed.weight", a.vocab_size, a.dim)
    for l in range(a.n_layers):
        out.update(block_tensors(a, f"layers.{l}", l))
    _bf16(out, "norm.weight", a.dim)
    _bf16(out, "head.weight", a.vocab_size, a.dim)
    _hc_head(out, "", a)
    if include_mtp:  # the draft blocks `mtp.{i}`: April MTP blocks, or DSpark stages (n_mtp_layers is 0 then)
        for i in range(a.n_mtp_layers):
            p = f"mtp.{i}"
            out.update(block_tensors(a, p, a.n_layers + i))
            out.update(mtp_extra_tensors(a, p))
        for s in range(a.n_dspark_stages):
            out.update(block_tensors(a, f"mtp.{s}", a.n_layers + s))
            out.update(dspark_extra_tensors(a, s))
    return out


def checkpoint_nbytes(args: ModelArgs) -> int:
    """Bytes of tensor data in the full checkpoint (headers excluded)."""
    return sum(tensor_nbytes(s.shape, s.dtype) for s in expected_tensors(args).values())


def draft_nbytes(args: ModelArgs) -> tuple[int, int]:
    """(dense, routed-expert) bytes of tensor data of the draft blocks `mtp.*` (April MTP or DSpark stages) in the
    official checkpoint: routed = every `mtp.{i}.ffn.experts.*` tensor (FP4 weights and their scales), dense = the
    rest (Flash-0731: 595,182,108 / 10,267,656,192 B, dspark-spec.md §1 Provenance)."""
    dense = routed = 0
    for name, s in expected_tensors(args).items():
        if name.startswith(DRAFT_PREFIX):
            n = tensor_nbytes(s.shape, s.dtype)
            if EXPERT_TENSOR.match(name):
                routed += n
            else:
                dense += n
    return dense, routed


__all__ = ["TensorSpec", "expected_tensors", "official_linears", "apply_linear_formats", "block_tensors",
           "mtp_extra_tensors", "dspark_extra_tensors", "checkpoint_nbytes", "draft_nbytes", "dtype_nbytes",
           "DRAFT_PREFIX", "F8", "E8M0", "I8", "BF16", "F32", "I64", "HCA", "CSA", "WINDOW"]
