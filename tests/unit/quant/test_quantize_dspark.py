"""`quantize()` on a tiny DSpark dummy (0731 / 0813 layout: the draft stages under `mtp.*`), every format.

The stages' attention and experts follow the main layers' recipe; `mtp.0.main_proj` is a float projection like
April's `e_proj` / `h_proj` (BF16 where the format drops FP8); the Markov and confidence heads stay BF16, byte for
byte; ascendV1 outputs carry no April-style embedding / head copies (quant/ascend_v1.py). Each output is read back
against the inventory and checked by `verify_conversion`. Loading into the model is the model's tests' business.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from ascend_v4.checkpoint.reader import read_checkpoint
from ascend_v4.quant.recipes import OUTPUT_FORMATS
from ascend_v4.quant.verify import verify_conversion

SHARD_BYTES = 4 << 20  # as conftest.py's tiny source: several shards
HEADS = ("mtp.2.markov_head.markov_w1.weight", "mtp.2.markov_head.markov_w2.weight",
         "mtp.2.confidence_head.proj.weight")
# main_proj's stored format per output format (None: the official FP8 block format, untouched)
MAIN_PROJ = {"w8a8": "bf16", "w4a8": "bf16", "bf16": "bf16", "fp8-experts": None, "native": None}


@pytest.fixture(scope="module")
def dspark_info(tmp_path_factory):
    from ascend_v4.checkpoint.dummy import write_dummy_checkpoint
    from ascend_v4.model.args import ModelArgs

    src = write_dummy_checkpoint(ModelArgs.from_preset("tiny-dspark"), tmp_path_factory.mktemp("dspark_src"),
                                 shard_bytes=SHARD_BYTES)
    return read_checkpoint(src)


def _get(path, index_name, name):
    wm = json.loads((path / index_name).read_text())["weight_map"]
    with safe_open(str(path / wm[name]), framework="pt") as f:
        return f.get_tensor(name)


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_dspark_converts_in_every_format(fmt, dspark_info, tmp_path):
    from ascend_v4.quant.tool import quantize

    src = dspark_info
    out = tmp_path / fmt
    quantize(src, out, fmt, workers=2, read_baseline="off")
    info = read_checkpoint(out)  # every stage tensor present, in the format the manifest records
    assert info.conversion["format"] == fmt
    n_src = sum(n.startswith("mtp.") for n in src.tensors)
    assert n_src == 241
    stages = {n for n in info.tensors if n.startswith("mtp.")}
    assert {n.split(".")[1] for n in stages} == {"0", "1", "2"}
    assert info.linear_formats.get("mtp.0.main_proj") == MAIN_PROJ[fmt]
    if fmt in ("w8a8", "w4a8"):  # the stages' attention projections and experts as in the main layers
        assert info.linear_formats["mtp.1.attn.wq_a"] == info.linear_formats["layers.1.attn.wq_a"] == "int8_channel"
        assert info.linear_formats["mtp.2.ffn.experts.3.w2"] == info.linear_formats["layers.1.ffn.experts.3.w2"]
        assert info.linear_formats["mtp.0.attn.wo_a"] == "bf16"
    rep = verify_conversion(src, out)
    assert rep.ok
    if MAIN_PROJ[fmt]:
        assert rep.kinds["mtp.main_proj"].max_rel == 0  # FP8 -> BF16 is exact
    else:
        assert "mtp.main_proj" not in rep.kinds
    for name in HEADS:  # BF16 in, BF16 out, same bytes
        a = _get(src.path, "model.safetensors.index.json", name)
        b = _get(out, info.conversion["index"], name)
        assert b.dtype == torch.bfloat16 and torch.equal(a, b), name
    if fmt in ("w8a8", "w4a8"):
        desc = json.loads((out / "quant_model_description.json").read_text())
        for name in (*HEADS, "mtp.0.main_proj.weight", "mtp.0.main_norm.weight", "mtp.2.hc_head_fn"):
            assert desc[name] == "FLOAT", name
        assert desc["mtp.1.attn.wkv.weight"] == "W8A8_DYNAMIC"
        # no msModelSlim MTP copies of embed / head for DSpark stages (vllm-ascend's DSpark loader rejects them)
        assert not any(n.endswith(("emb.tok_emb.weight", ".head.weight")) for n in info.tensors)
        assert len(desc) == len(info.tensors) + 5


def test_dspark_ep_split_places_the_stage_experts(dspark_info, tmp_path):
    from ascend_v4.quant.manifest import load_rank_experts
    from ascend_v4.quant.tool import quantize

    out = tmp_path / "native-ep2"
    quantize(dspark_info, out, "native", ep=2, workers=2, read_baseline="off")
    for r in range(2):
        rf = load_rank_experts(out, r, 2)
        mine = {n for n in rf.tensors if n.startswith("mtp.") and ".ffn.experts." in n}
        assert {int(n.split(".")[4]) for n in mine} == set(range(4 * r, 4 * r + 4))
        assert {n.split(".")[1] for n in mine} == {"0", "1", "2"}
        assert "mtp.2.markov_head.markov_w1.weight" in rf.tensors  # shared tensors: every rank
