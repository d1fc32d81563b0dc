"""Loading a dummy checkpoint into a meta-built module whose names mirror the checkpoint keys."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ascend_v4.checkpoint.dummy import write_dummy_checkpoint
from ascend_v4.checkpoint.errors import CheckpointError
from ascend_v4.checkpoint.loader import load_checkpoint
from ascend_v4.checkpoint.reader import INDEX_NAME, TORCH_DTYPES, read_checkpoint
from ascend_v4.checkpoint.spec import TensorSpec, expected_tensors
from ascend_v4.model.args import ModelArgs
from ascend_v4.ops.reference.formats import e8m0_to_float


def build_meta_module(specs: dict[str, TensorSpec], *, bf16_as: torch.dtype = torch.float32,
                      overrides: dict[str, torch.dtype] | None = None) -> nn.Module:
    """An nn.Module tree on `meta` whose parameter/buffer names are exactly the spec names.

    Dtypes from the spec, BF16 declared as `bf16_as`; I64 tensors become buffers (to exercise both paths).
    """
    root = nn.Module()
    overrides = overrides or {}
    for name, spec in specs.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, nn.Module())
            mod = mod._modules[part]
        dtype = overrides.get(name, bf16_as if spec.dtype == "BF16" else TORCH_DTYPES[spec.dtype])
        t = torch.empty(spec.shape, dtype=dtype, device="meta")
        if spec.dtype == "I64":
            mod.register_buffer(leaf, t)
        else:
            mod.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
    return root


@pytest.fixture(scope="module")
def args() -> ModelArgs:
    return ModelArgs.from_preset("tiny")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _shared_tiny(tmp_path_factory)


def test_round_trip(args, ckpt, capsys):
    specs = expected_tensors(args)
    model = build_meta_module(specs)
    rep = load_checkpoint(model, ckpt, progress=True)
    assert "100%" in capsys.readouterr().err
    gc.collect()
    if os.path.exists("/proc/self/maps"):  # every tensor was copied: no shard stays mapped
        assert str(ckpt) not in open("/proc/self/maps").read()
    info = read_checkpoint(ckpt)
    assert rep.tensors == len(specs) and rep.bytes == info.total_bytes and rep.skipped == 0
    assert rep.shards == len(info.shards) > 1
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    assert set(state) == set(specs)
    for sh in info.shards:
        with safe_open(str(sh.path), framework="pt") as f:
            for name in f.keys():
                got, ref = state[name], f.get_tensor(name)
                assert not got.is_meta and got.shape == ref.shape, name
                if specs[name].dtype == "BF16":
                    assert got.dtype == torch.float32 and torch.equal(got, ref.float()), name
                else:  # packed dtypes kept bit for bit
                    assert got.dtype == ref.dtype, name
                    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), name
    assert isinstance(model.get_submodule("layers.0.attn.wq_a").weight, nn.Parameter)
    assert model.get_submodule("layers.0.attn.wq_a").weight.dtype == torch.float8_e4m3fn
    assert model.get_submodule("layers.0.ffn.experts.0.w1").weight.dtype == torch.int8
    assert model.get_submodule("layers.0.ffn.gate").tid2eid.dtype == torch.int64
    assert "layers.0.ffn.gate.tid2eid" in dict(model.named_buffers())
    scale = e8m0_to_float(model.get_submodule("layers.1.attn.wo_a").scale)
    assert (torch.log2(scale) == torch.log2(scale).round()).all()
    assert not model.get_submodule("layers.0.attn.wq_a").weight.requires_grad


class _WithPostLoad(nn.Module):
    def post_load(self) -> None:
        self.post_loaded = True


def test_dtype_rules_and_post_load(args, ckpt):
    specs = expected_tensors(args)
    expert = "layers.0.ffn.experts.1.w3.weight"
    over = {"layers.0.attn.attn_sink": torch.bfloat16, expert: torch.float4_e2m1fn_x2}
    model = build_meta_module(specs, bf16_as=torch.bfloat16, overrides=over)
    model.__class__ = type("M", (_WithPostLoad,), {})  # give the root a post_load
    load_checkpoint(model, ckpt)
    assert model.post_loaded
    state = dict(model.named_parameters())
    assert state["embed.weight"].dtype == torch.bfloat16  # BF16 kept
    assert state["layers.0.attn.attn_sink"].dtype == torch.bfloat16  # F32 cast because the model says so
    with safe_open(str(ckpt / read_checkpoint(ckpt).tensors[expert].file), "pt") as f:
        ref = f.get_tensor(expert)
    assert state[expert].dtype == torch.float4_e2m1fn_x2  # I8 viewed, never converted
    assert torch.equal(state[expert].view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("name, dtype", [("layers.0.attn.wq_a.weight", torch.bfloat16),  # FP8 never converted
                                         ("layers.0.attn.wq_a.scale", torch.float32),
                                         ("layers.0.ffn.gate.tid2eid", torch.int32)])
def test_wrong_model_dtype(args, ckpt, name, dtype):
    model = build_meta_module(expected_tensors(args), overrides={name: dtype})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as ei:
        load_checkpoint(model, ckpt)
    assert "cannot be loaded into model dtype" in str(ei.value)


def test_model_mismatch(args, ckpt):
    specs = dict(expected_tensors(args))
    specs["layers.0.extra.weight"] = TensorSpec((3,), "F32", "f32")  # the checkpoint lacks it
    del specs["layers.1.attn_norm.weight"]  # the model lacks it
    specs["norm.weight"] = TensorSpec((7,), "BF16", "bf16")  # wrong shape
    model = build_meta_module(specs)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(model, ckpt)
    msg = str(ei.value)
    assert "layers.0.extra.weight: missing from checkpoint" in msg
    assert "layers.1.attn_norm.weight: the model has no parameter or buffer" in msg
    assert "norm.weight: checkpoint shape [128], model expects [7]" in msg
    assert len(ei.value.problems) == 3
    assert all(p.is_meta for p in model.parameters())  # failed before copying anything


def test_without_mtp(args, ckpt):
    model = build_meta_module(expected_tensors(args, include_mtp=False))
    rep = load_checkpoint(model, ckpt, include_mtp=False)
    n_mtp = sum(1 for n in expected_tensors(args) if n.startswith("mtp."))
    assert rep.skipped == n_mtp > 0 and rep.tensors == len(expected_tensors(args)) - n_mtp
    # a model that does declare MTP but is told not to load it: its MTP tensors would stay on meta
    with pytest.raises(CheckpointError, match="mtp.0.attn_norm.weight: missing from checkpoint"):
        load_checkpoint(build_meta_module(expected_tensors(args)), ckpt, include_mtp=False)


def _shared_tiny(tmp_path_factory) -> Path:
    """tiny, seed 0, 4 MB shards; written once per session and shared by modules that never modify it."""
    d = tmp_path_factory.getbasetemp() / "shared-tiny-seed0-4mb"
    if not (d / INDEX_NAME).is_file():
        write_dummy_checkpoint(ModelArgs.from_preset("tiny"), d, shard_bytes=4 << 20)
    return d


def test_dspark_stages_load_and_backbone_only(tmp_path_factory):
    """DSpark checkpoints (0731 / 0813): the stages mtp.* are loaded like any tensor; include_mtp=False loads the
    backbone only."""
    args = ModelArgs.from_preset("tiny-dspark")
    ckpt = write_dummy_checkpoint(args, tmp_path_factory.mktemp("tiny_dspark"), shard_bytes=4 << 20)
    specs = expected_tensors(args)
    n_mtp = sum(1 for n in specs if n.startswith("mtp."))
    assert n_mtp == 241
    model = build_meta_module(specs)
    rep = load_checkpoint(model, ckpt)
    assert rep.tensors == len(specs) and rep.skipped == 0
    state = dict(model.named_parameters())
    with safe_open(str(ckpt / read_checkpoint(ckpt).tensors["mtp.2.markov_head.markov_w2.weight"].file), "pt") as f:
        assert torch.equal(state["mtp.2.markov_head.markov_w2.weight"],
                           f.get_tensor("mtp.2.markov_head.markov_w2.weight").float())
    assert state["mtp.0.main_proj.weight"].dtype == torch.float8_e4m3fn
    rep = load_checkpoint(build_meta_module(expected_tensors(args, include_mtp=False)), ckpt, include_mtp=False)
    assert rep.skipped == n_mtp and rep.tensors == len(specs) - n_mtp
    # a model without the stages, loading everything: each stage tensor is named with its file
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(build_meta_module(expected_tensors(args, include_mtp=False)), ckpt)
    fname = read_checkpoint(ckpt).tensors["mtp.2.confidence_head.proj.weight"].file
    assert f"{fname}: mtp.2.confidence_head.proj.weight: the model has no parameter or buffer of this name" \
        in ei.value.problems
    assert len(ei.value.problems) == n_mtp
