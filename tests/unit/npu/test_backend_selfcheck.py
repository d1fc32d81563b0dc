"""NPU backends per op (ops/npu/candidates.py), the device self-check (ops/npu/selfcheck.py) and the vllm-ascend
op mapping (ops/npu/vllm_ascend_ops.py), on CPU tensors through the torch_npu double and the _C_ascend double
(tests/unit/npu/_vllm_ascend_double.py: the schemas of vllm-ascend's csrc/torch_binding.cpp, the maths of its
kernels): vllm-ascend is chosen where it maps an op and passes; a backend that fails the self-check is skipped
with a log line; a missing symbol or a library that does not load falls back; the model's output through the
vllm-ascend path equals the reference; `ascend-v4 doctor --ops` prints the table."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ascend_v4.ops.npu import kernels, selfcheck, vllm_ascend_ops
from ascend_v4.ops.npu._loader import OpLibrary
from ascend_v4.ops.reference import mhc

from . import _vllm_ascend_double as vad

NO_LIB = OpLibrary(False, Path("/nonexistent/vendors/ascend_v4"), Path("/nonexistent/lib.so"), "not built (test)")
DOUBLE = Path(__file__).with_name("double")


@pytest.fixture
def va():
    """The _C_ascend double registered (as loading vllm_ascend_C*.so would), its call log cleared."""
    vad.install()
    vad.CALLS.clear()
    vad.BUG.clear()
    yield vad
    vad.BUG.clear()


def _backend(tnpu, vllm) -> kernels.Backend:
    b = kernels.make_backend(tnpu, NO_LIB, vllm=vllm, soc=-1, mx_requested=False)
    b.device = "cpu"
    return b


def _loaded(ops=None) -> vllm_ascend_ops.VllmAscendLib:
    return vllm_ascend_ops.VllmAscendLib(True, "double (test)", vllm_ascend_ops.present_ops() if ops is None
                                         else frozenset(ops))


def test_vllm_ascend_is_chosen_where_it_maps_an_op_and_passes(tnpu, va):
    b = _backend(tnpu, _loaded())
    rows = {(r.op, r.backend): r for r in selfcheck.check_backend(b, ("small", "real"))}
    assert rows["hc_pre", "vllm-ascend"].status == "pass" and rows["hc_post", "vllm-ascend"].status == "pass"
    assert "T16 n4 D4096" in rows["hc_pre", "vllm-ascend"].detail  # the real V4 shape ran
    assert "inputs not taken" in rows["hc_pre", "vllm-ascend"].detail  # D = 256 is outside its documented range
    assert b.choice("hc_pre") == "vllm-ascend" and b.choice("hc_post") == "vllm-ascend"
    assert b.choice("sparse_attn") == "reference" and b.choice("moe_experts") == "torch_npu+grouped_matmul"
    assert not [r for r in rows.values() if r.status == "FAIL"]
    # a call outside hc_pre's limits (D = 256, fp32) goes to the next candidate, the reference
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 4096, generator=g).bfloat16()
    fn, base, scale = torch.randn(24, 4 * 4096, generator=g) * 0.02, torch.randn(24, generator=g), torch.rand(3)
    before = va.CALLS["npu_hc_pre_v2"]
    with kernels.use_backend(b):
        y, post, comb = b.run("hc_pre", x, fn, base, scale, 1e-6, 1e-6, 20)
        b.run("hc_pre", x[:, :, :256].float(), fn[:, :1024], base, scale, 1e-6, 1e-6, 20)
    assert va.CALLS["npu_hc_pre_v2"] == before + 1
    ry, rpost, rcomb = mhc.hc_pre(x, fn, base, scale, 1e-6, 1e-6, 20)
    torch.testing.assert_close(y.float(), ry.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(comb, rcomb, rtol=1e-4, atol=1e-5)


def test_a_backend_failing_the_self_check_is_skipped_with_a_log_line(tnpu, va, caplog):
    va.BUG.add("npu_hc_post")  # comb used transposed: wrong for every non-symmetric comb
    b = _backend(tnpu, _loaded())
    with caplog.at_level(logging.WARNING, logger="ascend_v4.ops"):
        rows = {(r.op, r.backend): r for r in selfcheck.check_backend(b, ("small",))}
    assert rows["hc_post", "vllm-ascend"].status == "FAIL" and "max rel err" in rows["hc_post", "vllm-ascend"].detail
    assert b.choice("hc_post") == "reference" and b.verdicts["hc_post", "vllm-ascend"] is False
    assert any("hc_post on vllm-ascend failed" in r.getMessage() for r in caplog.records)
    before = va.CALLS["npu_hc_post"]
    with kernels.use_backend(b):
        kernels.kernel_table()["hc_post"](torch.randn(2, 8), torch.randn(2, 4, 8), torch.rand(2, 4),
                                          torch.softmax(torch.randn(2, 4, 4), -1))
    assert va.CALLS["npu_hc_post"] == before  # never called once it failed


def test_an_exception_in_a_backend_is_a_failed_check_not_a_crash(tnpu, va, monkeypatch):
    def broken(*_a):
        raise RuntimeError("aclnnHcPost failed: EZ9999 (test)")

    monkeypatch.setattr(vllm_ascend_ops, "hc_post", broken)
    from ascend_v4.ops.npu import candidates

    candidates.table.cache_clear()
    try:
        b = _backend(tnpu, _loaded())
        row = next(r for r in selfcheck.check_backend(b, ("small",)) if r.op == "hc_post" and r.backend == "vllm-ascend")
        assert row.status == "FAIL" and "EZ9999" in row.detail and b.choice("hc_post") == "reference"
    finally:
        candidates.table.cache_clear()


def test_a_missing_symbol_or_no_library_falls_back(tnpu, va):
    b = _backend(tnpu, _loaded({"npu_hc_post"}))  # a build without hc_pre (e.g. an older vllm-ascend)
    assert b.choice("hc_pre") == "reference" and b.choice("hc_post") == "vllm-ascend"
    rows = {(r.op, r.backend): r for r in selfcheck.check_backend(b, ("small",))}
    assert rows["hc_pre", "vllm-ascend"].status == "not usable"
    assert "lacks _C_ascend.npu_hc_pre_v2" in rows["hc_pre", "vllm-ascend"].detail
    none = _backend(tnpu, vllm_ascend_ops.VllmAscendLib.absent("vllm-ascend is not installed"))
    assert none.choice("hc_pre") == "reference"


def test_loading_never_imports_vllm_and_a_bad_library_is_skipped(tmp_path, monkeypatch):
    pkg = tmp_path / "vllm_ascend"
    (pkg / "_cann_ops_custom" / "vendors" / "custom_transformer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('vllm_ascend was imported')\n")
    (pkg / "vllm_ascend_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not an ELF file")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ASCEND_CUSTOM_OPP_PATH", "/opt/other")
    got = vllm_ascend_ops.load_vllm_ascend_ops.__wrapped__()
    assert not got.loaded and "loading" in got.reason and "failed" in got.reason
    assert "vllm_ascend" not in sys.modules
    vendor = str(pkg / "_cann_ops_custom" / "vendors" / "custom_transformer")
    assert os.environ["ASCEND_CUSTOM_OPP_PATH"] == f"{vendor}:/opt/other"  # set before the load, kept the rest
    assert got.missing("hc_pre").startswith("vllm-ascend ops: loading")


def test_model_output_through_the_vllm_ascend_path_equals_the_reference(tnpu, va, monkeypatch):
    # tiny (D = 128): hc_post runs on vllm-ascend (any D), hc_pre declines (D outside 4096/7168) to the reference
    from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model

    from .test_npu_double import PROMPTS, _greedy, _route_seam_through_npu

    model = load_model(ensure_dummy_checkpoint("tiny"), ModelOptions(dtype=torch.float32))
    ref = _greedy(model, PROMPTS, 3)
    _route_seam_through_npu(monkeypatch)
    with kernels.use_backend(_backend(tnpu, _loaded())):
        toks, logits = _greedy(model, PROMPTS, 3)
    assert va.CALLS["npu_hc_post"] > 0 and va.CALLS["npu_hc_pre_v2"] == 0
    torch.testing.assert_close(logits, ref[1], rtol=1e-4, atol=1e-4)
    assert toks == ref[0]


def test_every_backend_the_double_offers_passes_the_self_check(tnpu, va):
    b = _backend(tnpu, _loaded())
    rows = selfcheck.check_backend(b, ("small",))
    assert {r.op for r in rows} == set(kernels.kernel_table())
    assert not [r for r in rows if r.status == "FAIL"], [r for r in rows if r.status == "FAIL"]
    used = b.describe()
    assert used["w8a8_gemm"] == "torch_npu" and used["fp8_roundtrip"] == "fp8-free"
    assert "<- used" in selfcheck.render(rows, used)


def test_self_check_switch(monkeypatch):
    monkeypatch.setenv("ASCEND_V4_NPU_SELFCHECK", "0")
    assert not selfcheck.self_check_enabled()
    monkeypatch.setenv("ASCEND_V4_NPU_SELFCHECK", "yes")
    with pytest.raises(ValueError, match="ASCEND_V4_NPU_SELFCHECK='yes' is not one of 0, 1"):
        selfcheck.self_check_enabled()


def _doctor(*args, env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", "from ascend_v4.cli import main; main()", "doctor", "--no-probe", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_doctor_ops_runs_the_self_check_in_a_child_and_prints_the_table():
    pp = os.pathsep.join([str(DOUBLE), os.environ.get("PYTHONPATH", "")])
    r = _doctor("--ops", "--ops-size", "small", "--json",
                env_extra={"PYTHONPATH": pp, "ASCEND_V4_NPU_SELFCHECK_DEVICE": "cpu"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ops = out["ops"]
    assert ops["device"] == "cpu" and ops["chosen"]["moe_experts"] == "torch_npu+grouped_matmul"
    assert "vllm-ascend is not installed" in ops["vllm_ascend"]
    assert {row["op"] for row in ops["rows"]} >= {"sparse_attn", "hc_pre", "moe_experts", "w8a8_gemm"}
    check = next(c for c in out["checks"] if c["name"] == "op self-check")
    assert check["ok"], check
    text = _doctor("--ops", "--ops-size", "small", env_extra={"PYTHONPATH": pp,
                                                               "ASCEND_V4_NPU_SELFCHECK_DEVICE": "cpu"})
    assert "op self-check on cpu" in text.stdout and "<- used" in text.stdout


def test_doctor_ops_without_torch_npu_says_why_it_did_not_run():
    r = _doctor("--ops", "--json", env_extra={})
    check = next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "op self-check")
    assert not check["ok"] and "did not run" in check["detail"] and "torch_npu" in check["detail"] + check["fix"]


@pytest.mark.parametrize("int4", [False, True])
def test_integer_experts_take_one_grouped_matmul_per_projection(tnpu, int4):
    """W8A8 / W4A8 experts on the NPU path: torch_npu routing, one npu_dynamic_quant per activation and ONE
    npu_grouped_matmul per projection for all experts (pertoken full quantisation), against the reference."""
    from ascend_v4.ops.reference import int_gemm

    args = selfcheck._moe_int(9, 6, 3, 256, 128, int4)(torch.Generator().manual_seed(4))
    ref = int_gemm.moe_experts_int(*args)
    b = _backend(tnpu, vllm_ascend_ops.VllmAscendLib.absent())
    assert b.choice("moe_experts_int") == "torch_npu+grouped_matmul"
    with kernels.use_backend(b):
        out = kernels.kernel_table()["moe_experts_int"](*args)
    assert tnpu.CALLS["npu_grouped_matmul"] == 3 and tnpu.CALLS["npu_dynamic_quant"] == 2
    assert tnpu.CALLS["npu_moe_init_routing_v2"] == 1 and tnpu.CALLS["npu_moe_token_unpermute"] == 1
    assert out.dtype == torch.float32
    # bf16 scales and epilogues vs the fp32-scaled reference: errors scale with the row, not the element
    ok, detail = selfcheck.compare("moe_experts_int", out, ref)
    assert ok, detail
    fp32 = (args[0].float(), *args[1:])  # npu_dynamic_quant takes half only: fp32 goes to the reference
    with kernels.use_backend(b):
        assert torch.equal(kernels.kernel_table()["moe_experts_int"](*fp32), int_gemm.moe_experts_int(*fp32))
    assert tnpu.CALLS["npu_grouped_matmul"] == 3


def test_router_maps_to_moe_gating_top_k_hash_scored_and_hashed(tnpu, va, monkeypatch):
    """ops.moe_gate on vllm-ascend's moe_gating_top_k_hash (norm_type 2 = sqrt(softplus)), both layer kinds, against
    the reference; and the tiny model end to end with the router on it."""
    from ascend_v4.ops.reference.gemm import moe_gate as ref_gate

    b = _backend(tnpu, _loaded())
    assert b.choice("moe_gate") == "vllm-ascend"
    for hashed in (False, True):
        args = selfcheck._gate(9, 16, 4, hashed)(torch.Generator().manual_seed(6))
        with kernels.use_backend(b):
            ids, w = kernels.kernel_table()["moe_gate"](*args)
        rids, rw = ref_gate(*args)
        assert torch.equal(ids, rids) and ids.dtype == torch.int64
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    assert va.CALLS["moe_gating_top_k_hash"] == 2

    from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model

    from .test_npu_double import PROMPTS, _greedy, _route_seam_through_npu

    model = load_model(ensure_dummy_checkpoint("tiny"), ModelOptions(dtype=torch.float32))
    ref = _greedy(model, PROMPTS, 2)
    _route_seam_through_npu(monkeypatch)
    with kernels.use_backend(b):
        toks, logits = _greedy(model, PROMPTS, 2)
    assert va.CALLS["moe_gating_top_k_hash"] > 2  # every MoE layer, hash-routed and scored
    torch.testing.assert_close(logits, ref[1], rtol=1e-4, atol=1e-4)
    assert toks == ref[0]

