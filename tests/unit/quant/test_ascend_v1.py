"""msModelSlim ascendV1 rules (`ascend_v4.quant.ascend_v1`) and the w8a8 / w4a8 outputs against them.

Two kinds of expectations: the module's own functions, and literals read off the sources the module cites
(msModelSlim `AscendV1Saver`, `get_mtp_layer`, `remove_quantization_config`; vllm-ascend's V4 MTP loader), so
a wrong rule in the module fails here too.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ascend_v4.checkpoint.errors import CheckpointError
from ascend_v4.checkpoint.reader import INDEX_NAME, QUANT_INDEX_NAME, read_checkpoint
from ascend_v4.checkpoint.spec import expected_tensors
from ascend_v4.quant import ascend_v1

COPIES_MTP0 = {"mtp.0.emb.tok_emb.weight": "embed.weight", "mtp.0.head.weight": "head.weight"}
# msmodelslim/core/quant_service/modelslim_v1/save/ascendv1.py, AscendV1Saver.QUANT_TYPE_PRIORITY
SOURCE_PRIORITY = ("FLOAT", "W16A16S", "W8A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8", "WFP8AFP8_DYNAMIC",
                   "W8A8_MXFP8", "W4A8_MXFP", "W4A4_DYNAMIC", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE",
                   "W4A4_MXFP4_SVD")
# AscendV1Saver.post_run, after the per-tensor entries
SOURCE_TAIL = {"version": "1.0.0", "model_quant_type": "W8A8_DYNAMIC", "metadata": {}, "group_size": 0,
               "optional": {}}


# ---------------------------------------------------------------------------------------------- unit: MTP copies
def test_mtp_copy_names():
    assert ascend_v1.mtp_copy_names(1) == COPIES_MTP0
    assert list(ascend_v1.mtp_copy_names(1)) == ["mtp.0.emb.tok_emb.weight", "mtp.0.head.weight"]
    assert ascend_v1.mtp_copy_names(0) == {}
    assert ascend_v1.mtp_copy_names(2) == {**COPIES_MTP0, "mtp.1.emb.tok_emb.weight": "embed.weight",
                                            "mtp.1.head.weight": "head.weight"}


def test_shared_copies():
    names = {"embed.weight", "head.weight", "norm.weight", "mtp.0.norm.weight", "mtp.0.e_proj.weight"}
    assert ascend_v1.shared_copies(names, 1) == [("mtp.0.emb.tok_emb.weight", "embed.weight"),
                                                 ("mtp.0.head.weight", "head.weight")]
    assert ascend_v1.shared_copies(names, 0) == []
    assert ascend_v1.shared_copies(names - {"head.weight"}, 1) == [("mtp.0.emb.tok_emb.weight", "embed.weight")]
    # already there (e.g. an msModelSlim output used as the source): not duplicated again
    assert ascend_v1.shared_copies(names | {"mtp.0.head.weight"}, 1) == [("mtp.0.emb.tok_emb.weight",
                                                                         "embed.weight")]


@pytest.mark.parametrize("name,yes", [
    ("mtp.0.head.weight", True), ("mtp.0.emb.tok_emb.weight", True), ("mtp.12.head.weight", True),
    ("head.weight", False), ("embed.weight", False), ("mtp.0.hc_head_fn", False), ("mtp.0.norm.weight", False),
    ("mtp.0.head.weight_scale", False), ("layers.0.head.weight", False), ("mtp.0.emb.weight", False),
])
def test_is_shared_copy(name, yes):
    assert ascend_v1.is_shared_copy(name) is yes


# ---------------------------------------------------------------------------------------------- unit: description
def test_priority_table_matches_source():
    assert ascend_v1.QUANT_TYPE_PRIORITY == SOURCE_PRIORITY
    assert "W4A8_DYNAMIC" not in ascend_v1.QUANT_TYPE_PRIORITY


@pytest.mark.parametrize("types,want", [
    (["FLOAT", "W8A8_DYNAMIC"], "W8A8_DYNAMIC"),  # w8a8
    (["FLOAT", "W4A8_DYNAMIC", "W8A8_DYNAMIC"], "W8A8_DYNAMIC"),  # w4a8: W4A8_DYNAMIC is hidden
    (["W4A8_DYNAMIC", "FLOAT"], "FLOAT"),
    (["W4A8_DYNAMIC"], "Unknown"),
    ([], "Unknown"),
    (["W8A8_DYNAMIC", "W8A8"], "W8A8"),  # static W8A8 outranks dynamic (same bits)
    (["W8A8", "W4A4_DYNAMIC", "FLOAT"], "W4A4_DYNAMIC"),  # fewer bits outrank more
    (["C8", "FAQuant", "FLOAT"], "FLOAT"),  # unranked types never count
])
def test_model_quant_type(types, want):
    assert ascend_v1.model_quant_type(types) == want
    assert ascend_v1.model_quant_type(reversed(types)) == want  # order-free


def test_recipe_model_quant_type():
    assert ascend_v1.recipe_model_quant_type("w8a8") == "W8A8_DYNAMIC"
    assert ascend_v1.recipe_model_quant_type("w4a8") == "W8A8_DYNAMIC"
    assert ascend_v1.recipe_model_quant_type("bf16") == "FLOAT"


def test_description_w4a8():
    per = {"layers.0.attn.wq_a.weight": "W8A8_DYNAMIC", "layers.0.ffn.experts.0.w1.weight": "W4A8_DYNAMIC",
           "layers.0.attn.wo_a.weight": "FLOAT", "mtp.0.head.weight": "FLOAT", "embed.weight": "FLOAT"}
    d = ascend_v1.description(per, "w4a8")
    assert d == {**per, **SOURCE_TAIL}
    assert list(d) == list(per) + ["version", "model_quant_type", "metadata", "group_size", "optional"]
    assert list(d)[-5:] == list(ascend_v1.HEADER_KEYS)
    d["metadata"]["x"] = 1  # fresh objects each call
    assert ascend_v1.description(per, "w4a8")["metadata"] == {}


def test_description_w8a8_and_errors():
    d = ascend_v1.description({"a.weight": "W8A8_DYNAMIC", "b.weight": "FLOAT"}, "w8a8")
    assert d["model_quant_type"] == "W8A8_DYNAMIC" and d["group_size"] == 0 and d["version"] == "1.0.0"
    for fmt in ("bf16", "native", "fp8-experts", "nope"):
        with pytest.raises(ValueError):
            ascend_v1.description({"a.weight": "FLOAT"}, fmt)
    with pytest.raises(ValueError, match="version"):
        ascend_v1.description({"version": "FLOAT"}, "w8a8")


# ---------------------------------------------------------------------------------------------- unit: config
SRC_CFG = {"architectures": ["DeepseekV4ForCausalLM"], "hidden_size": 4096,
           "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
           "text_config": {"quantization_config": {"quant_method": "fp8"}, "keep": 1}}


@pytest.mark.parametrize("fmt", ["w8a8", "w4a8"])
def test_adjust_config_ascend_v1(fmt):
    src = json.loads(json.dumps(SRC_CFG))
    cfg = ascend_v1.adjust_config(src, fmt)
    # remove_quantization_config: top level and text_config; DeepSeekV4ModelAdapter adds nothing
    assert cfg == {"architectures": ["DeepseekV4ForCausalLM"], "hidden_size": 4096, "text_config": {"keep": 1}}
    assert src == SRC_CFG  # not modified
    assert "quantize" not in cfg
    mindie = ascend_v1.adjust_config(src, fmt, mindie=True)
    want = {"quantize": "w8a8_dynamic"} | ({"moe_quantize": "w4a8_dynamic"} if fmt == "w4a8" else {})
    assert mindie == cfg | want
    assert mindie["quantize"] != "w8a8"  # "w8a8" is MindIE's static W8A8 (input_scale / deq_scale tensors)


def test_adjust_config_other_formats():
    assert ascend_v1.adjust_config(SRC_CFG, "native") == SRC_CFG
    assert ascend_v1.adjust_config(SRC_CFG, "fp8-experts") == SRC_CFG | {"expert_dtype": "fp8"}
    assert ascend_v1.adjust_config(SRC_CFG, "bf16") == {"architectures": ["DeepseekV4ForCausalLM"],
                                                        "hidden_size": 4096, "text_config": {"keep": 1}}
    assert "quantize" not in ascend_v1.adjust_config(SRC_CFG, "bf16", mindie=True)


# ---------------------------------------------------------------------------------------------- unit: inventory
def test_expected_tensors_shared_copies(tiny_info):
    a = tiny_info.args
    base = expected_tensors(a)
    inv = expected_tensors(a, shared_copies=True)
    assert list(inv)[:len(base)] == list(base) and list(inv)[len(base):] == list(COPIES_MTP0)
    for dst, src in COPIES_MTP0.items():
        assert inv[dst] == base[src]
        assert inv[dst].dtype == "BF16" and inv[dst].shape == (a.vocab_size, a.dim)
    assert expected_tensors(a, include_mtp=False, shared_copies=True) == expected_tensors(a, include_mtp=False)
    lf = {"layers.0.attn.wq_a": "int8_channel"}
    assert set(expected_tensors(a, linear_formats=lf, shared_copies=True)) - set(
        expected_tensors(a, linear_formats=lf)) == set(COPIES_MTP0)


def _with_copies(out: Path, dst: Path, names: list[str]) -> Path:
    """A converted directory without MTP copies (`native`: never has them), seen through symlinks, plus one
    extra shard holding `names` copied from its own embed / head the way msModelSlim does."""
    dst.mkdir()
    for p in out.iterdir():
        if p.name != INDEX_NAME:
            (dst / p.name).symlink_to(p)
    index = json.loads((out / INDEX_NAME).read_text())
    assert not any(ascend_v1.is_shared_copy(n) for n in index["weight_map"])
    tensors = {}
    for n in names:
        src = COPIES_MTP0[n]
        with safe_open(out / index["weight_map"][src], "pt") as f:
            tensors[n] = f.get_tensor(src)
    save_file(tensors, dst / "model-copies.safetensors")
    index["weight_map"].update({n: "model-copies.safetensors" for n in names})
    (dst / INDEX_NAME).write_text(json.dumps(index))
    return dst


def test_reader_accepts_mtp_copies(converted, tmp_path):
    d = _with_copies(converted("native"), tmp_path / "all", list(COPIES_MTP0))
    info = read_checkpoint(d)
    assert set(COPIES_MTP0) <= set(info.tensors)
    info_no_mtp = read_checkpoint(d, include_mtp=False)  # ignored with the rest of mtp.*
    assert info_no_mtp.tensors.keys() == info.tensors.keys()
    # all or none: one copy without the other is reported
    part = _with_copies(converted("native"), tmp_path / "part", ["mtp.0.head.weight"])
    with pytest.raises(CheckpointError, match=r"mtp\.0\.emb\.tok_emb\.weight: missing"):
        read_checkpoint(part)


def test_loader_skips_mtp_copies(converted, tmp_path):
    from ascend_v4.checkpoint.loader import load_checkpoint
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.transformer import Transformer

    d = _with_copies(converted("native"), tmp_path / "all", list(COPIES_MTP0))
    info = read_checkpoint(d)
    with torch.device("meta"):
        model = Transformer(info.args, ModelOptions(dtype=torch.float32))
    rep = load_checkpoint(model, d, args=info.args)
    assert rep.skipped == 2 and rep.tensors == len(info.tensors) - 2


# ---------------------------------------------------------------------------------------------- end to end
def _out(out: Path) -> tuple[dict, dict, dict]:
    """(weight_map, description, {name: (dtype, shape, file, begin, end)}) of a converted directory."""
    wm = json.loads((out / QUANT_INDEX_NAME).read_text())["weight_map"]
    desc = json.loads((out / "quant_model_description.json").read_text())
    hdr = read_checkpoint(out, check_spec=False).tensors  # headers and index only, no inventory check
    return wm, desc, hdr


def _bytes(root: Path, e) -> bytes:
    with open(root / e.file, "rb") as f:
        f.seek(e.begin)
        return f.read(e.end - e.begin)


@pytest.mark.parametrize("fmt", ["w8a8", "w4a8"])
def test_e2e_mtp_copies(fmt, converted, tiny_src, tiny_info):
    out = converted(fmt)
    wm, desc, hdr = _out(out)
    a = tiny_info.args
    for dst, src in COPIES_MTP0.items():  # get_mtp_layer: mtp.0.emb.tok_emb <- embed, mtp.0.head <- head
        assert dst in wm, dst
        e = hdr[dst]
        assert (e.dtype, tuple(e.shape)) == ("BF16", (a.vocab_size, a.dim))
        assert desc[dst] == "FLOAT"
        got = _bytes(out, e)
        assert got == _bytes(out, hdr[src]) == _bytes(tiny_src, tiny_info.tensors[src])


@pytest.mark.parametrize("fmt", ["w8a8", "w4a8"])
def test_e2e_description(fmt, converted):
    wm, desc, _ = _out(converted(fmt))
    keys = list(desc)
    assert keys[-5:] == ["version", "model_quant_type", "metadata", "group_size", "optional"]
    per = {k: desc[k] for k in keys[:-5]}
    assert set(per) == set(wm)  # every tensor, nothing else
    assert {k: desc[k] for k in keys[-5:]} == SOURCE_TAIL  # W8A8_DYNAMIC for w4a8 too
    assert desc == ascend_v1.description(per, fmt)
    assert set(per.values()) == {"FLOAT", "W8A8_DYNAMIC"} | ({"W4A8_DYNAMIC"} if fmt == "w4a8" else set())


@pytest.mark.parametrize("fmt", ["w8a8", "w4a8"])
def test_e2e_inventory(fmt, converted):
    out = converted(fmt)
    wm, _, hdr = _out(out)
    info = read_checkpoint(out)
    inv = expected_tensors(info.args, linear_formats=info.linear_formats, shared_copies=True)
    assert set(wm) == set(hdr) == set(inv) == set(info.tensors)
    for n, s in inv.items():
        assert (hdr[n].dtype, tuple(hdr[n].shape)) == (s.dtype, s.shape), n


@pytest.mark.parametrize("fmt", ["w8a8", "w4a8"])
def test_e2e_linear_layouts(fmt, converted, tiny_info):
    """Per-linear tensors as `AscendV1Saver.on_w8a8_dynamic_per_channel` / `on_w4a8_dynamic` write them."""
    _, desc, hdr = _out(converted(fmt))
    a = tiny_info.args

    def check(base: str, qt: str, rows: int, cols: int, bias_cols: int | None = None) -> None:
        want = {"weight": ("I8", (rows, cols)), "weight_scale": ("F32", (a_out, 1)),
                "weight_offset": ("F32", (a_out, 1))}
        if bias_cols is not None:
            want["scale_bias"] = ("F32", (a_out, bias_cols))
        for sfx, (dt, shape) in want.items():
            e = hdr[f"{base}.{sfx}"]
            assert (e.dtype, tuple(e.shape)) == (dt, shape), f"{base}.{sfx}"
            assert desc[f"{base}.{sfx}"] == qt
        assert f"{base}.scale" not in hdr

    a_out = a.q_lora_rank
    check("layers.0.attn.wq_a", "W8A8_DYNAMIC", a.q_lora_rank, a.dim)
    a_out = a.moe_inter_dim
    check("layers.0.ffn.shared_experts.w1", "W8A8_DYNAMIC", a.moe_inter_dim, a.dim)
    if fmt == "w8a8":
        check("layers.1.ffn.experts.3.w1", "W8A8_DYNAMIC", a.moe_inter_dim, a.dim)
    else:  # int4 packed two per byte along the output dim; scale_bias [out, 1] (w1/w3), [out, 16] (w2)
        check("layers.1.ffn.experts.3.w1", "W4A8_DYNAMIC", a.moe_inter_dim // 2, a.dim, 1)
        a_out = a.dim
        check("layers.1.ffn.experts.3.w2", "W4A8_DYNAMIC", a.dim // 2, a.moe_inter_dim, 16)
    for n in ("layers.0.attn.wo_a.weight", "mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "head.weight"):
        assert hdr[n].dtype == "BF16" and desc[n] == "FLOAT", n


@pytest.mark.parametrize("fmt", ["w8a8", "w4a8"])
def test_e2e_config(fmt, converted, tiny_src):
    src = json.loads((tiny_src / "config.json").read_text())
    cfg = json.loads((converted(fmt) / "config.json").read_text())
    assert cfg == ascend_v1.adjust_config(src, fmt)
    assert "quantization_config" not in cfg and "quantize" not in cfg  # as msModelSlim's V4 output


def test_cli_mindie_config(tiny_src, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["ascend-v4", "quantize", "-m", str(tiny_src), "-o", str(out), "-f", "w4a8", "--mindie-config",
                        "--read-baseline", "off"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantize"] == "w8a8_dynamic" and cfg["moe_quantize"] == "w4a8_dynamic"  # copy_config_files.py rule


def test_cli_mindie_config_needs_an_ascend_v1_format(tiny_src, tmp_path):
    r = subprocess.run(["ascend-v4", "quantize", "-m", str(tiny_src), "-o", str(tmp_path / "out"), "-f", "bf16",
                        "--mindie-config"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--mindie-config" in r.stderr and "bf16" in r.stderr and not (tmp_path / "out").exists()
