"""Dummy checkpoint writer: official layout, dtypes, realistic values, determinism, sharding, streaming."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from ascend_v4.checkpoint.dummy import (DUMMY_META_KEY, generate_group, plan_shards, shard_file_name,
                                        write_dummy_checkpoint)
from ascend_v4.checkpoint.reader import INDEX_NAME, SINGLE_NAME, TORCH_DTYPES, read_checkpoint
from ascend_v4.checkpoint.spec import checkpoint_nbytes, expected_tensors
from ascend_v4.model.args import ModelArgs
from ascend_v4.ops.reference.formats import dequant_fp4, dequant_fp8_block, e8m0_to_float

SHARD_4MB = 4 << 20


@pytest.fixture(scope="module")
def args() -> ModelArgs:
    return ModelArgs.from_preset("tiny")


@pytest.fixture(scope="module")
def ckpt(args, tmp_path_factory):
    return write_dummy_checkpoint(args, tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


def _all_tensors(path) -> dict[str, torch.Tensor]:
    index = json.loads((path / INDEX_NAME).read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / fname), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_layout_and_files(args, ckpt):
    names = {p.name for p in ckpt.iterdir()}
    assert names == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     INDEX_NAME, shard_file_name(1, 1)}
    assert json.loads((ckpt / "config.json").read_text()) == args.to_hf_config()
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (0, 1)
    assert json.loads((ckpt / "tokenizer.json").read_text())["model"]  # a real tokenizer.json
    index = json.loads((ckpt / INDEX_NAME).read_text())
    specs = expected_tensors(args)
    assert list(index["weight_map"]) == list(specs)  # expected_tensors order
    assert index["metadata"]["total_size"] == checkpoint_nbytes(args)
    info = read_checkpoint(ckpt)  # validates headers and the full inventory
    assert len(info.tensors) == len(specs) and info.dummy_tag == "v1 seed=0"
    with safe_open(str(ckpt / shard_file_name(1, 1)), framework="pt") as f:
        assert f.metadata()["format"] == "pt" and DUMMY_META_KEY in f.metadata()


def test_single_file_checkpoint_without_index(ckpt, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(ckpt / "config.json", one / "config.json")
    os.symlink(ckpt / shard_file_name(1, 1), one / SINGLE_NAME)
    info = read_checkpoint(one)
    assert not info.has_index and info.tensors.keys() == read_checkpoint(ckpt).tensors.keys()


def test_dtypes_and_values_are_realistic(args, ckpt):
    specs = expected_tensors(args)
    ts = _all_tensors(ckpt)
    for name, spec in specs.items():
        assert ts[name].dtype == TORCH_DTYPES[spec.dtype], name
        assert tuple(ts[name].shape) == spec.shape, name
        if spec.kind == "scale":  # valid UE8M0: finite powers of two, never the NaN byte
            v = e8m0_to_float(ts[name])
            assert torch.isfinite(v).all() and (torch.log2(v) == torch.log2(v).round()).all(), name
    # quantised linears decode to N(0, 1/in)
    w = dequant_fp8_block(ts["layers.0.attn.wq_a.weight"], ts["layers.0.attn.wq_a.scale"])
    assert w.std().item() == pytest.approx(args.dim ** -0.5, rel=0.1)
    e = dequant_fp4(ts["layers.1.ffn.experts.3.w2.weight"], ts["layers.1.ffn.experts.3.w2.scale"])
    assert e.shape == (args.dim, args.moe_inter_dim)
    assert e.std().item() == pytest.approx(args.moe_inter_dim ** -0.5, rel=0.15)
    norm = ts["layers.2.attn_norm.weight"].float()
    assert (norm - 1).abs().max() < 0.2 and norm.std() > 0
    assert ts["embed.weight"].float().std().item() == pytest.approx(1.0, rel=0.05)
    assert ts["head.weight"].float().std().item() == pytest.approx(args.dim ** -0.5, rel=0.05)
    assert (ts["layers.3.hc_attn_scale"] - 1).abs().max() < 0.5
    assert ts["layers.3.ffn.gate.bias"].abs().max() < 0.1
    tid = ts["layers.0.ffn.gate.tid2eid"]
    assert tid.dtype == torch.int64 and tid.shape == (args.vocab_size, args.n_activated_experts)
    assert tid.min() >= 0 and tid.max() < args.n_routed_experts
    assert (tid[:, 0] != tid[:, 1]).all()  # distinct experts per token
    assert "layers.2.ffn.gate.tid2eid" not in ts and "layers.2.ffn.gate.bias" in ts  # n_hash_layers = 2


def test_determinism_sharding_progress(args, ckpt, tmp_path, capsys):
    same = write_dummy_checkpoint(args, tmp_path / "same", seed=0)
    for f in ckpt.iterdir():
        assert f.read_bytes() == (same / f.name).read_bytes(), f.name

    capsys.readouterr()
    other = write_dummy_checkpoint(args, tmp_path / "other", seed=1, shard_bytes=SHARD_4MB, progress=True)
    err = capsys.readouterr().err
    assert "100%" in err and "ETA" in err and "shard" in err
    info = read_checkpoint(other)
    plan = plan_shards(expected_tensors(args), SHARD_4MB)
    assert len(plan) > 2 and len(info.shards) == len(plan)
    index = json.loads((other / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {shard_file_name(i + 1, len(plan)) for i in range(len(plan))}
    for sh in info.shards:  # each shard holds exactly what the index says, under the size cap
        assert {n for n, f in index["weight_map"].items() if f == sh.path.name} == set(sh.tensors)
        assert len(sh.tensors) == 1 or sum(t.nbytes for t in sh.tensors.values()) <= SHARD_4MB

    a, b = _all_tensors(ckpt), _all_tensors(other)
    assert a.keys() == b.keys()
    assert not torch.equal(a["layers.0.attn.wq_a.weight"].view(torch.uint8),
                           b["layers.0.attn.wq_a.weight"].view(torch.uint8))
    assert not torch.equal(a["embed.weight"], b["embed.weight"])


def test_values_do_not_depend_on_order(args, ckpt):
    specs = expected_tensors(args)
    ts = _all_tensors(ckpt)
    # a scale asked for on its own comes from the same draw as its weight
    grp = generate_group(args, specs, "layers.3.attn.wo_b.scale", seed=0)
    assert torch.equal(grp["layers.3.attn.wo_b.scale"].view(torch.uint8),
                       ts["layers.3.attn.wo_b.scale"].view(torch.uint8))
    assert torch.equal(generate_group(args, specs, "mtp.0.attn.attn_sink", 0)["mtp.0.attn.attn_sink"],
                       ts["mtp.0.attn.attn_sink"])


def test_rewrite_invalidates_index(args, tmp_path, monkeypatch):
    out = tmp_path / "p"
    out.mkdir()
    for i in (1, 2):  # stale shards of an earlier layout
        (out / shard_file_name(i, 2)).write_bytes(b"old")
    (out / INDEX_NAME).write_text("{}")

    # A crash mid-write must leave no index (the directory must not look complete).
    import ascend_v4.checkpoint.dummy as dummy

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(dummy, "_write_shard", boom)
    with pytest.raises(RuntimeError):
        write_dummy_checkpoint(args, out)
    assert not (out / INDEX_NAME).exists()
    assert not list(out.glob("model-*.safetensors"))  # stale shards of the old layout removed
    assert (out / "config.json").is_file()
