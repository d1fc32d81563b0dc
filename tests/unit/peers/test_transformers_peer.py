"""transformers' `DeepseekV4ForCausalLM` as a peer on a dummy `tiny` checkpoint (`ascend_v4.peers.transformers_v4`).

Weights must equal an independent dequantisation of our official-layout tensors (FP8 128x128, FP4 1x32 packed
low nibble first, BF16, F32, I64), the config must map to the right layer / rope types, and transformers'
cached `generate` must agree with argmax over repeated full forwards on a prompt long enough for HCA entries.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from ascend_v4.checkpoint.dummy import write_dummy_checkpoint  # noqa: E402
from ascend_v4.model.args import CSA, HCA, WINDOW, ModelArgs  # noqa: E402
from ascend_v4.ops.reference import formats  # noqa: E402
from ascend_v4.peers.transformers_v4 import (load_transformers_model, misaligned_fp8_weights,  # noqa: E402
                                             transformers_greedy, transformers_logits)

PROMPT_LEN, NEW_TOKENS = 260, 8  # > 128 so the HCA layer has compressed entries (2 of them)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # Small shards so the index / multi-file path of from_pretrained is exercised too.
    return write_dummy_checkpoint(ModelArgs.from_preset("tiny"), tmp_path_factory.mktemp("tiny_ckpt"),
                                  seed=0, shard_bytes=16 << 20)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_transformers_model(ckpt)


def _raw(ckpt, name: str) -> torch.Tensor:
    from safetensors import safe_open

    wm = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(ckpt / wm[name]), framework="pt") as h:
        return h.get_tensor(name)


def _fp8(ckpt, name: str) -> torch.Tensor:
    w, s = _raw(ckpt, f"{name}.weight"), _raw(ckpt, f"{name}.scale")
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    return formats.dequant_fp8_block(w, s)


def _fp4(ckpt, name: str) -> torch.Tensor:
    w, s = _raw(ckpt, f"{name}.weight"), _raw(ckpt, f"{name}.scale")
    assert w.dtype == torch.int8 and s.dtype == torch.float8_e8m0fnu
    # Independent of formats.dequant_fp4: spell out nibble order and the 1x32 scale runs here.
    b = w.view(torch.uint8)
    codes = torch.stack((b & 0xF, b >> 4), -1).flatten(-2).long()
    lut = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
    scale = torch.exp2(s.view(torch.uint8).float() - 127).repeat_interleave(32, -1)
    out = lut[codes] * scale
    torch.testing.assert_close(out, formats.dequant_fp4(w, s), rtol=0, atol=0)
    return out


def test_loaded_weights_equal_independent_dequantisation(ckpt, model):
    sd = model.state_dict()
    assert all(t.dtype in (torch.float32, torch.int64) for t in sd.values())
    a = ModelArgs.from_dir(ckpt)
    inter = a.moe_inter_dim

    def same(hf: str, ref: torch.Tensor, rows: slice = slice(None), idx: int | None = None) -> None:
        got = sd[hf] if idx is None else sd[hf][idx]
        assert torch.equal(got[rows], ref.to(got.dtype)), hf

    same("model.layers.1.self_attn.q_b_proj.weight", _fp8(ckpt, "layers.1.attn.wq_b"))  # FP8 attention
    same("model.layers.2.self_attn.o_a_proj.weight", _fp8(ckpt, "layers.2.attn.wo_a"))
    same("model.layers.3.self_attn.compressor.indexer.q_b_proj.weight", _fp8(ckpt, "layers.3.attn.indexer.wq_b"))
    same("model.layers.0.mlp.shared_experts.up_proj.weight", _fp8(ckpt, "layers.0.ffn.shared_experts.w3"))
    for layer, e in ((0, 0), (2, 5), (3, a.n_routed_experts - 1)):  # FP4 routed experts, fused w1|w3
        p = f"layers.{layer}.ffn.experts.{e}"
        gu, dn = f"model.layers.{layer}.mlp.experts.gate_up_proj", f"model.layers.{layer}.mlp.experts.down_proj"
        same(gu, _fp4(ckpt, f"{p}.w1"), slice(0, inter), e)
        same(gu, _fp4(ckpt, f"{p}.w3"), slice(inter, 2 * inter), e)
        same(dn, _fp4(ckpt, f"{p}.w2"), idx=e)
    same("model.layers.0.input_layernorm.weight", _raw(ckpt, "layers.0.attn_norm.weight"))  # BF16
    same("model.layers.2.self_attn.compressor.kv_norm.weight", _raw(ckpt, "layers.2.attn.compressor.norm.weight"))
    same("lm_head.weight", _raw(ckpt, "head.weight"))
    same("model.layers.1.attn_hc.fn", _raw(ckpt, "layers.1.hc_attn_fn"))  # F32
    same("model.layers.3.mlp.gate.e_score_correction_bias", _raw(ckpt, "layers.3.ffn.gate.bias"))
    same("model.layers.1.mlp.gate.tid2eid", _raw(ckpt, "layers.1.ffn.gate.tid2eid"))  # I64


def test_convert_path_matches_from_pretrained(ckpt, model):
    assert misaligned_fp8_weights(ckpt) == []  # so "auto" used from_pretrained
    conv = load_transformers_model(ckpt, method="convert").state_dict()
    ref = model.state_dict()
    assert conv.keys() == ref.keys()
    bad = [k for k in ref if conv[k].dtype != ref[k].dtype or not torch.equal(conv[k], ref[k])]
    assert not bad, bad[:5]


def test_config_mapping(ckpt, model):
    a = ModelArgs.from_dir(ckpt)
    kind = {WINDOW: "sliding_attention", CSA: "compressed_sparse_attention", HCA: "heavily_compressed_attention"}
    cfg = model.config
    assert cfg.layer_types == [kind[k] for k in a.layer_kinds]  # trailing MTP ratio dropped
    assert cfg.mlp_layer_types == ["hash_moe" if a.is_hash_layer(i) else "moe" for i in range(a.n_layers)]
    main, comp = cfg.rope_parameters["main"], cfg.rope_parameters["compress"]
    assert main["rope_type"] == "default" and main["rope_theta"] == a.rope_theta
    assert comp["rope_type"] == "yarn" and comp["rope_theta"] == a.compress_rope_theta
    assert (comp["factor"], comp["original_max_position_embeddings"]) == (a.rope_factor, a.original_seq_len)
    assert (comp["beta_fast"], comp["beta_slow"], comp["attention_factor"]) == (a.beta_fast, a.beta_slow, 1.0)
    assert cfg.qk_rope_head_dim == a.rope_head_dim


def test_logits_finite(model):
    ids = [0, 5, 17, 1000, 129279]
    lg = transformers_logits(model, ids)
    assert lg.shape == (len(ids), model.config.vocab_size) and lg.dtype == torch.float32
    assert torch.isfinite(lg).all() and lg.std() > 0.1


def test_greedy_with_cache_equals_repeated_full_forwards(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, model.config.vocab_size, (PROMPT_LEN,), generator=g).tolist()
    steps: list[int] = []  # tokens fed per forward: the prompt once, then one per step (the cache is used)
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: steps.append(kwargs["input_ids"].shape[-1]), with_kwargs=True)
    try:
        new = transformers_greedy(model, ids, NEW_TOKENS)
    finally:
        hook.remove()
    assert len(new) == NEW_TOKENS and steps == [PROMPT_LEN] + [1] * (NEW_TOKENS - 1)

    seq, ref = list(ids), []
    with torch.no_grad():
        for step in range(NEW_TOKENS):  # no cache; after the first step only the last position hits lm_head
            if step == 0:
                last = transformers_logits(model, seq)[-1]
            else:
                last = model(input_ids=torch.tensor([seq]), use_cache=False, logits_to_keep=1).logits[0, -1]
            ref.append(int(last.argmax()))
            seq.append(ref[-1])
    assert new == ref


def test_greedy_ignores_eos(model):
    """EOS is really off, even when the model's own generation_config names the next token as EOS."""
    ids = list(range(100, 116))
    first = int(transformers_logits(model, ids)[-1].argmax())
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first
    try:
        new = transformers_greedy(model, ids, 2)
    finally:
        model.generation_config.eos_token_id = saved
    assert len(new) == 2 and new[0] == first
