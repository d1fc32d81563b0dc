"""transformers' `DeepseekV4ForCausalLM` as a CPU parity oracle, loaded from OUR official-layout checkpoint.

API
    load_transformers_model(ckpt_dir, dtype=torch.float32, *, method="auto") -> DeepseekV4ForCausalLM (CPU, eval)
    transformers_logits(model, ids) -> fp32 [len(ids), vocab]   (one full forward, use_cache=False)
    transformers_greedy(model, ids, max_new_tokens) -> new ids  (transformers' own `generate` + its cache)
    hf_state_dict(ckpt_dir, dtype) -> {HF name: dense tensor}   (our own dequantise + rename; the "convert" path)

Which loading path, and why (checked on transformers 5.23.0, torch 2.13 CPU, `tiny` preset, multi-shard
`checkpoint.dummy` checkpoints: F8_E4M3 + F8_E8M0 `.scale`, FP4 experts as I8 low nibble first + E8M0
[out, in/32], BF16/F32/I64):

* `from_pretrained` is the default and is correct. With `quantization_config` in config.json it builds
  `FineGrainedFP8HfQuantizer`; on a machine without CUDA/XPU it switches itself to `dequantize=True`
  (we pass `FineGrainedFP8Config(dequantize=True)` explicitly so a GPU host behaves the same). Its
  `Fp8Dequantize` derives the block from the scale grid, so it handles both the FP8 128x128 weights and the
  FP4 experts (it unpacks int8 low nibble first with the e2m1 LUT, then applies the 1x32 E8M0 scales) before
  the conversion_mapping fuses experts w1|w3 -> `gate_up_proj` [E, 2*inter, D] (w1 first) and w2 -> `down_proj`.
  Evidence: all 122 HF state-dict tensors (every FP8 attention / indexer / shared-expert weight, the fused FP4
  experts of all 4 layers, BF16 norms/embed/head/compressors, F32 hc/sinks/ape/bias, I64 tid2eid) are
  bit-identical (max |diff| = 0.0) to an independent dequantisation with `ascend_v4.ops.reference.formats`
  renamed by hand (`hf_state_dict`); `missing_keys`, `unexpected_keys` and `mismatched_keys` are empty
  (`mtp.*` is dropped by the model's `_keys_to_ignore_on_load_unexpected`). Needs `accelerate`.
* Pitfall 1 (dtype): `from_pretrained(dtype=torch.float32)` leaves every tensor *stored* as BF16 in BF16
  (embed, lm_head, all norms -- despite `_keep_in_fp32_modules_strict` --, router weights, compressor and
  indexer projections); only the dequantised FP8/FP4 weights come out fp32, and a forward then fails with
  "RuntimeError: expected m1 and m2 to have the same dtype, but got: c10::BFloat16 != float". We upcast
  every floating tensor narrower than `dtype` after loading (`_upcast`); BF16 -> fp32 is exact, so values
  are unchanged. For `dtype=torch.bfloat16` nothing is touched (transformers' own bf16/fp32 mix).
* Pitfall 2 (block alignment): `Fp8Dequantize` computes the block as `rows // scale_rows`, which is only right
  when every FP8 weight dim is a multiple of 128; otherwise it is silently wrong (model-spec §9.5). Direct
  check against `formats.dequant_fp8_block` with random distinct block scales: [256, 384] exact, [96, 160]
  30% of elements wrong, [300, 300] 42% wrong, no error raised. (Dummy weights tend to share one exponent
  across blocks, which hides it: a hidden=160 variant of `tiny` happened to load exactly.) `method=
  "auto"` therefore reads the safetensors headers first and takes the "convert" path (`hf_state_dict` +
  `load_state_dict(strict=True)`) when any FP8 weight has a dim that is not a multiple of 128, or when
  `accelerate` is missing. All bundled presets are aligned, so they use `from_pretrained`; the two paths give
  bit-identical state dicts and logits on `tiny`.

What transformers makes of our config.json (`DeepseekV4Config(**cfg)`, same through from_pretrained):
* `compress_ratios` [0, 4, 128, 4, 0] -> `layer_types` [sliding, CSA, HCA, CSA]: the list is cut to
  `num_hidden_layers`, so the trailing MTP entry is dropped (MTP is not built). Only 0 / 4 / 128 are known
  (KeyError otherwise); `num_hash_layers` 2 -> `mlp_layer_types` [hash_moe, hash_moe, moe, moe].
* `rope_scaling` {yarn, factor 16, original 65536, beta 32/1} -> `rope_parameters = {"main": default,
  theta=rope_theta 10000; "compress": yarn, theta=compress_rope_theta 160000, same factor/original/betas,
  attention_factor=1.0}` with `partial_rotary_factor = qk_rope_head_dim / head_dim`. Sliding layers use "main"
  (no YaRN), CSA/HCA layers, their compressors and the indexer use "compress", matching model-spec §4.2.
* YaRN numbers checked: "compress" inv_freq equals the reference formula with correction range (15, 25) and
  attention scaling 1.0 (max |diff| 0.0); "main" is plain RoPE with theta 10000.
* `generate` really decodes incrementally: one prompt forward, then one token per step through a
  `DynamicCache` of [DynamicSlidingWindowLayer, DeepseekV4CSACache, DeepseekV4HCACache, ...] layers.
* transformers omits the QAT round-trips and the indexer Hadamard, so compare it with our model only with the
  quantisation simulation off, in fp32 (model-spec §9.5).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ascend_v4.quant.st_io import parse_header

if TYPE_CHECKING:  # pragma: no cover
    from transformers import DeepseekV4ForCausalLM

FP8_BLOCK = 128
METHODS = ("auto", "from_pretrained", "convert")

# ---------------------------------------------------------------------------------------------- renaming
# Official name (dense, i.e. without `.scale`) -> transformers state-dict key. Written out by hand from
# model-spec §9.5 so that it is independent of transformers' regex chain in conversion_mapping.py.
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
_BLOCK = {  # suffix after `layers.{l}.` -> suffix after `model.layers.{l}.`
    **{f"hc_{u}_{p}": f"{u}_hc.{p}" for u in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.attn_sink": "self_attn.sinks",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")


def hf_name(name: str) -> str | None:
    """transformers key of an official dense tensor name; None for `mtp.*` (not built by transformers).

    Routed experts are fused, so `layers.{l}.ffn.experts.{e}.w{1,2,3}.weight` raise: see `hf_state_dict`.
    """
    if name.startswith("mtp."):
        return None
    if name in _TOP:
        return _TOP[name]
    m = _LAYER_RE.match(name)
    if m and m[2] in _BLOCK:
        return f"model.layers.{m[1]}.{_BLOCK[m[2]]}"
    raise KeyError(f"no transformers name for checkpoint tensor {name!r}")


# ---------------------------------------------------------------------------------------------- checkpoint I/O
def _shard_files(ckpt_dir: Path) -> list[Path]:
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        return [ckpt_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no safetensors files")
    return files


def misaligned_fp8_weights(ckpt_dir: str | Path) -> list[str]:
    """FP8 weights with a dim that is not a multiple of 128 (transformers' dequantiser gets those wrong); from the
    safetensors headers only (`st_io.parse_header`, no tensor data read)."""
    out: list[str] = []
    for f in _shard_files(Path(ckpt_dir)):
        problems: list[str] = []
        for k, t in parse_header(f, problems).tensors.items():
            if t.dtype == "F8_E4M3" and any(d % FP8_BLOCK for d in t.shape):
                out.append(k)
        if problems:
            raise ValueError(f"{f}: " + "; ".join(problems[:3]))
    return out


def _read_all(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    raw: dict[str, torch.Tensor] = {}
    for f in _shard_files(ckpt_dir):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if not k.startswith("mtp."):
                    raw[k] = h.get_tensor(k)
    return raw


def _dense(raw: dict[str, torch.Tensor], weight_name: str) -> torch.Tensor:
    """Dequantised fp32 weight for `<x>.weight` with a `<x>.scale` sibling (FP8 blocks or packed FP4)."""
    from ascend_v4.ops.reference import formats

    w, s = raw[weight_name], raw[weight_name[: -len("weight")] + "scale"]
    if w.dtype == torch.int8:
        return formats.dequant_fp4(w, s, torch.float32)
    if w.dtype == torch.float8_e4m3fn:
        return formats.dequant_fp8_block(w, s, torch.float32, block=FP8_BLOCK)
    raise TypeError(f"{weight_name}: scaled weight of dtype {w.dtype} (expected float8_e4m3fn or int8)")


def hf_state_dict(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our checkpoint as a transformers `DeepseekV4ForCausalLM` state dict: dequantised, renamed, experts fused.

    Dequantised FP8/FP4 and BF16 tensors become `dtype`; F32 tensors stay fp32 unless `dtype` is wider; I64
    stays I64. `mtp.*` is skipped. Raises on any tensor it cannot place.
    """
    raw = _read_all(Path(ckpt_dir))
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for k, t in raw.items():
        if k.endswith(".scale"):
            if k[: -len("scale")] + "weight" not in raw:
                raise KeyError(f"{k}: scale without a weight")
            continue
        scaled = k.endswith(".weight") and k[: -len("weight")] + "scale" in raw
        v = _dense(raw, k) if scaled else t
        if v.is_floating_point():
            v = v.to(wide if t.dtype == torch.float32 else dtype)
        m = _EXPERT_RE.match(k)
        if m:
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = v
            continue
        out[hf_name(k)] = v
    for layer in sorted({lay for lay, _ in experts}):
        w1, w2, w3 = (experts[(layer, w)] for w in ("w1", "w2", "w3"))
        n = len(w1)
        if not (sorted(w1) == sorted(w2) == sorted(w3) == list(range(n))):
            raise KeyError(f"layers.{layer}: incomplete routed experts")
        p = f"model.layers.{layer}.mlp.experts."
        out[p + "gate_up_proj"] = torch.stack([torch.cat([w1[e], w3[e]], 0) for e in range(n)])
        out[p + "down_proj"] = torch.stack([w2[e] for e in range(n)])
    return out


# ---------------------------------------------------------------------------------------------- loading
def _hf_config(cfg: dict):
    from transformers import DeepseekV4Config

    cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures", "transformers_version")}
    return DeepseekV4Config(**cfg)


def _upcast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter/buffer narrower than `dtype` to `dtype` (exact for bf16 -> fp32)."""
    bits = torch.finfo(dtype).bits
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None and t.is_floating_point() and torch.finfo(t.dtype).bits < bits:
                    if isinstance(t, torch.nn.Parameter):
                        store[name] = torch.nn.Parameter(t.data.to(dtype), requires_grad=t.requires_grad)
                    else:
                        store[name] = t.to(dtype)


def load_transformers_model(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32, *,
                            method: str = "auto") -> "DeepseekV4ForCausalLM":
    """transformers' `DeepseekV4ForCausalLM` on CPU, eval mode, weights from our official-layout checkpoint.

    `method`: "from_pretrained" (transformers dequantises FP8/FP4 itself), "convert" (our `hf_state_dict`,
    strict key check) or "auto" (from_pretrained unless an FP8 weight dim is not a multiple of 128 or
    `accelerate` is missing). Floating tensors narrower than `dtype` are upcast (see module docstring).
    """
    from transformers import DeepseekV4ForCausalLM

    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    ckpt_dir = Path(ckpt_dir)
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    if method == "auto":
        # from_pretrained needs accelerate for FP8 checkpoints (even on CPU) and 128-aligned FP8 dims.
        usable = importlib.util.find_spec("accelerate") is not None and not misaligned_fp8_weights(ckpt_dir)
        method = "from_pretrained" if usable else "convert"

    if method == "from_pretrained":
        kwargs = {}
        if cfg.get("quantization_config"):
            from transformers import FineGrainedFP8Config

            kwargs["quantization_config"] = FineGrainedFP8Config(dequantize=True)
        model, info = DeepseekV4ForCausalLM.from_pretrained(
            str(ckpt_dir), dtype=dtype, device_map="cpu", output_loading_info=True, **kwargs)
        bad = {k: sorted(v) for k, v in info.items()
               if k in ("missing_keys", "mismatched_keys", "unexpected_keys", "error_msgs")
               and [x for x in v if not str(x).startswith("mtp.")]}
        if bad:
            raise RuntimeError(f"{ckpt_dir}: transformers did not load the checkpoint cleanly: {bad}")
    else:
        sd = hf_state_dict(ckpt_dir, dtype)
        model = DeepseekV4ForCausalLM(_hf_config(cfg))
        want = set(model.state_dict())
        missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
        if missing or extra:
            raise RuntimeError(f"{ckpt_dir}: state dict mismatch; missing {missing[:8]}, unexpected {extra[:8]}")
        model.load_state_dict(sd, strict=True, assign=True)
    _upcast(model, dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------- running
@torch.no_grad()
def transformers_logits(model: "DeepseekV4ForCausalLM", ids: Sequence[int]) -> torch.Tensor:
    """Logits at every position of one full-sequence forward (no cache), fp32 [len(ids), vocab]."""
    x = torch.tensor([list(ids)], dtype=torch.long)
    out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def transformers_greedy(model: "DeepseekV4ForCausalLM", ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation with transformers' own `generate` and its KV/compressor cache; new ids only.

    EOS is disabled (`eos_token_id=None` passed as a kwarg: that overrides the model's generation_config,
    whereas `None` inside a passed GenerationConfig would be refilled from it), so exactly
    `max_new_tokens` ids come back.
    """
    x = torch.tensor([list(ids)], dtype=torch.long)
    pad = model.config.bos_token_id if model.config.bos_token_id is not None else 0  # batch of 1: never used
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        eos_token_id=None, pad_token_id=pad, use_cache=True,
        temperature=None, top_p=None, top_k=None)
    new = out[0, len(ids):].tolist()
    if len(new) != max_new_tokens:
        raise RuntimeError(f"generate returned {len(new)} new tokens, expected {max_new_tokens}")
    return new


__all__ = ["load_transformers_model", "transformers_logits", "transformers_greedy", "hf_state_dict", "hf_name",
           "misaligned_fp8_weights"]
