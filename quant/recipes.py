"""What each `ascend-v4 quantize --format` does to each tensor: one declarative table.

A checkpoint tensor is either part of a *linear* (`<base>.weight` + `<base>.scale` for the official FP8 / FP4
linears) or a plain tensor copied byte for byte (norms, mHC, router gate, compressors, indexer `weights_proj`,
embeddings, head: BF16 / F32 / I64 in the official checkpoint, and kept so by every recipe).

Linear roles (model-spec.md §8.1) and, per output format, the tensor format each role is written in
(`None` = unchanged, bytes copied):

| role | linears | w8a8 | w4a8 | bf16 | fp8-experts | native |
|---|---|---|---|---|---|---|
| routed_expert | `ffn.experts.E.w{1,2,3}` | int8_channel | int4_channel | bf16 | fp8_block | - |
| shared_expert | `ffn.shared_experts.w{1,2,3}` | int8_channel | int8_channel | bf16 | - | - |
| attn_proj | `attn.wq_a`, `attn.wq_b`, `attn.wkv` | int8_channel | int8_channel | bf16 | - | - |
| indexer_q | `attn.indexer.wq_b` | int8_channel | int8_channel | bf16 | - | - |
| attn_out | `attn.wo_a`, `attn.wo_b` | bf16 | bf16 | bf16 | - | - |
| mtp_proj | `mtp.N.e_proj`, `mtp.N.h_proj` (April MTP), `mtp.0.main_proj` (DSpark) | bf16 | bf16 | bf16 | - | - |

w8a8 / w4a8 follow msModelSlim's V4 recipes (ascend-notes.md §6.2): W8A8-dynamic on `*attn*` except `wo_a` /
`wo_b` (compressor and indexer `weights_proj` are BF16 already) and on `*ffn*` except the router gate; the MTP
projections match neither pattern, so they stay float too. What else an ascendV1 output holds (the description
file, the MTP copies of the embedding and head, config.json) follows `ascend_v1.py`.

Draft blocks are quantised like main layers: `mtp.N.attn.*` / `mtp.N.ffn.*` take the roles above, whether `mtp.N`
is an April MTP block or a DSpark stage (0731 / 0813, dspark-spec.md §1). DSpark's FP8 context projection
`mtp.0.main_proj` is a projection outside `*attn*` / `*ffn*`, like `e_proj` / `h_proj`, and vllm-ascend's DSpark
drafter builds it unquantised unless the config still says `quant_method: fp8` (`vllm_ascend/models/deepseek_v4/
dspark.py` @ `07a5ede`, `DeepseekV4DSparkModel.__init__`, `_main_proj_qconfig`), so it is written as BF16 where
the format drops the FP8 quantization_config. The Markov head (`markov_w1`, `markov_w2`) and the confidence head
(`confidence_head.proj`) are BF16 in the official checkpoint and stay BF16 (byte copies) in every format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Output formats of `ascend-v4 quantize`.
W8A8, W4A8, BF16, FP8_EXPERTS, NATIVE = "w8a8", "w4a8", "bf16", "fp8-experts", "native"
OUTPUT_FORMATS = (W8A8, W4A8, BF16, FP8_EXPERTS, NATIVE)

# (regex on the linear's base name, role); first match wins.
ROLES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^(layers|mtp)\.\d+\.ffn\.experts\.\d+\.w[123]$", "routed_expert"),
    (r"^(layers|mtp)\.\d+\.ffn\.shared_experts\.w[123]$", "shared_expert"),
    (r"^(layers|mtp)\.\d+\.attn\.indexer\.wq_b$", "indexer_q"),
    (r"^(layers|mtp)\.\d+\.attn\.(wq_a|wq_b|wkv)$", "attn_proj"),
    (r"^(layers|mtp)\.\d+\.attn\.(wo_a|wo_b)$", "attn_out"),
    (r"^mtp\.\d+\.(e_proj|h_proj|main_proj)$", "mtp_proj"),
))
_EXPERT = re.compile(r"^(?:layers|mtp)\.\d+\.ffn\.experts\.(\d+)\.w[123]\.")

_INT = {"routed_expert": "int8_channel", "shared_expert": "int8_channel", "attn_proj": "int8_channel",
        "indexer_q": "int8_channel", "attn_out": "bf16", "mtp_proj": "bf16"}
RECIPES: dict[str, dict[str, str]] = {
    W8A8: _INT,
    W4A8: {**_INT, "routed_expert": "int4_channel"},
    BF16: {role: "bf16" for role in _INT},
    FP8_EXPERTS: {"routed_expert": "fp8_block"},
    NATIVE: {},
}


@dataclass(frozen=True)
class OutputStyle:
    """File naming and side files of an output format."""

    stem: str  # shard name stem: <stem>-0000i-of-0000N[...].safetensors
    index: str  # index file name
    ascend_v1: bool  # writes quant_model_description.json
    drop_quantization_config: bool = False  # remove config.json's FP8 quantization_config
    expert_dtype: str | None = None  # config.json expert_dtype override


STYLES = {
    W8A8: OutputStyle("quant_model_weights", "quant_model_weights.safetensors.index.json", True,
                      drop_quantization_config=True),
    W4A8: OutputStyle("quant_model_weights", "quant_model_weights.safetensors.index.json", True,
                      drop_quantization_config=True),
    BF16: OutputStyle("model", "model.safetensors.index.json", False, drop_quantization_config=True),
    FP8_EXPERTS: OutputStyle("model", "model.safetensors.index.json", False, expert_dtype="fp8"),
    NATIVE: OutputStyle("model", "model.safetensors.index.json", False),
}
DESCRIPTION_NAME = "quant_model_description.json"
ASCEND_V1_VERSION = "1.0.0"


def linear_role(base: str) -> str | None:
    for pat, role in ROLES:
        if pat.match(base):
            return role
    return None


def target_format(output_format: str, base: str) -> str | None:
    """Tensor format the linear `base` is written in by `output_format` (None: unchanged)."""
    role = linear_role(base)
    return RECIPES[output_format].get(role) if role else None


def is_down_proj(base: str) -> bool:
    """MoE down projection (w2): the int4 scale_bias is [out, 16] there."""
    return base.endswith(".w2") and ".ffn." in base


def expert_id(name: str) -> int | None:
    """Routed expert index of a tensor name, or None for everything else."""
    m = _EXPERT.match(name)
    return int(m.group(1)) if m else None


def layer_kind(base: str) -> str:
    """Grouping key for error statistics: e.g. `attn.wq_a`, `experts.w1`, `shared_experts.w2`, `mtp.e_proj`,
    `mtp.main_proj`."""
    parts = base.split(".")
    if ".experts." in base and ".shared_experts." not in base:
        return f"experts.{parts[-1]}"
    if ".shared_experts." in base:
        return f"shared_experts.{parts[-1]}"
    if ".indexer." in base:
        return f"indexer.{parts[-1]}"
    if base.startswith("mtp.") and parts[-1] in ("e_proj", "h_proj", "main_proj"):
        return f"mtp.{parts[-1]}"
    return f"attn.{parts[-1]}" if ".attn." in base else parts[-1]


__all__ = ["OUTPUT_FORMATS", "RECIPES", "STYLES", "OutputStyle", "linear_role", "target_format", "is_down_proj",
           "expert_id", "layer_kind", "DESCRIPTION_NAME", "W8A8", "W4A8", "BF16", "FP8_EXPERTS", "NATIVE"]
