"""`ModelArgs`: every architecture number of a DeepSeek-V4 checkpoint, in one dataclass.

Presets are data: `ascend_v4/model/configs/<name>.json` hold a Hugging Face `config.json` exactly as the
official repositories ship it (`flash`, `pro`) or in the same format for the small test presets (`tiny`,
`small`). A checkpoint directory and a preset are therefore read by the same code path
(`ModelArgs.from_hf_config`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

# Layer kinds, named after what the attention sees beyond its sliding window.
WINDOW, CSA, HCA = "window", "csa", "hca"
_RATIO_TO_KIND = {0: WINDOW, 4: CSA, 128: HCA}

PRESETS_PACKAGE = "ascend_v4.model.configs"


class ConfigError(ValueError):
    """A config.json (or preset) that is not a DeepSeek-V4 config this toolkit can run."""


_REQUIRED: Any = object()  # `_Keys` default meaning "the key must be present"


def _shown(value: Any) -> str:
    """A config value for an error message: its repr (shortened) and Python type; JSON null as `null`."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{text if len(text) <= 80 else text[:77] + '...'} ({type(value).__name__})"


def _as_int(value: Any) -> int | None:
    """`value` as an int when it is one: JSON integers, and floats with no fractional part (4.0 -> 4, as some
    JSON writers emit); None for bools (True is an int in Python), fractions, strings, null and the rest."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


class _Keys:
    """Typed, range-checked reads of the keys of one JSON object of a config.json.

    Each getter takes the key and its default (omitted: the key is required), checks the value's type and
    range, and raises `ConfigError` naming the key, the rule and the value found, e.g.
    `config.json: "hidden_size" must be a positive integer, got 'large' (str)`. Null is never accepted for a
    scalar or list key; for `section` (a nested object) null means absent, as in Hugging Face configs.
    """

    def __init__(self, obj: dict[str, Any], where: str, prefix: str = "") -> None:
        self.obj, self.where, self.prefix = obj, where, prefix

    def _get(self, key: str, default: Any, rule: str) -> Any:
        if key in self.obj:
            return self.obj[key]
        if default is _REQUIRED:
            raise ConfigError(f'{self.where}: required key "{self.prefix}{key}" is missing (must be {rule})')
        return default

    def _fail(self, key: str, rule: str, value: Any, detail: str = "") -> NoReturn:
        raise ConfigError(f'{self.where}: "{self.prefix}{key}" must be {rule}, got {_shown(value)}{detail}')

    def integer(self, key: str, default: Any = _REQUIRED, lo: int = 1, hi: int | None = None) -> int:
        """An integer >= lo (default: positive) and <= hi when given."""
        rule = f"an integer in [{lo}, {hi}]" if hi is not None else \
            {0: "a non-negative integer", 1: "a positive integer"}.get(lo, f"an integer >= {lo}")
        value = self._get(key, default, rule)
        n = _as_int(value)
        if n is None or n < lo or (hi is not None and n > hi):
            self._fail(key, rule, value)
        return n

    def number(self, key: str, default: Any = _REQUIRED) -> float:
        """A finite number > 0 (JSON integer or float; not a bool)."""
        rule = "a positive number"
        value = self._get(key, default, rule)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            self._fail(key, rule, value)
        return float(value)

    def text(self, key: str, default: Any = _REQUIRED) -> str:
        value = self._get(key, default, "a string")
        if not isinstance(value, str):
            self._fail(key, "a string", value)
        return value

    def integers(self, key: str, default: Any = _REQUIRED) -> tuple[int, ...]:
        """A JSON list of non-negative integers, as a tuple."""
        rule = "a list of non-negative integers"
        value = self._get(key, default, rule)
        if not isinstance(value, (list, tuple)):
            self._fail(key, rule, value)
        out = tuple(_as_int(v) for v in value)
        for i, n in enumerate(out):
            if n is None or n < 0:
                self._fail(key, rule, value, f": item {i} is {_shown(value[i])}")
        return out  # type: ignore[return-value]

    def section(self, key: str) -> _Keys | None:
        """A nested JSON object (None when absent or null), read with the same checks."""
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self._fail(key, "a JSON object {...} (or null)", value)
        return _Keys(value, self.where, f"{self.prefix}{key}.")


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of one DeepSeek-V4 model. Field names follow the official reference `ModelArgs`.

    Attributes are grouped as in the official config; `from_hf_config` documents the HF key of each.
    """

    name: str = "custom"
    # -- embedding / trunk
    vocab_size: int = 129280
    dim: int = 4096  # hidden_size (D)
    n_layers: int = 43  # num_hidden_layers (MTP blocks not included)
    norm_eps: float = 1e-6  # every RMSNorm and the mHC rsqrt
    bos_token_id: int = 0
    eos_token_id: int = 1
    # -- attention (single shared K=V latent)
    n_heads: int = 64
    head_dim: int = 512  # q, k and v width; last `rope_head_dim` dims are rotated
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8  # grouped low-rank output projection: groups G
    o_lora_rank: int = 1024  # and per-group rank
    window_size: int = 128  # sliding window of raw KV, every layer
    # -- compression: one entry per layer, then one per MTP block (0 window-only, 4 CSA, 128 HCA)
    compress_ratios: tuple[int, ...] = ()
    # -- lightning indexer (CSA layers only)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # -- RoPE / YaRN (YaRN and compress_rope_theta only in layers with ratio > 0)
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1
    max_seq_len: int = 1048576
    # -- MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    n_hash_layers: int = 3  # layers [0, n_hash_layers) route by token id (tid2eid)
    swiglu_limit: float = 10.0
    expert_dtype: str = "fp4"  # routed experts: "fp4" (e2m1, 1x32 scales) or "fp8" (128x128 blocks)
    # -- mHC
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # -- multi-token prediction
    n_mtp_layers: int = 1
    # -- DSpark draft module (Flash-0731 / Pro-0813, dspark-spec.md): 0 stages = none. The stages are the
    # window-only blocks `mtp.{0..n-1}`, one compress_ratios entry (0) each after the main layers.
    n_dspark_stages: int = 0
    dspark_block_size: int = 0  # block slots per draft: [anchor, noise x (B-1)] -> B draft tokens
    dspark_markov_rank: int = 0  # rank r of the Markov head (markov_w1 / markov_w2: [V, r])
    dspark_noise_token_id: int = 0  # the block's filler token (128799)
    dspark_target_layer_ids: tuple[int, ...] = ()  # main layers whose output streams feed main_proj
    # -- provenance: the raw HF config this was read from (kept for writing checkpoints back out)
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{self.name}: {msg}")

        need(len(self.compress_ratios) >= self.n_layers + self.n_draft_layers,
             f"compress_ratios has {len(self.compress_ratios)} entries, need n_layers + MTP/DSpark blocks = "
             f"{self.n_layers + self.n_draft_layers}")
        if self.n_dspark_stages:
            need(self.n_mtp_layers == 0, "a checkpoint carries either MTP blocks or DSpark stages, not both")
            stage_ratios = self.compress_ratios[self.n_layers:self.n_layers + self.n_dspark_stages]
            need(not any(stage_ratios), f"DSpark stages are window-only: their compress_ratios must be 0, got "
                                        f"{list(stage_ratios)}")
            need(self.dspark_block_size >= 1 and self.dspark_markov_rank >= 1,
                 "dspark_block_size and dspark_markov_rank must be positive")
            need(0 <= self.dspark_noise_token_id < self.vocab_size,
                 f"dspark_noise_token_id {self.dspark_noise_token_id} is outside the vocabulary [0, {self.vocab_size})")
            need(len(self.dspark_target_layer_ids) >= 1
                 and len(set(self.dspark_target_layer_ids)) == len(self.dspark_target_layer_ids)
                 and all(0 <= i < self.n_layers for i in self.dspark_target_layer_ids),
                 f"dspark_target_layer_ids {list(self.dspark_target_layer_ids)} must name distinct main layers "
                 f"0..{self.n_layers - 1}")
        bad = sorted({r for r in self.compress_ratios if r not in _RATIO_TO_KIND})
        need(not bad, f"compress_ratios contains {bad}; DeepSeek-V4 uses only 0, 4 and 128")
        need(self.head_dim > self.rope_head_dim and self.rope_head_dim % 2 == 0,
             f"head_dim {self.head_dim} must exceed the even rope_head_dim {self.rope_head_dim}")
        need(self.index_head_dim >= self.rope_head_dim,
             f"index_head_dim {self.index_head_dim} < rope_head_dim {self.rope_head_dim}")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0,
             f"index_head_dim {self.index_head_dim} must be a power of two (Hadamard rotation)")
        need(self.n_heads % self.o_groups == 0, f"n_heads {self.n_heads} not divisible by o_groups {self.o_groups}")
        need(self.n_activated_experts <= self.n_routed_experts, "more activated than routed experts")
        need(self.n_shared_experts == 1, f"n_shared_experts={self.n_shared_experts}; V4 has exactly one")
        need(self.expert_dtype in ("fp4", "fp8"), f"expert_dtype {self.expert_dtype!r} is not fp4 or fp8")
        need(self.score_func == "sqrtsoftplus", f"scoring_func {self.score_func!r}; V4 uses sqrtsoftplus")
        need(self.dim % 32 == 0 and self.moe_inter_dim % 32 == 0,
             "hidden_size and moe_intermediate_size must be multiples of 32 (FP4 1x32 scale blocks)")

    # ---- derived -------------------------------------------------------------------------------
    @property
    def nope_dim(self) -> int:
        """Non-rotated head dims (448 for the real models)."""
        return self.head_dim - self.rope_head_dim

    @property
    def n_draft_layers(self) -> int:
        """Blocks after the main layers (`mtp.{i}`, cache layers n_layers + i): MTP blocks or DSpark stages."""
        return self.n_mtp_layers + self.n_dspark_stages

    @property
    def has_dspark(self) -> bool:
        return self.n_dspark_stages > 0

    def ratio(self, layer_id: int) -> int:
        """Compression ratio of main layer `layer_id`, or of MTP block / DSpark stage `layer_id - n_layers`."""
        return self.compress_ratios[layer_id]

    def kind(self, layer_id: int) -> str:
        return _RATIO_TO_KIND[self.ratio(layer_id)]

    @property
    def layer_kinds(self) -> list[str]:
        return [self.kind(i) for i in range(self.n_layers)]

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.n_hash_layers

    # KV-cache bytes: ascend_v4.model.kv_layout (the one memory model of the pool, plan and info).

    def param_counts(self) -> dict[str, int]:
        """Logical parameter counts: total, routed experts, active per token (main model, MTP apart)."""
        d, h, hd = self.dim, self.n_heads, self.head_dim
        attn = (self.q_lora_rank * d + h * hd * self.q_lora_rank + hd * d
                + self.o_groups * self.o_lora_rank * (h // self.o_groups) * hd
                + d * self.o_groups * self.o_lora_rank + h + self.q_lora_rank + hd)
        comp = {WINDOW: 0,
                CSA: 2 * (2 * hd * d) + 4 * 2 * hd + hd
                + 2 * (2 * self.index_head_dim * d) + 4 * 2 * self.index_head_dim + self.index_head_dim
                + self.index_n_heads * self.index_head_dim * self.q_lora_rank + self.index_n_heads * d,
                HCA: 2 * hd * d + 128 * hd + hd}
        expert = 3 * d * self.moe_inter_dim
        hc = 2 * ((2 + self.hc_mult) * self.hc_mult * (self.hc_mult * d + 1) + 3)
        routed = dense = 0
        for i in range(self.n_layers):
            dense += attn + comp[self.kind(i)] + hc + 2 * d + self.n_routed_experts * d + expert
            routed += self.n_routed_experts * expert
        top = 2 * self.vocab_size * d + d + self.hc_mult * (self.hc_mult * d + 1) + 1
        active = dense + top + self.n_layers * self.n_activated_experts * expert
        return {"total": dense + routed + top, "routed_experts": routed, "active": active}

    # ---- I/O ---------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "custom", source: str | None = None) -> "ModelArgs":
        """Read a Hugging Face `config.json` dict of a DeepSeek-V4 checkpoint (Flash, Pro or test preset).

        Every key read is checked for presence (when required), JSON type and range before use (see
        `_Keys`): bools and fractions are not integers, but an integral float (4.0) is accepted as one;
        null is an error except for the optional objects `rope_scaling` / `quantization_config`.
        `source` (default "config of <name>") starts every message. Raises `ConfigError` naming the key,
        the expected type/range and the value found for anything that is not DeepSeek-V4.
        """
        where = source or f"config of {name}"
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: the top level must be a JSON object {{...}}, got {_shown(cfg)}")
        mt = cfg.get("model_type")
        if mt != "deepseek_v4":
            hint = " (DeepSeek-V4.1 is a different architecture)" if mt == "deepseek_v41" else ""
            raise ConfigError(f"{where}: model_type is {mt!r}, expected 'deepseek_v4'{hint}")

        k = _Keys(cfg, where)
        rs = k.section("rope_scaling")  # absent or null: no YaRN
        qc = k.section("quantization_config")
        n_layers = k.integer("num_hidden_layers")
        n_mtp = k.integer("num_nextn_predict_layers", 1, lo=0)
        ratios = k.integers("compress_ratios")
        dspark: dict[str, Any] = {}
        if "dspark_block_size" in cfg:
            # 0731/0813: `mtp.*` holds the DSpark stages, one trailing compress_ratios entry each (3 in both
            # releases; "num_nextn_predict_layers": 1 is stale there, dspark-spec.md §5).
            n_mtp, stages = 0, len(ratios) - n_layers
            if stages < 1:
                raise ConfigError(f"{where}: a DSpark config needs one compress_ratios entry per draft stage after "
                                  f"the {n_layers} main layers, got {len(ratios)} entries")
            dspark = dict(n_dspark_stages=stages, dspark_block_size=k.integer("dspark_block_size"),
                          dspark_markov_rank=k.integer("dspark_markov_rank"),
                          dspark_noise_token_id=k.integer("dspark_noise_token_id", lo=0),
                          dspark_target_layer_ids=k.integers("dspark_target_layer_ids"))
        if k.integer("num_key_value_heads", 1) != 1:
            raise ConfigError(f"{where}: num_key_value_heads must be 1 (single shared K=V latent)")
        if qc and (block := qc.integers("weight_block_size", (128, 128))) != (128, 128):
            raise ConfigError(f"{where}: quantization_config.weight_block_size {list(block)} is not [128, 128]")
        vocab = k.integer("vocab_size")
        return cls(
            name=name,
            vocab_size=vocab,
            dim=k.integer("hidden_size"),
            n_layers=n_layers,
            norm_eps=k.number("rms_norm_eps", 1e-6),
            bos_token_id=k.integer("bos_token_id", 0, lo=0, hi=vocab - 1),
            eos_token_id=k.integer("eos_token_id", 1, lo=0, hi=vocab - 1),
            n_heads=k.integer("num_attention_heads"),
            head_dim=k.integer("head_dim", 512),
            rope_head_dim=k.integer("qk_rope_head_dim", 64),
            q_lora_rank=k.integer("q_lora_rank"),
            o_groups=k.integer("o_groups"),
            o_lora_rank=k.integer("o_lora_rank"),
            window_size=k.integer("sliding_window", 128),
            compress_ratios=ratios,
            index_n_heads=k.integer("index_n_heads"),
            index_head_dim=k.integer("index_head_dim"),
            index_topk=k.integer("index_topk"),
            rope_theta=k.number("rope_theta", 10000.0),
            compress_rope_theta=k.number("compress_rope_theta", 160000.0),
            rope_factor=rs.number("factor", 1.0) if rs else 1.0,
            original_seq_len=rs.integer("original_max_position_embeddings", 0, lo=0) if rs else 0,
            beta_fast=rs.integer("beta_fast", 32) if rs else 32,
            beta_slow=rs.integer("beta_slow", 1) if rs else 1,
            max_seq_len=k.integer("max_position_embeddings", 1048576),
            n_routed_experts=k.integer("n_routed_experts"),
            n_shared_experts=k.integer("n_shared_experts", 1),
            n_activated_experts=k.integer("num_experts_per_tok"),
            moe_inter_dim=k.integer("moe_intermediate_size"),
            score_func=k.text("scoring_func", "sqrtsoftplus"),
            route_scale=k.number("routed_scaling_factor"),
            n_hash_layers=k.integer("num_hash_layers", 0, lo=0, hi=n_layers),
            swiglu_limit=k.number("swiglu_limit", 10.0),
            expert_dtype=k.text("expert_dtype", qc.text("expert_dtype", "fp4") if qc else "fp4"),
            hc_mult=k.integer("hc_mult", 4),
            hc_sinkhorn_iters=k.integer("hc_sinkhorn_iters", 20),
            hc_eps=k.number("hc_eps", 1e-6),
            n_mtp_layers=n_mtp,
            **dspark,
            hf_config=dict(cfg),
        )

    @classmethod
    def from_preset(cls, name: str) -> "ModelArgs":
        """Load a bundled preset by name (`flash`, `pro`, `flash-0731`, `pro-0813`, `tiny`, `small`, `tiny-dspark`)."""
        if name not in preset_names():
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
        text = resources.files(PRESETS_PACKAGE).joinpath(f"{name}.json").read_text()
        return cls.from_hf_config(json.loads(text), name=name)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelArgs":
        """Read `<path>/config.json` of a checkpoint directory.

        Every failure is a `ConfigError` naming the file: missing, unreadable (permissions, I/O error),
        not UTF-8 JSON, not a JSON object, or not a valid DeepSeek-V4 config.
        """
        p = Path(path) / "config.json"
        try:
            if not p.is_file():
                raise ConfigError(f"{p}: no config.json in the checkpoint directory")
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON (not UTF-8 text: {e})") from e
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from e
        return cls.from_hf_config(cfg, name=str(path), source=str(p))

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` dict for this model (the original one when it was read from a file)."""
        if self.hf_config:
            return dict(self.hf_config)
        raise ConfigError(f"{self.name}: no HF config attached")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESETS_PACKAGE).iterdir() if p.name.endswith(".json"))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def yarn_low_high(args: ModelArgs) -> tuple[int, int]:
    """YaRN correction range for the compressed-layer rotary (model-spec.md §4.2): (15, 25) for θ=160000."""
    theta, d = args.compress_rope_theta, args.rope_head_dim

    def corr(beta: float) -> float:
        return d * math.log(args.original_seq_len / (2 * math.pi * beta)) / (2 * math.log(theta))

    low = max(math.floor(corr(args.beta_fast)), 0)
    high = min(math.ceil(corr(args.beta_slow)), d - 1)
    return low, high
