"""`ascend-v4` CLI: the group, `info` (numbers vs model-spec.md §10 and hand computation) and `dummy-checkpoint`."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace

import pytest
from click.testing import CliRunner

from ascend_v4.checkpoint.spec import draft_nbytes
from ascend_v4.cli import main
from ascend_v4.cli.dummy import make_dummy_checkpoint, parse_size
from ascend_v4.cli.info import compact_schedule, load_model_args, model_info, parse_tokens
from ascend_v4.model.args import ModelArgs

M = 1 << 20
HAVE_WRITER = importlib.util.find_spec("ascend_v4.checkpoint.dummy") is not None


def run(*argv: str):
    return CliRunner().invoke(main, list(argv), catch_exceptions=False)


# ------------------------------------------------------------------------------------------ group
def test_help_and_version():
    r = run("--help")
    assert r.exit_code == 0 and "info" in r.output and "dummy-checkpoint" in r.output
    r = run("--version")
    assert r.exit_code == 0 and "0.1.0" in r.output


@pytest.mark.parametrize("cmd", sorted(main.commands))
def test_every_command_has_help_with_examples(cmd):
    r = run(cmd, "--help")
    assert r.exit_code == 0
    assert "Examples:" in r.output and f"ascend-v4 {cmd}" in r.output


# ------------------------------------------------------------------------------------------- info
# model-spec.md §10.3 (BF16 KV + BF16 indexer; FP8 KV 584 B + FP4 indexer 68 B), 2.2 (schedule).
SPEC = {
    "flash": dict(bf16=6880, fp8=3514, counts=(2, 21, 20), schedule="Wx2 (CH)x20 C", E=256, width=2048),
    "pro": dict(bf16=9848, fp8=5031, counts=(0, 30, 31), schedule="Hx2 (CH)x29 C", E=384, width=3072),
}


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_info_real_models_match_spec(name):
    s = SPEC[name]
    info = model_info(ModelArgs.from_preset(name))
    bf, q = info["kv_cache"]["bf16"], info["kv_cache"]["fp8_fp4"]
    assert bf["bytes_per_token"] == s["bf16"]
    assert round(q["bytes_per_token"]) == s["fp8"]
    assert (q["kv_entry_bytes"], q["index_entry_bytes"]) == (584, 68)
    assert (bf["kv_entry_bytes"], bf["index_entry_bytes"]) == (1024, 256)
    c = info["layers"]["counts"]
    assert (c["window"], c["csa"], c["hca"]) == s["counts"]
    assert info["layers"]["schedule"] == s["schedule"]
    assert info["hash_layers"] == 3 and info["mtp_blocks"] == {"n": 1, "kinds": ["window"]}
    assert info["experts"] == {"routed": s["E"], "shared": 1, "top_k": 6, "width": s["width"], "dtype": "fp4"}
    layers = info["layers"]["n"]
    assert bf["window_ring_bytes_per_seq"] == (layers + 1) * 128 * 1024  # + MTP ring
    assert q["window_ring_bytes_per_seq"] == (layers + 1) * 128 * 584
    # 1M divides every ratio, so the growing part is exactly bytes/token x 1M (§10.3: 3.43 / 4.91 GiB)
    assert q["bytes_at_context"] == q["bytes_per_token"] * M + q["window_ring_bytes_per_seq"]
    assert info["context"] == M


# dspark-spec.md §1 Provenance (draft dense / routed bytes) and §5 (DSpark config keys).
DSPARK = {
    "flash-0731": dict(dense=595_182_108, routed=10_267_656_192, rank=256, targets=[40, 41, 42], layers=43),
    "pro-0813": dict(dense=1_550_479_644, routed=40_428_896_256, rank=512, targets=[58, 59, 60], layers=61),
}


@pytest.mark.parametrize("name", ["flash-0731", "pro-0813"])
def test_info_reports_the_dspark_draft_module(name):
    s = DSPARK[name]
    info = model_info(ModelArgs.from_preset(name))
    assert info["draft"] == {
        "kind": "dspark", "stages": 3, "kinds": ["window"] * 3,
        "bytes": {"dense": s["dense"], "routed_experts": s["routed"], "total": s["dense"] + s["routed"]},
        "block_size": 5, "markov_rank": s["rank"], "noise_token_id": 128799, "target_layers": s["targets"]}
    assert info["mtp_blocks"] == {"n": 0, "kinds": []}
    # the three stage rings are window layers: (main + 3 stages) x 128 x entry
    assert info["kv_cache"]["bf16"]["window_ring_bytes_per_seq"] == (s["layers"] + 3) * 128 * 1024
    # the checkpoint line counts the stages: the April backbone without its MTP block, plus the DSpark bytes
    april = ModelArgs.from_preset(name.split("-")[0])
    assert info["checkpoint_bytes"] == model_info(april)["checkpoint_bytes"] - sum(draft_nbytes(april)) \
        + s["dense"] + s["routed"]


def test_info_draft_module_text_and_json():
    r = run("info", "--model", "flash-0731")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("draft module"))
    assert "DSpark, 3 stages (window), block 5, Markov rank 256, target layers 40, 41, 42" in line
    assert "weights 10.86 GB (595.18 MB dense + 10.27 GB routed experts)" in line
    data = json.loads(run("info", "--model", "flash-0731", "--json").output)
    assert data["draft"]["bytes"]["dense"] == 595_182_108
    april = model_info(ModelArgs.from_preset("flash"))["draft"]
    assert april["kind"] == "mtp" and april["stages"] == 1 and "block_size" not in april
    assert model_info(replace(ModelArgs.from_preset("tiny"), n_mtp_layers=0))["draft"]["kind"] is None
    r = run("info", "--model", "flash")
    assert "draft module       MTP, 1 block (window); weights 3.59 GB" in r.output


def test_info_headline_sizes():
    flash, pro = model_info(ModelArgs.from_preset("flash")), model_info(ModelArgs.from_preset("pro"))
    assert round(flash["params"]["total"] / 1e9) == 284 and round(pro["params"]["total"] / 1e12, 1) == 1.6
    assert 13e9 < flash["params"]["active"] < 14e9 and 49e9 < pro["params"]["active"] < 50e9
    assert 150e9 < flash["checkpoint_bytes"] < 170e9


def test_info_tiny_by_hand():
    # tiny: layers W C H C (+ MTP W), head_dim 128 (nope 64, rope 64), index_head_dim 64, window 16.
    info = model_info(ModelArgs.from_preset("tiny"), context=4096)
    bf, q = info["kv_cache"]["bf16"], info["kv_cache"]["fp8_fp4"]
    # BF16: entry 256 B, indexer 128 B -> CSA 256/4 + 128/4 = 96, HCA 256/128 = 2 -> 2*96 + 2
    assert bf["bytes_per_token"] == 194
    # FP8: 64 nope + 128 rope + 8 scale bytes = 200; FP4 indexer 32 + 2 = 34 -> 2*(50 + 8.5) + 200/128
    assert (q["kv_entry_bytes"], q["index_entry_bytes"]) == (200, 34)
    assert q["bytes_per_token"] == pytest.approx(118.5625)
    assert bf["window_ring_bytes_per_seq"] == 5 * 16 * 256
    assert bf["bytes_at_context"] == 194 * 4096 + 5 * 16 * 256
    assert info["layers"]["schedule"] == "W C H C" and info["hash_layers"] == 2
    assert info["experts"]["top_k"] == 2


def test_info_cli_text_and_json(tmp_path):
    r = run("info", "--model", "flash")
    assert r.exit_code == 0, r.output
    assert "6,880 B" in r.output and "3,514 B" in r.output and "Wx2 (CH)x20 C" in r.output
    r = run("info", "--model", "pro", "--json", "--context", "128k")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["context"] == 128 * 1024 and data["kv_cache"]["bf16"]["bytes_per_token"] == 9848


def test_info_reads_a_checkpoint_directory(tmp_path):
    cfg = ModelArgs.from_preset("tiny").to_hf_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    args, source = load_model_args(str(tmp_path))
    assert args.n_layers == 4 and "directory" in source
    r = run("info", "--model", str(tmp_path), "--json")
    assert r.exit_code == 0 and json.loads(r.output)["kv_cache"]["bf16"]["bytes_per_token"] == 194


def test_info_errors_are_clean():
    r = CliRunner().invoke(main, ["info", "--model", "no-such-model"])
    assert r.exit_code == 1 and "preset" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["info", "--model", "tiny", "--context", "lots"])
    assert r.exit_code == 2 and "token count" in r.output


def test_parsers_and_schedule():
    assert parse_tokens("1M") == M and parse_tokens("128k") == 131072 and parse_tokens("4,096") == 4096
    assert parse_size("1GB") == parse_size("1GiB") == parse_size("1g") == 1 << 30
    assert parse_size("512MB") == 512 << 20 and parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("1 parsec")
    assert compact_schedule(["window", "window", "window"]) == "Wx3"
    assert compact_schedule(["csa", "hca", "csa", "hca", "window"]) == "(CH)x2 W"


# ------------------------------------------------------------------------------- dummy-checkpoint
def test_dummy_refuses_non_empty_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        make_dummy_checkpoint("tiny", tmp_path)
    r = CliRunner().invoke(main, ["dummy-checkpoint", "--preset", "tiny", "--out", str(tmp_path)])
    assert r.exit_code == 1 and "not empty" in r.output
    r = CliRunner().invoke(main, ["dummy-checkpoint", "--preset", "nope", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2


@pytest.mark.skipif(not HAVE_WRITER, reason="ascend_v4.checkpoint.dummy (write_dummy_checkpoint) is not written yet")
def test_dummy_checkpoint_tiny(tmp_path):
    out = tmp_path / "tiny"
    r = run("dummy-checkpoint", "--preset", "tiny", "--out", str(out), "--seed", "3", "--shard-size", "16MB")
    assert r.exit_code == 0, r.output
    assert "wrote tiny dummy checkpoint" in r.output
    assert ModelArgs.from_dir(out).n_layers == 4
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2  # ~70 MiB of tensors in 16 MiB shards
    # info on the written directory agrees with the preset
    assert model_info(ModelArgs.from_dir(out))["kv_cache"] == model_info(ModelArgs.from_preset("tiny"))["kv_cache"]
    # non-empty now: refused without --force, accepted with it
    assert CliRunner().invoke(main, ["dummy-checkpoint", "-p", "tiny", "-o", str(out)]).exit_code == 1
    r = run("dummy-checkpoint", "-p", "tiny", "-o", str(out), "--seed", "3", "--shard-size", "16MB", "--force")
    assert r.exit_code == 0, r.output
    shutil.rmtree(out)


@pytest.mark.skipif(not HAVE_WRITER, reason="ascend_v4.checkpoint.dummy (write_dummy_checkpoint) is not written yet")
def test_dummy_checkpoint_tiny_dspark(tmp_path):
    from ascend_v4.checkpoint.reader import read_checkpoint

    out = tmp_path / "tiny-dspark"
    r = run("dummy-checkpoint", "--preset", "tiny-dspark", "--out", str(out))
    assert r.exit_code == 0, r.output
    args = ModelArgs.from_dir(out)
    assert args.n_dspark_stages == 3 and args.n_mtp_layers == 0
    info = read_checkpoint(out)  # every DSpark stage tensor checked against the inventory
    assert sum(n.startswith("mtp.") for n in info.tensors) == 241
    assert "mtp.2.markov_head.markov_w1.weight" in info.tensors and "mtp.0.main_proj.scale" in info.tensors
