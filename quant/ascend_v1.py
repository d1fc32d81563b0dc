"""msModelSlim's "ascendV1" output rules for DeepSeek-V4, as small pure functions (no torch, no I/O).

`ascend-v4 quantize --format w8a8|w4a8` writes the layout msModelSlim's `AscendV1Saver` writes for its V4
recipes, so vllm-ascend (`--quantization ascend`) and MindIE read it the same way. Each rule below cites the
source it was read from; the snapshots read were `Keithwwa/msmodelslim` @ `ad2c44a` (2026-08-21, a fork of
msModelSlim carrying the `deepseek_v4` adapter; `Ascend/msmodelslim` @ `030d6ea` has the same saver rules, its
priority list one entry shorter) and `vllm-project/vllm-ascend` @ `182b75e` (2026-08-22).

Rules:

* **MTP copies** (`shared_copies`): msModelSlim's V4 MTP layer owns an embedding and an output head
  (`msmodelslim/model/deepseek_v4/mtp_quant_module.py`, `MTPLayer` and `get_mtp_layer`: `emb.tok_emb.weight`
  is filled from the main `embed.weight`, `head.weight` from the main `head.weight`, both read from the source
  index), and the saver writes every parameter of every module, so each `mtp.{i}` gains
  `mtp.{i}.emb.tok_emb.weight` and `mtp.{i}.head.weight`: BF16 `[vocab, dim]`, description `FLOAT`
  (`nn.Embedding` -> `on_float_module`, `nn.Linear` outside the `*attn*` / `*ffn*` recipe patterns ->
  `on_float_linear`). vllm-ascend needs them: its V4 MTP loader aliases `embed.weight` / `head.weight` to those
  names only for the official FP8 checkpoint (`vllm_ascend/models/deepseek_v4/mtp.py`, `load_weights`, under
  `quant_config.get_name() == "deepseek_v4_fp8"`); under `--quantization ascend` the MTP `shared_head.head` is
  loaded from `mtp.0.head.weight` or not at all, and `_maybe_share_lm_head`
  (`vllm_ascend/spec_decode/llm_base_proposer.py`) swaps in the target `lm_head` only when
  `torch.equal(shared_head.head.weight, lm_head.weight)`. Without QuaRot (we never rotate) the copies are
  byte-identical to their sources.
  DSpark checkpoints (0731 / 0813: `mtp.*` holds the DSpark stages, `n_mtp_layers` 0) get **no copies**:
  msModelSlim's `MTPLayer` is the April block (it declares `enorm` / `hnorm` / `e_proj` / `h_proj`, which DSpark
  stages lack, so no msModelSlim layout exists for them), and vllm-ascend's DSpark drafter
  (`vllm_ascend/models/deepseek_v4/dspark.py` @ `07a5ede`, `DSparkDeepseekV4ForCausalLM.load_weights`) takes its
  embedding and head from the main `embed.weight` / `head.weight` (optionally `mtp.0.embed.weight` /
  `mtp.{last}.head.weight`); its `_remap_dspark_name` would send an April-style `mtp.{i}.emb.tok_emb.weight` to a
  parameter that does not exist, so writing the copies would break that loader.
* **`model_quant_type`** (`model_quant_type`): `AscendV1Saver.update_quant_type`
  (`msmodelslim/core/quant_service/modelslim_v1/save/ascendv1.py`) keeps, over every saved linear, the type
  ranked highest in `QUANT_TYPE_PRIORITY`; `W4A8_DYNAMIC` is deliberately absent from that list ("hidden"), so
  a W4A8 recipe (int4 routed experts, W8A8_DYNAMIC elsewhere) records `W8A8_DYNAMIC`. Types not in the list
  never change it; with none at all it stays `"Unknown"`.
* **Description keys** (`description`): `AscendV1Saver.post_run` writes the per-tensor entries first (as the
  modules are saved), then `version` (`"1.0.0"`), `model_quant_type`, `metadata` (`{}` unless an online QuaRot
  head rotation sets `metadata["quarot"]`), `group_size` (0 unless a per-group or MX scheme sets it; W8A8 /
  W4A8 dynamic per-channel never do), `optional` (`{}` unless a `QuaRotExtraInfoWrapperIR` adds
  `optional["quarot"]["rotation_map"]`; the V4 adapter never creates one). `JsonWriter` keeps insertion order
  (`save/utils/json.py`); the distributed (EP) saver's `_merge_json_files` (`save/ascendv1_distributed.py`)
  instead sorts all keys. We write the single-process order.
* **config.json** (`adjust_config`): `AscendV1Saver.post_run` copies the source's top-level `*.json` / `*.py` /
  `*.txt` / `*.jinja` (not `*index.json`) and `remove_quantization_config` drops `quantization_config` at the top
  level and inside `text_config`. `DeepSeekV4ModelAdapter` (`msmodelslim/model/deepseek_v4/model_adapter.py`)
  has no `ascendv1_save_postprocess`, so **no `quantize` field** is added for V4. Where msModelSlim does add
  one for MindIE it is the lower-cased `model_quant_type` (`example/common/copy_config_files.py`,
  `modify_config_json`: `w8a8_dynamic` for dynamic weights, never `w8a8`, which MindIE reads as *static* W8A8)
  and, for DeepSeek-V3 W4A8, also `moe_quantize: w4a8_dynamic` (`msmodelslim/model/deepseek_v3/model_adapter.py`,
  `ascendv1_save_postprocess`); `adjust_config(..., mindie=True)` applies those two. vllm-ascend reads
  `moe_quantize` / `quantize` only to gate its MegaMoE path (`vllm_ascend/ascend_config.py`: absent, `w8a8`,
  `w4a8`, `w8a8_dynamic`, `w4a8_dynamic` all allow it).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping

from . import recipes
from .manifest import FORMAT_OF_QUANT_TYPE

VERSION = recipes.ASCEND_V1_VERSION  # "1.0.0": AscendV1Saver.__init__, self.version
FLOAT = "FLOAT"
UNKNOWN = "Unknown"  # AscendV1Saver.__init__: model_quant_type before any ranked linear was saved
# AscendV1Saver.QUANT_TYPE_PRIORITY, lowest rank first; W4A8_DYNAMIC is absent on purpose.
QUANT_TYPE_PRIORITY = ("FLOAT", "W16A16S", "W8A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8", "WFP8AFP8_DYNAMIC",
                       "W8A8_MXFP8", "W4A8_MXFP", "W4A4_DYNAMIC", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE",
                       "W4A4_MXFP4_SVD")
# Keys post_run writes after the per-tensor entries, in its order.
HEADER_KEYS = ("version", "model_quant_type", "metadata", "group_size", "optional")
GROUP_SIZE = 0  # per-channel W8A8_DYNAMIC / W4A8_DYNAMIC: the saver never sets group_size

# mtp.{i}.<leaf> <- <source> (get_mtp_layer assigns emb.tok_emb first, then head).
MTP_COPIES = (("emb.tok_emb.weight", "embed.weight"), ("head.weight", "head.weight"))
_COPY_NAME = re.compile(r"^mtp\.\d+\.(?:emb\.tok_emb|head)\.weight$")


def mtp_copy_names(n_mtp_layers: int) -> dict[str, str]:
    """{copy name: source name} of every tensor an ascendV1 checkpoint duplicates for `n_mtp_layers` April MTP
    layers (present or not), in the order msModelSlim fills them (`get_mtp_layer`). DSpark stages are not MTP
    layers here (`ModelArgs.n_mtp_layers` is 0 for them): no copies (module docstring)."""
    return {f"mtp.{i}.{leaf}": src for i in range(n_mtp_layers) for leaf, src in MTP_COPIES}


def is_shared_copy(name: str) -> bool:
    """`name` is one of the MTP embedding / head copies (`mtp.{i}.emb.tok_emb.weight`, `mtp.{i}.head.weight`)."""
    return _COPY_NAME.match(name) is not None


def shared_copies(tensor_names: Collection[str], n_mtp_layers: int) -> list[tuple[str, str]]:
    """(output tensor name, source tensor name) of the tensors to duplicate when writing ascendV1 from a
    checkpoint holding `tensor_names`: for each MTP layer, its embedding and head from the main `embed.weight` /
    `head.weight` (msModelSlim `get_mtp_layer`). Copies whose source is absent (msModelSlim would raise) or
    that the checkpoint already holds are left out.
    """
    return [(dst, src) for dst, src in mtp_copy_names(n_mtp_layers).items()
            if src in tensor_names and dst not in tensor_names]


def model_quant_type(quant_types: Iterable[str]) -> str:
    """`model_quant_type` by `AscendV1Saver.update_quant_type`: the highest-ranked type of
    `QUANT_TYPE_PRIORITY` among `quant_types`, `"Unknown"` when none is ranked.

    msModelSlim ranks the type of each saved *linear* (norms and embeddings do not count); a V4 checkpoint always
    has FLOAT linears (`wo_a`, router gate, ...), so ranking every tensor's type gives the same answer.
    """
    best = -1
    for qt in quant_types:
        if qt in QUANT_TYPE_PRIORITY:
            best = max(best, QUANT_TYPE_PRIORITY.index(qt))
    return QUANT_TYPE_PRIORITY[best] if best >= 0 else UNKNOWN


def description(per_tensor_quant_type: Mapping[str, str], output_format: str) -> dict:
    """The whole `quant_model_description.json` of an ascendV1 output: every tensor's quant type (in the given
    order), then `version`, `model_quant_type`, `metadata`, `group_size`, `optional` as `AscendV1Saver.post_run`
    writes them.

    Args:
        per_tensor_quant_type: {output tensor name: `FLOAT` / `W8A8_DYNAMIC` / `W4A8_DYNAMIC`}, copies included.
        output_format: `w8a8` or `w4a8` (a format whose `recipes.STYLES` entry writes ascendV1).

    Raises:
        ValueError: `output_format` does not write ascendV1, or a tensor name collides with a header key.
    """
    style = recipes.STYLES.get(output_format)
    if style is None or not style.ascend_v1:
        raise ValueError(f"{output_format!r} does not write msModelSlim's ascendV1 layout")
    clash = [k for k in HEADER_KEYS if k in per_tensor_quant_type]
    if clash:
        raise ValueError(f"tensor names collide with description keys: {', '.join(clash)}")
    out: dict = dict(per_tensor_quant_type)
    out["version"] = VERSION
    out["model_quant_type"] = model_quant_type(per_tensor_quant_type.values())
    out["metadata"] = {}
    out["group_size"] = GROUP_SIZE
    out["optional"] = {}
    return out


def recipe_model_quant_type(output_format: str) -> str:
    """`model_quant_type` of a whole `output_format` conversion, from the tensor formats its recipe writes
    (`recipes.RECIPES`; quant types per `manifest.FORMAT_OF_QUANT_TYPE`) plus the FLOAT linears every V4 keeps."""
    fmts = set(recipes.RECIPES[output_format].values())
    return model_quant_type([FLOAT] + [qt for qt, f in FORMAT_OF_QUANT_TYPE.items() if f in fmts])


def mindie_fields(model_quant_type_: str, output_format: str) -> dict[str, str]:
    """config.json fields msModelSlim writes for MindIE where it writes any (not for V4; see module docstring):
    `quantize` = lower-cased `model_quant_type`, plus `moe_quantize: w4a8_dynamic` for W4A8."""
    out = {"quantize": model_quant_type_.lower()}
    if output_format == recipes.W4A8:
        out["moe_quantize"] = "w4a8_dynamic"
    return out


def adjust_config(cfg: Mapping, output_format: str, *, mindie: bool = False) -> dict:
    """The output's config.json for `output_format`, from the source's (not modified).

    ascendV1 formats (w8a8, w4a8): `quantization_config` removed at the top level and in `text_config`
    (msModelSlim `remove_quantization_config`); nothing added unless `mindie` (then `mindie_fields`, with the
    `model_quant_type` of the format's recipe, `recipe_model_quant_type`). Other formats keep their
    `recipes.STYLES` rules: `drop_quantization_config` (bf16; `text_config` too) and `expert_dtype` (fp8-experts).
    """
    style = recipes.STYLES[output_format]
    out = dict(cfg)
    if style.ascend_v1 or style.drop_quantization_config:
        out.pop("quantization_config", None)
        text = out.get("text_config")
        if isinstance(text, Mapping) and "quantization_config" in text:
            out["text_config"] = {k: v for k, v in text.items() if k != "quantization_config"}
    if style.expert_dtype:
        out["expert_dtype"] = style.expert_dtype
    if mindie and style.ascend_v1:
        out.update(mindie_fields(recipe_model_quant_type(output_format), output_format))
    return out


__all__ = ["VERSION", "FLOAT", "QUANT_TYPE_PRIORITY", "HEADER_KEYS", "MTP_COPIES", "mtp_copy_names",
           "is_shared_copy", "shared_copies", "model_quant_type", "recipe_model_quant_type", "description",
           "mindie_fields", "adjust_config"]
