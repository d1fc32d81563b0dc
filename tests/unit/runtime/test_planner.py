"""`ascend-v4 plan` against hand-computed numbers for Flash and Pro (model-spec.md §9-§10 dimensions), and the
honest answer for Pro on 16 x 64 GB cards."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ascend_v4.checkpoint.spec import expected_tensors
from ascend_v4.cli import main
from ascend_v4.cli.plan import run_plan
from ascend_v4.model.args import ModelArgs
from ascend_v4.runtime.planner import HARDWARE, kv_formats, make_plan, weight_split

GIB = 1 << 30


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in ("flash", "pro"):
        a = ModelArgs.from_preset(name)
        out[name] = (a, expected_tensors(a))
    return out


# One routed expert, by hand: w1/w3 [I, D], w2 [D, I]; blocks = layers + 1 MTP.
HAND = {
    "flash": dict(D=4096, I=2048, E=256, blocks=44),
    "pro": dict(D=7168, I=3072, E=384, blocks=62),
}


def expert_bytes(fmt: str, D: int, I: int) -> int:
    if fmt == "native":  # FP4: in/2 bytes + in/32 UE8M0 per row
        return 2 * (I * D // 2 + I * D // 32) + (D * I // 2 + D * I // 32)
    if fmt == "w8a8":  # int8 + fp32 scale + fp32 offset per row
        return 2 * (I * D + 8 * I) + (D * I + 8 * D)
    if fmt == "w4a8":  # int4 + scale, offset, scale_bias ([I,1] up/gate, [D,16] down)
        return 2 * (I * D // 2 + 12 * I) + (D * I // 2 + 8 * D + 64 * D)
    if fmt == "bf16":
        return 3 * 2 * I * D
    if fmt == "fp8-experts":  # e4m3 + one UE8M0 per 128x128 block
        return 2 * (I * D + (I // 128) * (D // 128)) + (D * I + (D // 128) * (I // 128))
    raise AssertionError(fmt)


@pytest.mark.parametrize("name", ["flash", "pro"])
@pytest.mark.parametrize("fmt", ["native", "w8a8", "w4a8", "bf16", "fp8-experts"])
def test_expert_bytes(models, name, fmt):
    a, specs = models[name]
    h = HAND[name]
    ws = weight_split(specs, fmt)
    assert ws.routed_experts == h["blocks"] * h["E"] * expert_bytes(fmt, h["D"], h["I"])


def test_native_totals_match_the_official_checkpoints(models):
    # model-spec.md §9.3: 159.6 GB (Flash) and 864.7 GB (Pro) in the files
    assert round(weight_split(models["flash"][1], "native").stored / 1e9, 1) == 159.6
    assert round(weight_split(models["pro"][1], "native").stored / 1e9, 1) == 864.7


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_loaded_bytes_add_the_fp32_head_and_the_dense_wo_a(models, name):
    """Loaded = stored + the head kept in fp32 (+2 bytes per element over BF16) + wo_a expanded from FP8 with its
    UE8M0 scale (1 + 1/16384 bytes per element) to BF16 (2): model/placement.py."""
    a, specs = models[name]
    ws = weight_split(specs, "native")
    wo_a = sum(s.shape[0] * s.shape[1] for n, s in specs.items() if n.endswith("attn.wo_a.weight"))
    wo_a_scale = sum(s.shape[0] * s.shape[1] for n, s in specs.items() if n.endswith("attn.wo_a.scale"))
    assert ws.total - ws.stored == a.vocab_size * a.dim * 2 + wo_a - wo_a_scale


@pytest.mark.parametrize("name,kv,per_token", [
    ("flash", "bf16", 6880), ("flash", "bf16-int8idx", 6229), ("flash", "fp8", 3514.25),
    ("pro", "bf16", 9848), ("pro", "bf16-int8idx", 8918), ("pro", "fp8", 5031.4375)])
def test_kv_bytes_per_token(models, name, kv, per_token):
    # model-spec.md §10.3: CSA main/4 + indexer/4, HCA main/128; 21 CSA + 20 HCA (Flash), 30 + 31 (Pro)
    a, specs = models[name]
    r = make_plan(a, specs, "w8a8", "910c", 16, kv=kv, context=1000)
    assert r.kv_per_token == per_token
    main, idx = {"bf16": (1024, 256), "bf16-int8idx": (1024, 132), "fp8": (584, 68)}[kv]
    assert (kv_formats(a)[kv].main_entry, kv_formats(a)[kv].index_entry) == (main, idx)
    want = {"csa": main / 4 + idx / 4, "hca": main / 128, "window": 0.0}
    assert r.kv_per_token_by_kind == {k: want[k] for k in set(a.layer_kinds)}  # the kinds the model has


def test_fixed_per_sequence_and_reserve(models):
    a, specs = models["flash"]
    r = make_plan(a, specs, "w8a8", "910c", 16, context=1000)
    rings = 44 * 128 * 1024  # (43 layers + MTP) x window x bf16 entry
    # fp32 (kv, score) run slot: CSA the open window [4, 2 x dc] and the last A-half [4, dc], for the main
    # (dc 512) and the indexer's compressor (dc 128); HCA the open window [128, 512]
    state = 21 * 2 * (4 * 1024 + 4 * 512 + 4 * 256 + 4 * 128) * 4 + 20 * (2 * 128 * 512) * 4
    assert r.fixed_per_seq == rings + state == 17_543_168
    assert r.reserve_per_card == 2 * GIB + 1 * GIB + 8192 * 64 * 4096
    assert make_plan(a, specs, "w8a8", "910c", 1, context=1000).reserve_per_card == 2 * GIB + 8192 * 64 * 4096


def test_per_card_layout_and_fit_arithmetic(models):
    a, specs = models["pro"]
    ws = weight_split(specs, "w4a8")
    for tp in (1, 4, 16):
        r = make_plan(a, specs, "w4a8", "910c", 16, tp=tp, context=131072)
        want = ws.replicated + ws.tp_split / tp + ws.routed_experts / 16
        assert r.weights_per_card == int(want)
        free = 64 * GIB - want - r.reserve_per_card
        assert r.free_per_card == int(free)
        per_seq = 131072 * 8918 + r.fixed_per_seq
        assert r.seqs_per_card == (int(free // per_seq) if free > 0 else 0)
        if free > 0:
            assert r.max_context_at_batch == int(min(a.max_seq_len, (free - r.fixed_per_seq) / 8918))


def test_pro_on_16_cards_of_64gb(models):
    """The honest answer (ascend-notes §0.8 / §11): only W4A8 fits, only with attention TP 16, and only for about
    one sequence of ~0.2M tokens; W8A8 and BF16 do not fit at all; native / fp8-experts cannot run on A2/A3."""
    a, specs = models["pro"]
    for fmt in ("w8a8", "bf16"):
        chosen, reports = run_plan("pro", fmt, 16, "910c")
        assert not any(r.fits for r in reports)
    chosen, reports = run_plan("pro", "w4a8", 16, "910c", context=131072)
    assert [r.tp for r in reports if r.fits] == [16] and chosen.tp == 16
    assert chosen.seqs_per_card == 1 and 150_000 < chosen.max_context_at_batch < 300_000
    for fmt in ("native", "fp8-experts"):
        r = make_plan(a, specs, fmt, "910c", 16, tp=16)
        assert not r.runnable and "no FP8/FP4 matmul" in r.runnable_note
    # Flash W8A8 fits one A2 node (8 x 910B) and one A3 node (16 dies) with TP 1 (official recipes)
    assert run_plan("flash", "w8a8", 8, "910b", tp=1)[0].fits
    assert run_plan("flash", "w8a8", 16, "910c", tp=1)[0].fits
    # and Pro W4A8 fits 32 dies (2 x A3)
    assert run_plan("pro", "w4a8", 32, "910c")[0].fits


def test_roofline_by_hand(models):
    a, specs = models["flash"]
    hw = HARDWARE["910c"]
    ws = weight_split(specs, "w8a8")
    r = make_plan(a, specs, "w8a8", "910c", 16, tp=1, batch=1, context=4096)
    p_hit = 1 - (1 - 6 / 256) ** 16  # 16 DP groups x 1 token, 6 of 256 experts each
    weights = ws.replicated + ws.tp_split + ws.routed_experts / 16 * p_hit
    csa = 21 * (1024 * 132 + (512 + 128) * 1024)  # indexer keys L/4, top-512 + window entries
    hca = 20 * (32 + 128) * 1024  # L/128 + window entries
    win = 2 * 128 * 1024
    t_mem = (weights + csa + hca + win) / hw.bandwidth
    assert r.decode_bound == "memory"
    assert r.decode_step_s == pytest.approx(t_mem, rel=1e-9)
    assert r.decode_tok_s_per_card == pytest.approx(1 / t_mem, rel=1e-9)


def test_dspark_draft_weights_are_counted_per_card():
    """Flash-0731: the three DSpark stages count like MTP blocks (experts over EP, attention over TP) and the
    stage-0 / last-stage extras (main_proj, Markov and confidence heads, norm, hc head) are replicated."""
    a = ModelArgs.from_preset("flash-0731")
    specs = expected_tensors(a)
    h = HAND["flash"]
    for fmt in ("native", "w8a8"):
        ws = weight_split(specs, fmt)
        assert ws.routed_experts == (43 + 3) * h["E"] * expert_bytes(fmt, h["D"], h["I"])
        assert ws.draft["routed"] == 3 * h["E"] * expert_bytes(fmt, h["D"], h["I"])
    ws = weight_split(specs, "native")
    # native = the files: dense draft bytes (dspark-spec.md §1 Provenance) + wo_a expanded to BF16 at load
    wo_a = 3 * 8192 * 4096
    assert ws.draft["replicated"] + ws.draft["tp"] == 595_182_108 + wo_a - wo_a // (128 * 128)
    # replicated extras, by hand: main_proj FP8 [4096, 12288] + scale, Markov heads 2 x [129280, 256] BF16,
    # confidence proj [1, 4352], main_norm + norm [4096] BF16, hc head [4, 16384] + [4] + [1] F32
    extras = (4096 * 12288 + 32 * 96) + 2 * 129280 * 256 * 2 + 4352 * 2 + 2 * 4096 * 2 + (4 * 16384 + 5) * 4
    flash = weight_split(expected_tensors(ModelArgs.from_preset("flash")), "native")
    april_mtp_block = flash.draft["replicated"] - (2 * 4096 * 4096 + 2 * 32 * 32 + 3 * 4096 * 2 + (4 * 16384 + 5) * 4)
    assert ws.draft["replicated"] == 3 * april_mtp_block + extras
    assert ws.draft["tp"] == 3 * flash.draft["tp"]
    for tp, npus in ((1, 8), (4, 16)):
        r = make_plan(a, specs, "native", "950", npus, tp=tp, context=4096, weights=ws)
        want = ws.draft["replicated"] + ws.draft["tp"] / tp + ws.draft["routed"] / npus
        assert r.draft_per_card == int(want) > 0
        b = weight_split(expected_tensors(a, include_mtp=False), "native")
        assert abs(r.weights_per_card - (b.replicated + b.tp_split / tp + b.routed_experts / npus + want)) <= 1
        assert r.as_dict()["bytes_per_card"]["draft_weights"] == r.draft_per_card
        assert f"(draft module mtp.*: {r.draft_per_card / 1e9:.2f} GB of it" in r.table()


def test_plan_cli_flash_0731():
    r = CliRunner().invoke(main, ["plan", "-m", "flash-0731", "-f", "w8a8", "-n", "16", "-H", "910c", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    for lay in d["layouts"]:
        assert 0 < lay["bytes_per_card"]["draft_weights"] < lay["bytes_per_card"]["weights"]
        assert lay["weights"]["draft"] > 10e9  # three stages of 256 experts, the Markov heads
    # the stages' window rings are in the fixed bytes per sequence: 3 more window layers than the backbone
    a = ModelArgs.from_preset("flash-0731")
    r0731 = make_plan(a, expected_tensors(a), "w8a8", "910c", 16, context=1000, kv="bf16")
    f = ModelArgs.from_preset("flash")
    rflash = make_plan(f, expected_tensors(f), "w8a8", "910c", 16, context=1000, kv="bf16")
    assert r0731.fixed_per_seq - rflash.fixed_per_seq == 2 * 128 * 1024  # 3 stage rings vs 1 MTP ring


def test_plan_cli():
    r = CliRunner().invoke(main, ["plan", "--model", "pro", "--format", "w4a8", "--npus", "16", "--hardware",
                                  "910c"], catch_exceptions=False)
    assert r.exit_code == 0
    assert "verdict: FITS" in r.output and "TP 16" in r.output and "vendor figure (unverified)" in r.output
    r = CliRunner().invoke(main, ["plan", "-m", "pro", "-f", "bf16", "-n", "16", "-H", "910b", "--tp", "16"])
    assert r.exit_code == 0 and "DOES NOT FIT" in r.output
    r = CliRunner().invoke(main, ["plan", "-m", "flash", "-f", "w8a8", "-n", "16", "-H", "910c", "--tp", "3"])
    assert r.exit_code != 0 and "must divide" in r.output


def test_a_format_that_cannot_run_never_fits(models):
    a, specs = models["flash"]
    r = make_plan(a, specs, "native", "910b", 8, tp=1)
    assert r.free_per_card > 0 and r.seqs_per_card >= 1  # the bytes would fit ...
    assert not r.fits and r.verdict.startswith("DOES NOT RUN: A2 has no FP8/FP4 matmul")  # ... but it cannot run
    assert "FITS" not in r.table() and "- (the layout does not fit / run)" in r.table()
    assert r.as_dict()["decode_tok_s_per_card"] is None


def test_npus_must_divide_the_experts():
    r = CliRunner().invoke(main, ["plan", "-m", "flash", "-f", "w8a8", "-n", "3", "-H", "910b"])
    assert r.exit_code != 0 and "--npus 3 does not divide the 256 routed experts" in r.output
    assert "1, 2, 4, 8, 16, 32, 64, 128, 256" in r.output and "Traceback" not in r.output


def test_rows_that_do_not_fit_show_no_speed():
    r = CliRunner().invoke(main, ["plan", "-m", "pro", "-f", "w4a8", "-n", "16", "-H", "910c"])
    rows = {int(line.split()[0]): line for line in r.output.splitlines() if line[:3].strip().isdigit()}
    assert set(rows) == {1, 2, 4, 8, 16}
    for tp in (1, 2, 4, 8):
        assert rows[tp].split()[5] == "-" and rows[tp].endswith("DOES NOT FIT")
    assert rows[16].split()[5] != "-" and rows[16].endswith("FITS")


# Recommended: the smallest attention TP that fits (the most DP groups), as `serve --hardware` picks; the serve
# command names --tp and --dp. Flash has 8 output groups (TP <= 8), Pro 16.
@pytest.mark.parametrize("model,fmt,npus,hw,tp,runs", [
    ("flash", "w8a8", 8, "910b", 1, True), ("flash", "w8a8", 16, "910c", 1, True),
    ("flash", "native", 4, "950", 1, True), ("pro", "w4a8", 16, "910c", 16, True),
    ("pro", "w8a8", 16, "950", 1, True), ("pro", "w4a8", 32, "910b", 2, True)])
def test_json_recommends_a_layout_and_the_commands(model, fmt, npus, hw, tp, runs):
    r = CliRunner().invoke(main, ["plan", "-m", model, "-f", fmt, "-n", str(npus), "-H", hw, "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    rec, cmds = d["recommended"], d["commands"]
    assert rec["fits"] and rec["layout"] == {"npus": npus, "tp": tp, "dp": npus // tp, "ep": npus}
    b = rec["bytes_per_card"]
    assert b["weights"] + b["reserve"] + b["free_for_kv"] == b["hbm"]
    assert rec["kv"]["bytes_per_token"] > 0 and len(d["layouts"]) == len([t for t in range(1, npus + 1)
                                                                           if npus % t == 0])
    assert (cmds["quantize"] is None) == (fmt == "native")
    if runs:  # a layout the engine runs: the exact serve command
        assert cmds["serve"].startswith(f"ascend-v4 serve --model {model}")
        assert f"--npus {npus} --tp {tp} --dp {npus // tp} --hardware {hw}" in cmds["serve"]
        assert cmds["why_not"] is None
    else:
        assert cmds["serve"] is None and "does not divide this model" in cmds["why_not"]


def test_a_tp_the_model_cannot_take_gets_no_serve_command():
    r = CliRunner().invoke(main, ["plan", "-m", "flash", "-f", "w4a8", "-n", "16", "-H", "910b", "--tp", "16", "--json"])
    cmds = json.loads(r.output)["commands"]
    assert cmds["serve"] is None and "o_groups=8" in cmds["why_not"]


def test_memory_model_is_the_engines():
    """plan's KV numbers and the engine pool's block sizes come from the same functions (kv_layout)."""
    import torch

    from ascend_v4.model import kv_layout
    from ascend_v4.model.cache import COMP_KIND, CachePool

    a = ModelArgs.from_preset("tiny")
    for kvfmt, dtype in (("auto", torch.bfloat16), ("fp8", torch.bfloat16), ("auto", torch.float32)):
        pool = CachePool(a, 128, 0, 0, dtype, "cpu", kvfmt)
        fmt = pool.format
        per_token = sum(kv_layout.layer_bytes_per_token(a, fmt, l) for l in range(a.n_layers + a.n_mtp_layers))
        assert pool.block_bytes(COMP_KIND) == 128 * per_token
        pool.resize(1, 3, 2, 3)  # real tensors: their bytes are what the model says
        assert pool.nbytes() == sum(t.numel() * t.element_size() for t in
                                    [*pool.kv, *[k for k in pool.ikeys if k is not None],
                                     *[v for s in pool.state if s for v in s.values()],
                                     *[t for r in pool.run if r for ts in r.values() for t in ts if t is not None]])
    bf16 = kv_layout.runtime_format(a, "auto", 2)
    plan_bf16 = kv_layout.kv_formats(a)["bf16"]
    assert (bf16.main_entry, bf16.index_entry) == (plan_bf16.main_entry, plan_bf16.index_entry)
