"""The DSpark draft stages `mtp.{0,1,2}.*` of V4-Flash-0731 / V4-Pro-0813 in the checkpoint inventory.

The expected tensors are written out here from dspark-spec.md §1 (its tensor table and Provenance line), not
derived from `checkpoint/spec.py`, so a wrong rule there fails here. Then: a tiny-dspark dummy is written and read
back with every `mtp.*` tensor (values by the dummy's documented rules), backbone-only reading, errors naming the
tensor and the file, and the backbone presets' inventories unchanged. Loading the stages: test_loader.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from safetensors import safe_open

from ascend_v4.checkpoint.dummy import write_dummy_checkpoint
from ascend_v4.checkpoint.errors import CheckpointError
from ascend_v4.checkpoint.reader import INDEX_NAME, read_checkpoint
from ascend_v4.checkpoint.spec import draft_nbytes, expected_tensors
from ascend_v4.model.args import ModelArgs
from ascend_v4.ops.reference.formats import dequant_fp8_block

# ----------------------------------------------------------------------------------- dspark-spec.md §1, by hand
# (name under mtp.{s}, kind, Flash-0731 shape, Pro-0813 shape). Kinds: "fp8" = F8_E4M3 `.weight` + F8_E8M0 `.scale`
# [ceil(out/128), ceil(in/128)]; "fp4" = I8 `.weight` [out, in/2] + F8_E8M0 `.scale` [out, in/32] (logical shape
# given); otherwise the safetensors dtype of a plain tensor.
EVERY_STAGE = [
    ("attn.wq_a", "fp8", (1024, 4096), (1536, 7168)),
    ("attn.wq_b", "fp8", (32768, 1024), (65536, 1536)),
    ("attn.wkv", "fp8", (512, 4096), (512, 7168)),
    ("attn.wo_a", "fp8", (8192, 4096), (16384, 4096)),
    ("attn.wo_b", "fp8", (4096, 8192), (7168, 16384)),
    ("attn.q_norm.weight", "BF16", (1024,), (1536,)),
    ("attn.kv_norm.weight", "BF16", (512,), (512,)),
    ("attn.attn_sink", "F32", (64,), (128,)),
    ("attn_norm.weight", "BF16", (4096,), (7168,)),
    ("ffn_norm.weight", "BF16", (4096,), (7168,)),
    *[(f"hc_{u}_{p}", "F32", f, pr) for u in ("attn", "ffn")
      for p, f, pr in (("fn", (24, 16384), (24, 28672)), ("base", (24,), (24,)), ("scale", (3,), (3,)))],
    ("ffn.gate.weight", "BF16", (256, 4096), (384, 7168)),
    ("ffn.gate.bias", "F32", (256,), (384,)),
    ("ffn.shared_experts.w1", "fp8", (2048, 4096), (3072, 7168)),
    ("ffn.shared_experts.w3", "fp8", (2048, 4096), (3072, 7168)),
    ("ffn.shared_experts.w2", "fp8", (4096, 2048), (7168, 3072)),
]
EXPERT = [  # ffn.experts.{e}.*, every routed expert e
    ("w1", "fp4", (2048, 4096), (3072, 7168)),
    ("w3", "fp4", (2048, 4096), (3072, 7168)),
    ("w2", "fp4", (4096, 2048), (7168, 3072)),
]
STAGE_0 = [
    ("main_proj", "fp8", (4096, 12288), (7168, 21504)),
    ("main_norm.weight", "BF16", (4096,), (7168,)),
]
LAST_STAGE = [
    ("norm.weight", "BF16", (4096,), (7168,)),
    ("hc_head_fn", "F32", (4, 16384), (4, 28672)),
    ("hc_head_base", "F32", (4,), (4,)),
    ("hc_head_scale", "F32", (1,), (1,)),
    ("markov_head.markov_w1.weight", "BF16", (129280, 256), (129280, 512)),
    ("markov_head.markov_w2.weight", "BF16", (129280, 256), (129280, 512)),
    ("confidence_head.proj.weight", "BF16", (1, 4352), (1, 7680)),
]
EXPERTS = {"flash-0731": 256, "pro-0813": 384}
# Provenance line: draft dense (every mtp.* tensor but the routed experts ffn.experts.*) / routed bytes.
DRAFT_BYTES = {"flash-0731": (595_182_108, 10_267_656_192), "pro-0813": (1_550_479_644, 40_428_896_256)}
# Tensors per stage: 29 + 6 E in every block; + 3 (main_proj weight/scale, main_norm) in stage 0, + 7 in the last.
STAGE_COUNTS = {"flash-0731": [1568, 1565, 1572], "pro-0813": [2336, 2333, 2340]}
BYTES = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F32": 4, "I64": 8}
APRIL_ONLY = ("e_proj", "h_proj", "enorm", "hnorm")


def _expand(prefix: str, rows, col: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for name, kind, *shapes in rows:
        shape = shapes[col]
        if kind == "fp8":
            o, i = shape
            out[f"{prefix}{name}.weight"] = ("F8_E4M3", (o, i))
            out[f"{prefix}{name}.scale"] = ("F8_E8M0", (-(-o // 128), -(-i // 128)))
        elif kind == "fp4":
            o, i = shape
            out[f"{prefix}{name}.weight"] = ("I8", (o, i // 2))
            out[f"{prefix}{name}.scale"] = ("F8_E8M0", (o, i // 32))
        else:
            out[f"{prefix}{name}"] = (kind, shape)
    return out


def spec_table(preset: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every mtp.* tensor of `preset` by dspark-spec.md §1: {name: (dtype, stored shape)}."""
    col = 0 if preset == "flash-0731" else 1
    out = {}
    for s in range(3):
        out |= _expand(f"mtp.{s}.", EVERY_STAGE, col)
        for e in range(EXPERTS[preset]):
            out |= _expand(f"mtp.{s}.ffn.experts.{e}.", EXPERT, col)
        out |= _expand(f"mtp.{s}.", STAGE_0 if s == 0 else [], col)
        out |= _expand(f"mtp.{s}.", LAST_STAGE if s == 2 else [], col)
    return out


def _inventory(preset: str, **kw) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {n: (s.dtype, s.shape) for n, s in expected_tensors(ModelArgs.from_preset(preset), **kw).items()}


def _dense_routed(table) -> tuple[int, int]:
    dense = routed = 0
    for name, (dtype, shape) in table.items():
        n = math.prod(shape) * BYTES[dtype]
        if ".ffn.experts." in name:
            routed += n
        else:
            dense += n
    return dense, routed


# ------------------------------------------------------------------------------------------- inventories
@pytest.mark.parametrize("preset", ["flash-0731", "pro-0813"])
def test_draft_inventory_matches_the_spec_table(preset):
    got = {n: v for n, v in _inventory(preset).items() if n.startswith("mtp.")}
    want = spec_table(preset)
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []  # names
    bad = {n: (got[n], want[n]) for n in want if got[n] != want[n]}  # dtypes and shapes, tensor by tensor
    assert not bad
    for table in (got, want):
        assert [sum(n.startswith(f"mtp.{s}.") for n in table) for s in range(3)] == STAGE_COUNTS[preset]
    assert not any(n.split(".")[2] in APRIL_ONLY for n in got)  # April MTP tensors only
    assert not any("main_proj" in n or "main_norm" in n for n in got if not n.startswith("mtp.0."))
    assert not any("markov" in n or "confidence" in n for n in got if not n.startswith("mtp.2."))


@pytest.mark.parametrize("preset", ["flash-0731", "pro-0813"])
def test_draft_bytes_reproduce_the_provenance_totals(preset):
    """Dense = every mtp.* tensor except the routed experts (weights and their scales), routed = those experts."""
    assert _dense_routed(spec_table(preset)) == DRAFT_BYTES[preset]
    assert draft_nbytes(ModelArgs.from_preset(preset)) == DRAFT_BYTES[preset]


def test_flash_expert_shapes_are_the_shard_headers():
    # Provenance (S2 headers): I8 [2048,2048] + [2048,128] w1/w3, [4096,1024] + [4096,64] w2
    t = spec_table("flash-0731")
    assert t["mtp.1.ffn.experts.255.w1.weight"] == t["mtp.1.ffn.experts.255.w3.weight"] == ("I8", (2048, 2048))
    assert t["mtp.1.ffn.experts.255.w1.scale"] == ("F8_E8M0", (2048, 128))
    assert t["mtp.1.ffn.experts.255.w2.weight"] == ("I8", (4096, 1024))
    assert t["mtp.1.ffn.experts.255.w2.scale"] == ("F8_E8M0", (4096, 64))


@pytest.mark.parametrize("preset,backbone", [("flash-0731", "flash"), ("pro-0813", "pro")])
def test_backbone_is_the_april_one_and_include_mtp_false_drops_the_stages(preset, backbone):
    assert _inventory(preset, include_mtp=False) == _inventory(backbone, include_mtp=False)
    # ascendV1's embedding / head copies are April-MTP only: none for DSpark stages
    assert _inventory(preset, shared_copies=True) == _inventory(preset)


# Backbone presets: the inventory before DSpark support (tensor count, bytes), and the April MTP block's own names.
BACKBONE = {"flash": (69_187, 159_609_485_896), "pro": (145_116, 864_704_792_696)}
APRIL_EXTRAS = {"e_proj.weight", "e_proj.scale", "h_proj.weight", "h_proj.scale", "enorm.weight", "hnorm.weight",
                "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"}


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_backbone_presets_unchanged(name):
    inv = _inventory(name)
    assert (len(inv), sum(math.prod(s) * BYTES[d] for d, s in inv.values())) == BACKBONE[name]
    mtp = {n for n in inv if n.startswith("mtp.")}
    assert all(n.startswith("mtp.0.") for n in mtp)
    block = {n for n in mtp if n.split(".", 2)[2].startswith(("attn", "ffn", "hc_attn", "hc_ffn"))}
    assert {n.split(".", 2)[2] for n in mtp - block} == APRIL_EXTRAS
    assert draft_nbytes(ModelArgs.from_preset(name)) == _dense_routed({n: inv[n] for n in mtp})


# ------------------------------------------------------------------------------------- tiny-dspark on disk
@pytest.fixture(scope="module")
def tiny() -> ModelArgs:
    return ModelArgs.from_preset("tiny-dspark")


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    return write_dummy_checkpoint(tiny, tmp_path_factory.mktemp("tiny_dspark") / "ckpt", shard_bytes=4 << 20)


def _tensor(path, name):
    wm = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    with safe_open(str(path / wm[name]), framework="pt") as f:
        return f.get_tensor(name)


def test_tiny_dspark_dummy_reads_back_with_every_stage_tensor(tiny, ckpt):
    info = read_checkpoint(ckpt)  # the full inventory, mtp.* included, checked
    mtp = sorted(n for n in info.tensors if n.startswith("mtp."))
    E = tiny.n_routed_experts
    assert len(mtp) == 3 * (29 + 6 * E) + 3 + 7 == 241
    assert set(mtp) == {n for n in expected_tensors(tiny) if n.startswith("mtp.")}
    d, r, V = tiny.dim, tiny.dspark_markov_rank, tiny.vocab_size
    shapes = {n: (info.tensors[n].dtype, info.tensors[n].shape) for n in mtp}
    assert shapes["mtp.0.main_proj.weight"] == ("F8_E4M3", (d, 3 * d))
    assert shapes["mtp.0.main_proj.scale"] == ("F8_E8M0", (1, 3))
    assert shapes["mtp.2.markov_head.markov_w1.weight"] == shapes["mtp.2.markov_head.markov_w2.weight"] == \
        ("BF16", (V, r))
    assert shapes["mtp.2.confidence_head.proj.weight"] == ("BF16", (1, d + r))
    assert shapes["mtp.2.hc_head_fn"] == ("F32", (4, 4 * d))


def test_tiny_dspark_values_follow_the_dummy_rules(tiny, ckpt):
    d, r = tiny.dim, tiny.dspark_markov_rank
    w1 = _tensor(ckpt, "mtp.2.markov_head.markov_w1.weight").float()  # lookup table: N(0, 1)
    w2 = _tensor(ckpt, "mtp.2.markov_head.markov_w2.weight").float()  # linear r -> V: N(0, 1/r)
    conf = _tensor(ckpt, "mtp.2.confidence_head.proj.weight").float()  # linear d + r -> 1: N(0, 1/(d + r))
    assert w1.std().item() == pytest.approx(1, rel=0.02)
    assert w2.std().item() == pytest.approx(r ** -0.5, rel=0.02)
    assert conf.std().item() == pytest.approx((d + r) ** -0.5, rel=0.25)
    main = dequant_fp8_block(_tensor(ckpt, "mtp.0.main_proj.weight"), _tensor(ckpt, "mtp.0.main_proj.scale"))
    assert main.float().std().item() == pytest.approx((3 * d) ** -0.5, rel=0.1)  # FP8 linear: N(0, 1/in)
    for norm in ("mtp.0.main_norm.weight", "mtp.2.norm.weight"):
        assert (_tensor(ckpt, norm).float() - 1).abs().max().item() < 0.15  # RMSNorm weights 1 + 0.02 N
    # the Markov bias markov_w2 . markov_w1[t] has about the logits' unit scale
    bias = w2 @ w1[:64].T
    assert 0.7 < bias.std().item() < 1.3


def test_errors_name_the_tensor_and_the_file(tiny, ckpt):
    info = read_checkpoint(ckpt)
    fname = info.tensors["mtp.2.markov_head.markov_w1.weight"].file
    wider = replace(tiny, dspark_markov_rank=32)  # the config says rank 32, the files hold rank 16
    with pytest.raises(CheckpointError) as ei:
        read_checkpoint(ckpt, args=wider)
    problems = ei.value.problems
    assert f"{fname}: mtp.2.markov_head.markov_w1.weight: shape [129280, 16], expected [129280, 32]" in problems
    assert f"{info.tensors['mtp.2.confidence_head.proj.weight'].file}: mtp.2.confidence_head.proj.weight: shape " \
           f"[1, 144], expected [1, 160]" in problems
    assert len(problems) == 3  # markov_w1, markov_w2, confidence proj
    four = replace(tiny, n_dspark_stages=4, compress_ratios=tiny.compress_ratios + (0,))
    with pytest.raises(CheckpointError) as ei:
        read_checkpoint(ckpt, args=four)
    problems = ei.value.problems
    assert f"{INDEX_NAME}: mtp.3.attn.wq_a.weight: missing (expected F8_E4M3 [128, 128])" in problems
    assert f"{fname}: mtp.2.markov_head.markov_w1.weight: unexpected tensor (BF16 [129280, 16])" in problems
    assert "mtp.3.markov_head.markov_w1.weight: missing" in str(problems)
    # backbone-only reading skips the draft stages, whatever they hold
    assert read_checkpoint(ckpt, args=four, include_mtp=False).tensors.keys() == info.tensors.keys()
