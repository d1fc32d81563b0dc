"""The Ascend 950 native MX grouped GEMM (ops/ascendc/moe_gemm, tiling keys 11 / 12), checked on CPU:

* the golden (ops/reference/mx.py): exact MX scale exponents, MXFP8 activation quantisation, lossless weight
  conversion (FP4 widening, FP8 scale expansion), and how far it is from the dequant reference: equal up to
  fp32 summation order with the 1x128 activation round-trip (act_quant=True), ~2.7 % relative with none;
* constants shared by the Ascend C kernel and the Python tiling / golden (parsed from the kernel header);
* the A2/A3 dequant kernel's decode tables (op_kernel/moe_gemm_decode.h, compiled with the host g++) against
  torch's float8_e4m3fn and the FP4 table, and that the kernel compiled for A2/A3 names no fp8 / fp4 type;
* a CPU replay of the kernel's schedule (pre-pass, per-unit slabs as each vector core prepares its half, k tiles
  of whole MX blocks, fp32 accumulation) against the golden;
* the selection in ops/npu/kernels.py under the torch_npu test double: SoC id, ASCEND_V4_NPU_MX_GEMM, op library,
  K % 64, and the weight_fmt each path sends to `ascend_v4::npu_moe_gemm`.

None of this compiles or runs the Ascend C code (no CANN here): docs/npu.md lists it as written only.
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ascend_v4.ops.npu import kernels
from ascend_v4.ops.npu import tiling as tl
from ascend_v4.ops.npu._loader import OpLibrary
from ascend_v4.ops.reference import formats as fmt
from ascend_v4.ops.reference import gemm as ref_gemm
from ascend_v4.ops.reference import mx

ROOT = Path(__file__).resolve().parents[3]
MX_KERNEL = ROOT / "ops/ascendc/moe_gemm/op_kernel/moe_gemm_mx_kernel.h"
OP_KERNEL = MX_KERNEL.parent
DOUBLE = Path(__file__).with_name("double")
NO_LIB = OpLibrary(False, Path("/nonexistent/vendors/ascend_v4"), Path("/nonexistent/lib.so"), "not built (test)")
LIB = OpLibrary(True, Path("/model/vendors/ascend_v4"), Path("/model/lib.so"), "kernel model (test)")
CAPS950, CORES = tl.SOCS["ascend950"], 32


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _weights(E, N, K, fp4, g, scale=0.05):
    ws, ss = [], []
    for _ in range(E):
        q, s = (fmt.quant_fp4 if fp4 else fmt.quant_fp8_block)(torch.randn(N, K, generator=g) * scale)
        ws.append(q)
        ss.append(s)
    return ws, ss


# ------------------------------------------------------------------------------------------ the golden
def test_scale_exponent_is_the_smallest_power_of_two_covering_amax():
    g = torch.Generator().manual_seed(0)
    amax = torch.cat([torch.rand(4000, generator=g) * torch.logspace(-6, 6, 4000),
                      448 * torch.exp2(torch.arange(-20, 20).float()),  # exact powers: no rounding up
                      torch.nextafter(448 * torch.exp2(torch.arange(-20, 20).float()), torch.tensor(1e30)),
                      torch.tensor([0.0, 1e-9, 1e-4])])  # floored at 1e-4
    e = mx.mx_scale_exponent(amax).double()
    a = amax.double().clamp_min(1e-4) / 448  # exact in float64
    assert bool((torch.exp2(e) >= a).all()) and bool((torch.exp2(e - 1) < a).all())
    assert mx.mx_scale_exponent(torch.tensor([448.0, 449.0])).tolist() == [0, 1]


def test_quant_mxfp8_matches_the_qat_round_trip_at_block_32():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 512, generator=g) * torch.logspace(-8, 5, 512)
    x[3, :32] = 0  # an all-zero block: amax floor, zeros stay zeros
    for dt in (torch.float32, torch.bfloat16):
        q, s = mx.quant_mxfp8(x.to(dt))
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.uint8 and s.shape == (64, 16)
        assert bool((q.float().abs() <= 448).all())
        assert torch.equal(mx.dequant_mx(q, s), fmt.fp8_roundtrip(x.to(dt).float(), 32))
    assert mx.dequant_mx(*mx.quant_mxfp8(x))[3, :32].abs().sum() == 0


def test_1x32_requantisation_of_the_1x128_round_trip_is_exact():
    # why the MX kernel keeps the reference's act_quant numerics: each 1x32 scale <= its 1x128 scale
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 1024, generator=g) * torch.exp(4 * torch.randn(32, 1024, generator=g))
    for dt in (torch.float32, torch.bfloat16):
        r = fmt.fp8_roundtrip(x.to(dt), 128).float()
        assert torch.equal(mx.dequant_mx(*mx.quant_mxfp8(r)), r)


def test_weight_conversion_is_lossless():
    g = torch.Generator().manual_seed(3)
    assert torch.equal(mx.FP4_TO_E4M3_BYTES.view(torch.float8_e4m3fn).float(), fmt.FP4_LUT)
    (w4,), (s4,) = _weights(1, 96, 320, True, g)
    q, s = mx.mx_weight(w4, s4)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (96, 10)
    assert torch.equal(mx.dequant_mx(q, s), fmt.dequant_fp4(w4, s4))
    for n, k in ((256, 512), (200, 320)):  # whole 128x128 blocks, and ragged ones (K a multiple of 32 only)
        (w8,), (s8,) = _weights(1, n, k, False, g)
        q, s = mx.mx_weight(w8, s8)
        assert s.shape == (n, k // 32) and torch.equal(mx.dequant_mx(q, s), fmt.dequant_fp8_block(w8, s8))


def test_bad_inputs_name_the_wrong_thing():
    g = torch.Generator().manual_seed(4)
    (w4,), (s4,) = _weights(1, 64, 128, True, g)
    with pytest.raises(ValueError, match="quant_mxfp8: x"):
        mx.quant_mxfp8(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="FP4 scale must be"):
        mx.mx_weight(w4, s4[:, :2])
    with pytest.raises(ValueError, match="weight must be FP4"):
        mx.mx_weight(torch.zeros(64, 128), s4)
    with pytest.raises(ValueError, match="x has K=64"):
        mx.mx_gemm(torch.zeros(3, 64), w4, s4)
    with pytest.raises(ValueError, match="counts"):
        mx.mx_grouped_gemm(torch.zeros(3, 128), [w4], [s4], [4])


@pytest.mark.parametrize("fp4", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mx_golden_vs_dequant_reference(fp4, dtype):
    """Close, not equal, and by how much (docs/npu.md quotes these figures)."""
    g = torch.Generator().manual_seed(5 + fp4)
    (w,), (s,) = _weights(1, 512, 4096, fp4, g)
    x = (torch.randn(64, 4096, generator=g) * torch.exp(torch.randn(64, 1, generator=g))).to(dtype)
    plain, qat = ref_gemm.quant_gemm(x, w, s, False), ref_gemm.quant_gemm(x, w, s, True)
    # act_quant=True: the kernel re-quantises the round-tripped x exactly -> equal up to summation order
    y = mx.mx_gemm(fmt.fp8_roundtrip(x, 128), w, s)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(y, qat, **tol)
    # act_quant=False: the MX path adds an e4m3 rounding of the activations (3 mantissa bits)
    err = _rel(mx.mx_gemm(x, w, s), plain)
    assert 0.015 < err < 0.04, err
    # ... the same as the 1x128 QAT round-trip costs: e4m3 is a float format, its relative error does not
    # depend on the block scale except for elements that fall into e4m3's subnormal range
    assert abs(err - _rel(qat, plain)) < 1e-3


def test_mx_blocks_keep_small_sub_blocks_that_1x128_flushes():
    # where 1x32 and 1x128 differ: a 32-block 2^16 below its 128-block's amax is subnormal at 1x128
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, 1024, generator=g)
    x.view(32, -1, 32)[:, ::4] *= 2.0 ** 16
    small = torch.ones_like(x, dtype=torch.bool)
    small.view(32, -1, 32)[:, ::4] = False
    e32 = _rel(mx.dequant_mx(*mx.quant_mxfp8(x))[small], x[small])
    e128 = _rel(fmt.fp8_roundtrip(x, 128)[small], x[small])
    assert e32 < 0.03 and e128 > 0.2, (e32, e128)  # measured: 0.027 vs 0.28


# ------------------------------------------------------------------------------------------ kernel constants
def _header_int(name: str) -> int:
    m = re.search(rf"constexpr\s+\w+\s+{name}\s*=\s*([0-9]+)", MX_KERNEL.read_text())
    assert m, f"{name} not found in {MX_KERNEL}"
    return int(m.group(1))


def test_kernel_header_constants_match_python():
    text = MX_KERNEL.read_text()
    lut = re.search(r"E2M1_TO_E4M3\[16\]\s*=\s*\{([^}]*)\}", text)
    assert lut, "E2M1_TO_E4M3 not found"
    assert [int(v, 16) for v in lut.group(1).replace("\n", " ").split(",")] == mx.FP4_TO_E4M3_BYTES.tolist()
    assert _header_int("MX_BLOCK") == tl.MX_BLOCK == mx.MX_BLOCK
    assert _header_int("MX_ACT_ROWS") == tl.MX_ACT_ROWS and _header_int("MX_ACT_COLS") == tl.MX_ACT_COLS
    assert _header_int("MX_WIDEN_BYTES") == tl.MX_WIDEN_BYTES


def test_dequant_kernel_has_no_fp8_types():
    """Keys 1 / 2 are built for A2/A3, whose Cast has no fp8 / fp4 pairs (asc-devkit Cast.md): table decode only."""
    for name in ("moe_gemm_kernel.h", "moe_gemm_decode.h"):
        code = re.sub(r"//[^\n]*", "", (OP_KERNEL / name).read_text())  # comments may name the types
        assert not re.search(r"fp8_e\w+_t|fp4x2_\w+_t|hifloat8_t", code), name


def test_dequant_decode_tables_match_torch(tmp_path):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not installed: moe_gemm_decode.h cannot be compiled here")
    src = tmp_path / "decode.cpp"
    src.write_text('#include <cstdint>\n#include <cstdio>\n#include "moe_gemm_decode.h"\n'
                   'int main() { for (uint32_t b = 0; b < 256; ++b) std::printf("%u %u\\n", '
                   'ascend_v4::E4m3ToF32Bits(b), ascend_v4::Fp4PairF16Bits(b)); return 0; }\n')
    exe = tmp_path / "decode"
    r = subprocess.run([gxx, "-std=c++17", "-Wall", "-Werror", "-D__aicore__=", f"-I{OP_KERNEL}", str(src), "-o",
                        str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [tuple(map(int, ln.split())) for ln in subprocess.run([str(exe)], capture_output=True, text=True,
                                                                   timeout=60, check=True).stdout.splitlines()]
    assert len(rows) == 256
    f8, pairs = torch.tensor([r[0] for r in rows], dtype=torch.int64), torch.tensor([r[1] for r in rows])
    got8 = f8.to(torch.int32).view(torch.float32)  # bit patterns, wrapped to int32 first
    want8 = torch.arange(256).to(torch.uint8).view(torch.float8_e4m3fn).float()
    nan = torch.isnan(want8)
    assert nan.sum() == 2 and torch.equal(torch.isnan(got8), nan)
    assert torch.equal(got8[~nan], want8[~nan]) and torch.equal(got8.signbit(), want8.signbit())  # -0 kept
    lo = (pairs & 0xFFFF).to(torch.int16).view(torch.float16).float()
    hi = (pairs >> 16).to(torch.int16).view(torch.float16).float()
    b = torch.arange(256)
    for got, codes in ((lo, b & 0xF), (hi, b >> 4)):
        want = fmt.FP4_LUT[codes]
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


# ------------------------------------------------------------------------------------------ kernel replay
def _table_pairs() -> torch.Tensor:
    """The kernel's 256-entry table: byte -> (e4m3 of the low nibble, e4m3 of the high nibble)."""
    b = torch.arange(256)
    return torch.stack((mx.FP4_TO_E4M3_BYTES[b & 0xF], mx.FP4_TO_E4M3_BYTES[b >> 4]), -1)  # [256, 2] uint8


def _prepare_slab(w, s, fmt_id, n0, n, K):
    """(e4m3 [n, K], e8m0 [n, K/32]) of weight rows n0..n0+n as the two vector cores write them (halves)."""
    half = (n + 1) // 2
    parts = []
    for r0, r1 in ((0, half), (half, n)):
        rows = slice(n0 + r0, n0 + r1)
        if fmt_id == 12:  # widen FP4 bytes through the table; the stored 1x32 scales are used in place
            q = _table_pairs()[w[rows].view(torch.uint8).long()].reshape(r1 - r0, K)
            sc = s[rows].view(torch.uint8)
        else:  # FP8 bytes in place; each row's 128x128 block scales repeated over 4 MX blocks
            q = w[rows].view(torch.uint8)
            blk = torch.arange(n0 + r0, n0 + r1) // 128
            sc = s.view(torch.uint8)[blk].repeat_interleave(4, 1)[:, :K // 32]
        parts.append((q, sc))
    q = torch.cat([p[0] for p in parts]).view(torch.float8_e4m3fn)
    return q, torch.cat([p[1] for p in parts])


def mx_kernel_model(x, weight, scale, group_list, weight_fmt, scale_block_n, scale_block_k, out_dtype):
    """CPU replay of MoeGemmMxKernel (moe_gemm_mx_kernel.h) on the 950 tiling for CORES cube cores."""
    M, K = x.shape
    N, E = weight[0].shape[0], len(weight)
    name = {11: "fp8", 12: "fp4"}[weight_fmt]
    assert (scale_block_n, scale_block_k) == tl.SCALE_BLOCKS[name]
    t = tl.moe_gemm_mx_tiling(CAPS950, M, N, K, E, name, CORES)
    counts = group_list.tolist()
    t = tl.MoeGemmTiling(**{**t.__dict__, "E": E + 1})  # rows past the groups: the phantom group, never run
    xq, xs = mx.quant_mxfp8(x)  # the pre-pass (bf16 -> fp32 -> MXFP8), all rows
    a = mx.dequant_mx(xq, xs)
    y = torch.zeros(M, N, dtype=out_dtype)
    for u in tl.moe_gemm_schedule(t, counts + [M - sum(counts)]):
        if u.group == E:
            continue
        qb, sb = _prepare_slab(weight[u.group], scale[u.group], weight_fmt, u.col0, u.col1 - u.col0, K)
        b = mx.dequant_mx(qb, sb)
        acc = torch.zeros(u.row1 - u.row0, u.col1 - u.col0)
        for k0 in range(0, K, t.k_tile):  # L0C accumulation over k tiles of whole MX blocks, fp32
            acc += a[u.row0:u.row1, k0:k0 + t.k_tile] @ b[:, k0:k0 + t.k_tile].T
        y[u.row0:u.row1, u.col0:u.col1] = acc.to(out_dtype)
    return y


@pytest.mark.parametrize("fp4", [True, False])
def test_kernel_replay_matches_the_golden(fp4):
    g = torch.Generator().manual_seed(7)
    E, N, K = 6, 384, 512
    ws, ss = _weights(E, N, K, fp4, g)
    counts = [5, 0, 40, 1, 17, 3]
    x = torch.randn(sum(counts) + 4, K, generator=g).bfloat16()  # 4 phantom rows at the end
    y = mx_kernel_model(x, ws, ss, torch.tensor(counts), 12 if fp4 else 11, *tl.SCALE_BLOCKS["fp4" if fp4 else "fp8"],
                        torch.bfloat16)
    ref = mx.mx_grouped_gemm(x, ws, ss, counts)
    assert bool((y[-4:] == 0).all()) and bool((ref[-4:] == 0).all())
    # fp32 sums in another order, then one bf16 rounding: at most one bf16 ulp apart
    torch.testing.assert_close(y.float(), ref.float(), rtol=8e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------ selection

@pytest.fixture
def library(monkeypatch):
    """Stand-in for the compiled binding op `ascend_v4::npu_moe_gemm` (not built here): the MX replay above
    for weight_fmt 11 / 12, the dequant tile model of tests/unit/npu/_kernel_model.py for 0-2. Records fmts."""
    from . import _kernel_model

    seen: list[int] = []

    def npu_moe_gemm(x, weight, scale, group_list, weight_fmt, bn, bk, out_dtype):
        seen.append(weight_fmt)
        model = mx_kernel_model if weight_fmt >= tl.MOE_KEY_MX else _kernel_model.moe_gemm_model
        return model(x, weight, scale, group_list, weight_fmt, bn, bk, out_dtype)

    monkeypatch.setattr(torch.ops.ascend_v4, "npu_moe_gemm", npu_moe_gemm, raising=False)
    return seen


def _soc(monkeypatch, tnpu, soc):
    monkeypatch.setattr(tnpu.npu, "get_soc_version", lambda: soc)


def test_switch_parsing(monkeypatch):
    monkeypatch.delenv(kernels.MX_GEMM_ENV, raising=False)
    assert kernels.mx_gemm_requested() is tl.MX_KERNEL_READY is False  # written only: off by default
    for raw, want in (("1", True), (" 1 ", True), ("0", False), ("", False)):
        monkeypatch.setenv(kernels.MX_GEMM_ENV, raw)
        assert kernels.mx_gemm_requested() is want
    monkeypatch.setenv(kernels.MX_GEMM_ENV, "yes")
    with pytest.raises(ValueError, match="ASCEND_V4_NPU_MX_GEMM='yes'"):
        kernels.mx_gemm_requested()


def test_selection_matrix(tnpu, monkeypatch, caplog):
    monkeypatch.delenv(kernels.MX_GEMM_ENV, raising=False)
    for soc, lib, env in itertools.product((260, 223, 250), (LIB, NO_LIB), (None, "0", "1")):
        _soc(monkeypatch, tnpu, soc)
        if env is None:
            monkeypatch.delenv(kernels.MX_GEMM_ENV, raising=False)
        else:
            monkeypatch.setenv(kernels.MX_GEMM_ENV, env)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ascend_v4.ops"):
            b = kernels.make_backend(tnpu, lib)
        expect = soc >= 260 and lib.loaded and env == "1"
        assert b.soc_version == soc and b.mx_gemm == expect, (soc, lib.loaded, env)
        # a 950's torch_npu MX built-ins come first (torch_npu_mx.py); then our kernels as before
        ours = [c.backend for c in b.candidates("quant_gemm") if c.backend != "torch_npu-mx"]
        assert ours[0] == ("ascendc-mx" if expect else "ascendc" if lib.loaded else "fp8-free-reference")
        assert (b.choice("quant_gemm") == "torch_npu-mx") == (soc >= 260)
        assert b.choice("moe_experts").endswith("-mx") == expect
        msgs = [r.getMessage() for r in caplog.records]
        assert len(msgs) == (1 if (not lib.loaded or env == "1") else 0), msgs  # one line says why / what
        if lib.loaded and env == "1":
            assert ("never been run" in msgs[0]) == expect and ("not a 950" in msgs[0]) == (not expect)
    # the explicit config argument wins over the environment
    _soc(monkeypatch, tnpu, 260)
    monkeypatch.setenv(kernels.MX_GEMM_ENV, "1")
    assert not kernels.make_backend(tnpu, LIB, mx_requested=False).mx_gemm
    monkeypatch.delenv(kernels.MX_GEMM_ENV)
    assert kernels.make_backend(tnpu, LIB, soc=261, mx_requested=True).mx_gemm


def test_soc_version_without_a_device(tnpu, monkeypatch):
    assert kernels.soc_version(tnpu) == -1  # the double has no device

    def boom():
        raise RuntimeError("no device")

    monkeypatch.setattr(tnpu.npu, "get_soc_version", boom)
    assert kernels.soc_version(tnpu) == -1
    assert not kernels.make_backend(tnpu, LIB, mx_requested=True).mx_gemm


@pytest.mark.parametrize("fp4", [True, False])
def test_quant_gemm_sends_the_mx_variant_and_matches(tnpu, library, fp4, monkeypatch):
    monkeypatch.delattr(tnpu, "npu_dynamic_mx_quant")  # no torch_npu MX built-ins: our op library takes the call
    g = torch.Generator().manual_seed(8)
    (w,), (s,) = _weights(1, 384, 256, fp4, g)
    x = torch.randn(5, 256, generator=g).bfloat16()
    mx_b = kernels.make_backend(tnpu, LIB, soc=260, mx_requested=True)
    with kernels.use_backend(mx_b):
        y_qat = kernels.quant_gemm(x, w, s, True)
        y_plain = kernels.quant_gemm(x, w, s, False)
    assert library == [12 if fp4 else 11] * 2
    # act_quant: the reference's numerics (the 1x32 re-quantisation is exact); without: the MX golden
    torch.testing.assert_close(y_qat.float(), ref_gemm.quant_gemm(x, w, s, True).float(), rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(y_plain.float(), mx.mx_gemm(x, w, s).float(), rtol=8e-3, atol=1e-3)
    # the dequant variant on the same 950 when the switch is off, and for K % 64 != 0 even when it is on
    library.clear()
    with kernels.use_backend(kernels.make_backend(tnpu, LIB, soc=260, mx_requested=False)):
        kernels.quant_gemm(x, w, s, True)
    (w96,), (s96,) = _weights(1, 128, 96, True, g)
    with kernels.use_backend(mx_b):
        kernels.quant_gemm(torch.randn(3, 96, generator=g).bfloat16(), w96, s96, False)
    assert library == [2 if fp4 else 1, 2]


def test_moe_experts_through_the_mx_variant(tnpu, library):
    g = torch.Generator().manual_seed(9)
    T, D, I, E, k = 9, 256, 128, 8, 3
    x = torch.randn(T, D, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[1, 0] = -1  # experts of another EP rank
    ids[4] = -1
    wts = torch.rand(T, k, generator=g)
    w1, s1 = _weights(E, I, D, True, g)
    w3, s3 = _weights(E, I, D, True, g)
    w2, s2 = _weights(E, D, I, True, g)
    args = (x, ids, wts, w1, s1, w2, s2, w3, s3, 10.0)
    with kernels.use_backend(kernels.make_backend(tnpu, LIB, soc=260, mx_requested=True)):
        out = kernels.moe_experts(*args, True)
    assert library == [12, 12, 12] and tnpu.CALLS["npu_grouped_matmul"] == 0
    ref = ref_gemm.moe_experts(*args, True)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)  # the bf16 tolerance of the dequant library path
