"""quant_gemm on the Ascend 950 through torch_npu's MX built-ins (ops/npu/torch_npu_mx.py), on CPU tensors through
the torch_npu double: its npu_dynamic_mx_quant follows ops-nn's aclnnDynamicMxQuant (the documented example, both
scale algorithms), the MX path equals the reference for FP8 and FP4 weights up to summation order, is chosen on
a 950 only, declines what it cannot compute, converts each weight once, and carries a model's linears."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ascend_v4 import ops
from ascend_v4.ops.npu import kernels, selfcheck, torch_npu_mx
from ascend_v4.ops.npu._loader import OpLibrary
from ascend_v4.ops.reference import formats as fmt
from ascend_v4.ops.reference.gemm import quant_gemm

NO_LIB = OpLibrary(False, Path("/nonexistent/vendors/ascend_v4"), Path("/nonexistent/lib.so"), "not built (test)")
ASCEND950, ASCEND910B = 260, 220


def _backend(tnpu, soc: int) -> kernels.Backend:
    b = kernels.make_backend(tnpu, NO_LIB, soc=soc, mx_requested=False)
    b.device = "cpu"
    return b


def test_the_double_follows_the_documented_example_and_both_scale_rules(tnpu):
    # aclnnDynamicMxQuant.md example: bf16 (0, 8, 64, 512) -> e4m3 bytes (0, 72, 96, 120), scale byte 128 (2^1)
    x = torch.tensor([[0.0, 8.0, 64.0, 512.0]], dtype=torch.bfloat16)
    for alg in (0, 1):
        y, s = tnpu.npu_dynamic_mx_quant(x, dst_type=torch.float8_e4m3fn, scale_alg=alg)
        assert y.view(torch.uint8).tolist() == [[0, 72, 96, 120]] and s.tolist() == [[[128, 0]]]
    # amax 500: OCP's 2^(floor(log2 500) - 8) = 1 leaves 500 > 448 (saturates); the rounded-up rule takes 2
    x = torch.tensor([[500.0] + [1.0] * 31], dtype=torch.bfloat16)
    y0, s0 = tnpu.npu_dynamic_mx_quant(x, dst_type=torch.float8_e4m3fn, scale_alg=0)
    y1, s1 = tnpu.npu_dynamic_mx_quant(x, dst_type=torch.float8_e4m3fn, scale_alg=1)
    assert (s0[0, 0, 0].item(), s1[0, 0, 0].item()) == (127, 128)
    # 500 -> 448 (10 % off) under OCP; 500 / 2 = 250 -> 256 on e4m3's step-16 grid there, i.e. 512 (2.4 % off)
    assert y0[0, 0].float().item() == 448.0 and y1[0, 0].float().item() == 256.0


def _within_one_bf16_step(got: torch.Tensor, want: torch.Tensor) -> bool:
    got, want = got.float(), want.float()
    return bool(((got - want).abs() <= want.abs() * 2.0 ** -7 + 1e-6).all())


@pytest.mark.parametrize("fp4", [False, True])
def test_mx_quant_gemm_equals_the_reference(tnpu, fp4, monkeypatch):
    g = torch.Generator().manual_seed(1)
    # within each 128-block of x the magnitudes span 2^-21 .. 1: the small 32-blocks fall into e4m3's subnormals
    # at the 1x128 scale (where 1x32 and 1x128 quantisation differ) and the block maxima test the scale rule; the
    # weight columns grow as x's shrink, so every column weighs in the product
    decay = torch.exp2(-(torch.arange(512) % 128) / 6.0)
    w32 = torch.randn(384, 512, generator=g) * 0.05 / decay
    w, s = fmt.quant_fp4(w32) if fp4 else fmt.quant_fp8_block(w32)
    x = (torch.randn(5, 512, generator=g) * decay).bfloat16()
    b = _backend(tnpu, ASCEND950)
    want = quant_gemm(x, w, s, True)
    with kernels.use_backend(b):
        got = torch_npu_mx.quant_gemm_mx(x, w, s, True)
        assert tnpu.CALLS["npu_dynamic_mx_quant"] == 1 and tnpu.CALLS["npu_quant_matmul"] == 1
        assert _within_one_bf16_step(got, want)  # equal up to summation order
        # the two things that make it so are both needed on these inputs (the test can fail):
        monkeypatch.setattr(torch_npu_mx, "SCALE_ALG_CEIL", 0)  # OCP's rule: block maxima saturate
        assert not _within_one_bf16_step(torch_npu_mx.quant_gemm_mx(x, w, s, True), want)
        monkeypatch.setattr(torch_npu_mx, "SCALE_ALG_CEIL", 1)
        monkeypatch.setattr(kernels, "fp8_roundtrip", lambda t, _block: t)  # no 1x128 round trip first
        assert not _within_one_bf16_step(torch_npu_mx.quant_gemm_mx(x, w, s, True), want)


def test_chosen_on_a_950_only_and_declines_what_it_cannot_compute(tnpu):
    b950, b910 = _backend(tnpu, ASCEND950), _backend(tnpu, ASCEND910B)
    assert b950.choice("quant_gemm") == "torch_npu-mx"
    assert b910.choice("quant_gemm") != "torch_npu-mx"
    assert "not an Ascend 950" in torch_npu_mx.usable(b910)
    w, s = fmt.quant_fp8_block(torch.randn(256, 256) * 0.05)
    x = torch.randn(3, 256).bfloat16()
    assert torch_npu_mx.accepts(x, w, s, True)
    assert not torch_npu_mx.accepts(x, w, s, False)  # no activation quantisation: the MX product would add one
    assert not torch_npu_mx.accepts(x.float(), w, s, True)
    assert not torch_npu_mx.accepts(torch.randn(3, 192).bfloat16(), *fmt.quant_fp8_block(torch.randn(64, 192)), True)
    with kernels.use_backend(b950):
        b950.run("quant_gemm", x, w, s, False)  # declined: the next candidate (the FP8-free reference) runs it
        assert tnpu.CALLS["npu_dynamic_mx_quant"] == 0
        b950.run("quant_gemm", x, w, s, True)
        b950.run("quant_gemm", x, w, s, True)
    assert tnpu.CALLS["npu_dynamic_mx_quant"] == 2
    assert torch_npu_mx.prepared_weight(w, s)[0] is torch_npu_mx.prepared_weight(w, s)[0]  # converted once


def test_the_self_check_passes_it_at_real_shapes(tnpu):
    b = _backend(tnpu, ASCEND950)
    rows = {(r.op, r.backend): r for r in selfcheck.check_backend(b, ("small", "real"))}
    row = rows["quant_gemm", "torch_npu-mx"]
    assert row.status == "pass" and "fp8 M16 N4096 K4096" in row.detail and "fp4 M16 N2048 K4096" in row.detail
    assert b.choice("quant_gemm") == "torch_npu-mx"


def test_a_models_linears_run_on_it(tnpu, monkeypatch):
    from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model

    from .test_npu_double import PROMPTS, _greedy

    model = load_model(ensure_dummy_checkpoint("tiny"), ModelOptions(dtype=torch.bfloat16))
    ref_toks, _ = _greedy(model, PROMPTS, 2)
    npu = kernels.kernel_table()["quant_gemm"]
    worst = []

    def checked(x, w, s, act_quant):
        out = npu(x, w, s, act_quant)
        want = quant_gemm(x, w, s, act_quant).float()
        worst.append(((out.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item())
        return out

    monkeypatch.setitem(ops._CPU, "quant_gemm", checked)  # what PrivateUse1 dispatch does on a device
    with kernels.use_backend(_backend(tnpu, ASCEND950)):
        _greedy(model, PROMPTS, 2, forced=ref_toks)
    assert len(worst) > 20 and tnpu.CALLS["npu_dynamic_mx_quant"] == len(worst)  # every quant_gemm call took it
    assert max(worst) < 2.0 ** -7, max(worst)  # one bf16 step of the largest output


def test_the_activation_round_trip_is_idempotent_so_on_grid_inputs_may_take_it_again():
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(64, 512, generator=g) * torch.logspace(-6, 3, 512)).bfloat16()
    once = fmt.fp8_roundtrip(x, 128)
    assert torch.equal(fmt.fp8_roundtrip(once, 128), once)
    assert torch.equal(kernels.fp8_roundtrip(once, 128), once)  # the NPU's float-only round trip too
    w, s = fmt.quant_fp8_block(torch.randn(256, 512, generator=g) * 0.05)
    assert torch.equal(quant_gemm(once, w, s, True), quant_gemm(once, w, s, False))
