"""`ModelArgs.from_hf_config` / `from_dir`: every config.json key is checked for presence, type and range, and the
`ConfigError` names the key, the rule and the value found (no TypeError / bare `int()` message ever escapes)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ascend_v4.model.args import ConfigError, ModelArgs, preset_names

REQUIRED = ["num_hidden_layers", "vocab_size", "hidden_size", "num_attention_heads", "q_lora_rank", "o_groups",
            "o_lora_rank", "compress_ratios", "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
            "num_experts_per_tok", "moe_intermediate_size", "routed_scaling_factor"]
POSITIVE_INTS = REQUIRED[:2] + ["hidden_size", "num_attention_heads", "q_lora_rank", "o_groups", "o_lora_rank",
                                "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
                                "num_experts_per_tok", "moe_intermediate_size", "head_dim", "qk_rope_head_dim",
                                "sliding_window", "max_position_embeddings", "n_shared_experts", "hc_mult",
                                "hc_sinkhorn_iters", "num_key_value_heads"]
NON_NEGATIVE_INTS = ["num_nextn_predict_layers", "num_hash_layers", "bos_token_id", "eos_token_id"]
POSITIVE_NUMBERS = ["rms_norm_eps", "rope_theta", "compress_rope_theta", "routed_scaling_factor", "swiglu_limit",
                    "hc_eps"]
STRINGS = ["scoring_func", "expert_dtype"]


@pytest.fixture
def cfg() -> dict:
    return ModelArgs.from_preset("tiny").to_hf_config()


def _error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as ei:
        ModelArgs.from_hf_config(cfg, name="t")
    return str(ei.value)


@pytest.mark.parametrize("name", preset_names())
def test_presets_still_valid(name):
    args = ModelArgs.from_preset(name)
    assert ModelArgs.from_hf_config(args.to_hf_config(), name=name) == args
    assert all(type(v) is int for v in args.compress_ratios) and type(args.rope_factor) is float


def test_message_format(cfg):
    assert _error(cfg | {"hidden_size": "large"}) == \
        """config of t: "hidden_size" must be a positive integer, got 'large' (str)"""
    assert _error(cfg | {"n_routed_experts": None}) == \
        """config of t: "n_routed_experts" must be a positive integer, got null"""


@pytest.mark.parametrize("key", REQUIRED)
def test_required_key_missing(cfg, key):
    del cfg[key]
    assert f'required key "{key}" is missing' in _error(cfg)


@pytest.mark.parametrize("bad", [None, "large", "4", True, False, [4], {"n": 4}, 2.5, -3, 0])
@pytest.mark.parametrize("key", POSITIVE_INTS)
def test_positive_int_keys(cfg, key, bad):
    msg = _error(cfg | {key: bad})
    assert f'"{key}" must be a positive integer, got {"null" if bad is None else repr(bad)}' in msg


@pytest.mark.parametrize("bad", [None, "0", True, [1], 0.5, -1])
@pytest.mark.parametrize("key", NON_NEGATIVE_INTS)
def test_non_negative_int_keys(cfg, key, bad):
    msg = _error(cfg | {key: bad})
    assert f'"{key}"' in msg and "integer" in msg and ("null" if bad is None else repr(bad)) in msg


@pytest.mark.parametrize("bad", [None, "1e-6", True, [1.0], 0, -1.5, float("nan"), float("inf")])
@pytest.mark.parametrize("key", POSITIVE_NUMBERS)
def test_positive_number_keys(cfg, key, bad):
    msg = _error(cfg | {key: bad})
    assert f'"{key}" must be a positive number, got ' in msg


@pytest.mark.parametrize("bad", [None, 4, ["fp4"], True])
@pytest.mark.parametrize("key", STRINGS)
def test_string_keys(cfg, key, bad):
    assert f'"{key}" must be a string' in _error(cfg | {key: bad})


def test_token_ids_within_vocab(cfg):
    assert '"eos_token_id" must be an integer in [0, 129279], got 129280' in _error(cfg | {"eos_token_id": 129280})
    assert '"num_hash_layers" must be an integer in [0, 4], got 5' in _error(cfg | {"num_hash_layers": 5})


@pytest.mark.parametrize("bad, item", [(4, None), ("0,4", None), (None, None), ({"0": 4}, None),
                                       ([0, 4, "128", 4, 0], "item 2 is '128' (str)"),
                                       ([0, 4, 128, True, 0], "item 3 is True (bool)"),
                                       ([0, None, 128, 4, 0], "item 1 is null"),
                                       ([0, 4, 128, 4, -4], "item 4 is -4 (int)"),
                                       ([0, 4.5, 128, 4, 0], "item 1 is 4.5 (float)")])
def test_compress_ratios_must_be_a_list_of_ints(cfg, bad, item):
    msg = _error(cfg | {"compress_ratios": bad})
    assert '"compress_ratios" must be a list of non-negative integers' in msg
    assert item is None or msg.endswith(item)


def test_semantic_checks_kept(cfg):
    assert "DeepSeek-V4 uses only 0, 4 and 128" in _error(cfg | {"compress_ratios": [0, 4, 128, 4, 5]})
    assert "need n_layers + MTP/DSpark blocks = 5" in _error(cfg | {"compress_ratios": [0, 4]})
    assert "V4 has exactly one" in _error(cfg | {"n_shared_experts": 2})
    assert "num_key_value_heads must be 1" in _error(cfg | {"num_key_value_heads": 8})
    assert "more activated than routed" in _error(cfg | {"num_experts_per_tok": 9})
    assert "model_type is 'deepseek_v41'" in _error(cfg | {"model_type": "deepseek_v41"})


@pytest.mark.parametrize("key", ["rope_scaling", "quantization_config"])
@pytest.mark.parametrize("bad", [[1], "yarn", 16, True])
def test_nested_objects(cfg, key, bad):
    assert f'"{key}" must be a JSON object' in _error(cfg | {key: bad})


@pytest.mark.parametrize("sub, bad, rule", [("factor", "16", "a positive number"), ("factor", 0, "a positive number"),
                                            ("original_max_position_embeddings", [65536], "a non-negative integer"),
                                            ("beta_fast", None, "a positive integer"),
                                            ("beta_slow", 1.5, "a positive integer")])
def test_rope_scaling_keys(cfg, sub, bad, rule):
    cfg["rope_scaling"] = cfg["rope_scaling"] | {sub: bad}
    assert f'"rope_scaling.{sub}" must be {rule}' in _error(cfg)


def test_quantization_config_keys(cfg):
    qc = cfg["quantization_config"]
    assert '"quantization_config.weight_block_size" must be a list of non-negative integers, got 128 (int)' in \
        _error(cfg | {"quantization_config": qc | {"weight_block_size": 128}})
    assert "weight_block_size [64, 64] is not [128, 128]" in \
        _error(cfg | {"quantization_config": qc | {"weight_block_size": [64, 64]}})
    del cfg["expert_dtype"]
    assert '"quantization_config.expert_dtype" must be a string' in \
        _error(cfg | {"quantization_config": qc | {"expert_dtype": 4}})
    assert ModelArgs.from_hf_config(cfg | {"quantization_config": qc | {"expert_dtype": "fp8"}}).expert_dtype == "fp8"


def test_null_or_absent_nested_objects_mean_defaults(cfg):
    base = ModelArgs.from_hf_config(cfg)
    for key in ("rope_scaling", "quantization_config"):
        for variant in ({key: None}, {k: v for k, v in cfg.items() if k != key}):
            args = ModelArgs.from_hf_config(cfg | variant if key in variant else variant)
            if key == "rope_scaling":
                assert (args.rope_factor, args.original_seq_len, args.beta_fast) == (1.0, 0, 32)
            else:
                assert dataclasses.replace(args, hf_config={}) == dataclasses.replace(base, hf_config={})


def test_integral_floats_are_accepted_as_ints(cfg):
    # Documented choice: some JSON writers emit 4.0 for 4; a float with a fractional part is rejected.
    args = ModelArgs.from_hf_config(cfg | {"num_hidden_layers": 4.0, "compress_ratios": [0, 4.0, 128, 4, 0]})
    assert args == ModelArgs.from_hf_config(cfg)
    assert type(args.n_layers) is int and all(type(r) is int for r in args.compress_ratios)


@pytest.mark.parametrize("top", [[], [{"model_type": "deepseek_v4"}], "deepseek_v4", 4, None])
def test_top_level_must_be_an_object(top):
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        ModelArgs.from_hf_config(top)


# ------------------------------------------------------------------------------------------ from_dir
def test_from_dir_names_the_file(tmp_path, cfg):
    p = tmp_path / "config.json"
    p.write_text(json.dumps([cfg]))
    with pytest.raises(ConfigError, match="top level must be a JSON object") as ei:
        ModelArgs.from_dir(tmp_path)
    assert str(ei.value).startswith(f"{p}: ")
    p.write_text(json.dumps(cfg | {"compress_ratios": 4}))
    with pytest.raises(ConfigError, match=f'^{p}: "compress_ratios" must be a list'):
        ModelArgs.from_dir(tmp_path)
    p.write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ConfigError, match="not valid JSON .*UTF-8"):
        ModelArgs.from_dir(tmp_path)
    p.write_text(json.dumps(cfg))
    assert dataclasses.replace(ModelArgs.from_dir(tmp_path), name="tiny") == ModelArgs.from_preset("tiny")


@pytest.mark.parametrize("exc", [PermissionError(13, "Permission denied"), OSError(5, "Input/output error"),
                                 IsADirectoryError(21, "Is a directory")])
def test_from_dir_unreadable_file(tmp_path, cfg, monkeypatch, exc):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    real = Path.read_text

    def read_text(self, *a, **kw):
        if self.name == "config.json":
            raise type(exc)(exc.errno, exc.strerror, str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(ConfigError) as ei:
        ModelArgs.from_dir(tmp_path)
    assert str(ei.value) == f"{tmp_path / 'config.json'}: cannot read: {exc.strerror}"
    assert isinstance(ei.value.__cause__, OSError)


def test_dspark_config_checks():
    cfg = ModelArgs.from_preset("tiny-dspark").to_hf_config()
    a = ModelArgs.from_hf_config(cfg, name="t")
    assert (a.n_mtp_layers, a.n_dspark_stages, a.n_draft_layers, a.dspark_target_layer_ids) == (0, 3, 3, (1, 2, 3))
    assert "must name distinct main layers 0..3" in _error(cfg | {"dspark_target_layer_ids": [1, 4]})
    assert "must name distinct main layers" in _error(cfg | {"dspark_target_layer_ids": [2, 2, 3]})
    assert "DSpark stages are window-only" in _error(cfg | {"compress_ratios": [0, 4, 128, 4, 0, 4, 0]})
    assert "one compress_ratios entry per draft stage" in _error(cfg | {"compress_ratios": [0, 4, 128, 4]})
    assert "dspark_noise_token_id 129280 is outside the vocabulary" in _error(cfg | {"dspark_noise_token_id": 129280})
    assert '"dspark_markov_rank" must be a positive integer' in _error(cfg | {"dspark_markov_rank": 0})
