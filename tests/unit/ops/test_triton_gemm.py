"""Triton FP8/FP4 GEMM and grouped-MoE kernels, and their in-kernel format decoders, vs the references.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set only while this module imports
the kernels and while each test runs, by the fixture in conftest.py); on a CUDA machine they run compiled on the GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from ascend_v4.ops.reference import formats as fmt
from ascend_v4.ops.reference import gemm as ref
from ascend_v4.ops.triton import _interpret

try:  # imports triton itself under TRITON_INTERPRET=1 on CPU (the variable is restored afterwards)
    K, DEV = _interpret.kernel_modules()
    ISOLATED = None
except ImportError as e:
    pytest.skip(f"triton is not installed ({e}): pip install -e '.[test]'", allow_module_level=True)
except _interpret.InterpreterUnavailable as e:
    K, DEV, ISOLATED = None, torch.device("cpu"), str(e)

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}



if ISOLATED:  # triton was imported compiled before this module: run the whole module in a fresh process
    def test_isolated_rerun():
        _interpret.rerun_pytest_isolated(__file__)


if K is not None:  # small probe kernels around the device-side helpers
    import triton
    import triton.language as tl

    with _interpret.interpreter_env() if DEV.type == "cpu" else contextlib.nullcontext():
        @triton.jit
        def _decode_kernel(b_ptr, f8_ptr, f4_ptr, e8_ptr, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK)
            b = tl.load(b_ptr + o)
            tl.store(f8_ptr + o, K._common.fp8e4m3_to_f32(b))
            tl.store(f4_ptr + o, K._common.fp4e2m1_to_f32(b & 15))
            tl.store(e8_ptr + o, K._common.e8m0_to_f32(b))

        @triton.jit
        def _roundtrip_kernel(x_ptr, y_ptr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK_M)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
            tl.store(y_ptr + o, K._common.fp8_roundtrip_rows(tl.load(x_ptr + o)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- decoders
def test_format_decoders_exhaustive():
    b = torch.arange(256, dtype=torch.uint8)
    f8, f4, e8 = (torch.empty(256, device=DEV) for _ in range(3))
    _decode_kernel[(1,)](b.to(DEV), f8, f4, e8, BLOCK=256)
    f8, f4, e8 = f8.cpu(), f4.cpu(), e8.cpu()
    finite = (b & 0x7F) != 0x7F  # e4m3fn NaN patterns are not decoded (never in weights)
    assert torch.equal(f8[finite], b.view(torch.float8_e4m3fn).float()[finite])
    assert torch.equal(f4, fmt.FP4_LUT[(b & 15).long()])
    normal = (b > 0) & (b < 255)  # bytes 0 / 255 (2^-127, NaN) are documented exceptions
    assert torch.equal(e8[normal], fmt.e8m0_to_float(b)[normal])


def test_fp8_roundtrip_bit_exact():
    g = _gen(3)
    rows = 16
    x = torch.randn(rows, 128, generator=g) * torch.exp2(torch.randint(-30, 12, (rows, 1), generator=g).float())
    # ties: amax = 448 * 2^k fixes the scale at 2^k; midpoints between e4m3 neighbours (normal and subnormal)
    mids = torch.tensor([1.5 * 2 ** -9, 2.5 * 2 ** -9, 7.5 * 2 ** -9, 1.0625, 1.1875, 17.0, 19.0, 232.0, 0.5 + 2 ** -5])
    x[0, :mids.numel()] = mids * 4.0
    x[0, -1] = 448.0 * 4.0
    x[1] = 0.0  # amax floor
    x[2, :64] = 0.0
    y = torch.empty_like(x, device=DEV)
    _roundtrip_kernel[(1,)](x.to(DEV), y, BLOCK_M=rows, BLOCK=128)
    assert torch.equal(y.cpu(), fmt.fp8_roundtrip(x, 128))


# ---------------------------------------------------------------------------------------------- quant_gemm
def _quantise(w: torch.Tensor, fp4: bool):
    return fmt.quant_fp4(w) if fp4 else fmt.quant_fp8_block(w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
@pytest.mark.parametrize("act_quant", [False, True], ids=["w", "w+a"])
def test_quant_gemm(dtype, fp4, act_quant):
    g = _gen(10 + 2 * fp4 + act_quant)
    M, N, Kd = 5, 70, 256  # odd M and N, N not a multiple of the 128-row scale block
    x = torch.randn(M, Kd, generator=g).to(dtype)
    w, s = _quantise(0.05 * torch.randn(N, Kd, generator=g), fp4)
    out = K.gemm.quant_gemm(x.to(DEV), w.to(DEV), s.to(DEV), act_quant)
    want = ref.quant_gemm(x, w, s, act_quant)
    assert out.dtype == dtype and out.shape == (M, N)
    torch.testing.assert_close(out.cpu().float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("M,N,Kd,fp4,dtype,act_quant", [
    (1, 33, 96, False, torch.float32, False),  # decode row; K not a multiple of 128 (partial scale block)
    (1, 33, 96, True, torch.float32, False),
    (33, 130, 128, False, torch.bfloat16, True),  # two row tiles, two scale rows
])
def test_quant_gemm_shapes(M, N, Kd, fp4, dtype, act_quant):
    g = _gen(M * N + Kd)
    x = torch.randn(M, Kd, generator=g).to(dtype)
    w, s = _quantise(0.05 * torch.randn(N, Kd, generator=g), fp4)
    out = K.gemm.quant_gemm(x.to(DEV), w.to(DEV), s.to(DEV), act_quant)
    torch.testing.assert_close(out.cpu().float(), ref.quant_gemm(x, w, s, act_quant).float(), **TOL[dtype])


def test_quant_gemm_act_quant_needs_k_multiple_of_128():
    w, s = _quantise(torch.randn(16, 96), False)
    with pytest.raises(ValueError, match="divisible by 128"):
        K.gemm.quant_gemm(torch.randn(2, 96, device=DEV), w.to(DEV), s.to(DEV), True)


# ---------------------------------------------------------------------------------------------- moe_experts
def _experts(E: int, I: int, D: int, fp4: bool, seed: int, stacked: bool = False):
    g = _gen(seed)
    out = {}
    for name, shape in (("1", (I, D)), ("3", (I, D)), ("2", (D, I))):
        ws, ss = zip(*(_quantise(0.1 * torch.randn(*shape, generator=g), fp4) for _ in range(E)))
        if stacked:  # one [E, ...] buffer, the list holds views (the offset table sees a uniform stride)
            ws, ss = list(torch.stack(ws).to(DEV)), list(torch.stack(ss).to(DEV))
        out["w" + name], out["s" + name] = list(ws), list(ss)
    return out


def _moe(mod, x, ids, tw, W, act_quant, limit=10.0):
    return mod.moe_experts(x, ids, tw, W["w1"], W["s1"], W["w2"], W["s2"], W["w3"], W["s3"], limit, act_quant)


def _on(W):
    return {k: [t.to(DEV) for t in v] for k, v in W.items()}


def _check_moe(out, want, dtype):
    assert out.dtype == torch.float32 and out.shape == want.shape
    out = out.cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    else:
        # Under the interpreter the bf16 path matches bit for bit; on a GPU a different accumulation order
        # can flip a bf16 rounding of W1x / W3x / a, and then an fp8 re-quantisation downstream of it.
        err = (out - want).abs()
        assert err.max() <= 0.02 * want.abs().max()
        assert err.norm() <= 0.005 * want.norm()


@pytest.mark.parametrize("T,k,E,D,I,fp4,act_quant,dtype", [
    (7, 3, 5, 64, 96, True, False, torch.float32),
    (7, 3, 5, 64, 96, False, False, torch.float32),
    (6, 2, 4, 128, 128, True, True, torch.float32),
    (6, 2, 4, 128, 128, False, True, torch.bfloat16),
    (1, 6, 9, 64, 64, True, False, torch.bfloat16),  # decode: one token, six experts of nine
])
def test_moe_experts(T, k, E, D, I, fp4, act_quant, dtype):
    g = _gen(T * 100 + E * 10 + D)
    x = torch.randn(T, D, generator=g).to(dtype)
    ids = torch.randperm(E, generator=g)[:k].repeat(T, 1) if T == 1 else torch.randint(-1, E, (T, k), generator=g)
    if T > 1:
        ids[ids == 2] = 1  # expert 2 gets no token: an empty group
        ids[0] = -1  # a token all of whose experts live elsewhere
    tw = torch.rand(T, k, generator=g)
    W = _experts(E, I, D, fp4, seed=E + D)
    out = _moe(K.gemm, x.to(DEV), ids.to(DEV), tw.to(DEV), _on(W), act_quant)
    want = _moe(ref, x, ids, tw, W, act_quant)
    _check_moe(out, want, dtype)
    if T > 1:
        assert out[0].abs().max() == 0


def test_moe_experts_stacked_views_and_all_skipped():
    g = _gen(5)
    T, k, E, D, I = 4, 2, 3, 64, 64
    x, tw = torch.randn(T, D, generator=g), torch.rand(T, k, generator=g)
    ids = torch.randint(0, E, (T, k), generator=g)
    W = _experts(E, I, D, True, seed=9, stacked=True)
    out = _moe(K.gemm, x.to(DEV), ids.to(DEV), tw.to(DEV), W, False)
    want = _moe(ref, x, ids, tw, {n: [t.cpu() for t in v] for n, v in W.items()}, False)
    _check_moe(out, want, torch.float32)
    none = _moe(K.gemm, x.to(DEV), torch.full((T, k), -1, device=DEV), tw.to(DEV), W, False)
    assert none.abs().max() == 0 and none.shape == (T, D)


def test_moe_schedule_covers_every_pair_once():
    ids = torch.tensor([[3, -1], [0, 3], [3, 3], [-1, -1], [0, 7]])  # 7 >= E: not handled here either
    E, bm = 5, 2
    sched = {n: t.long() for n, t in K.gemm.moe_schedule(ids, E, bm).items()}
    assert sched["grp_count"].tolist() == [2, 0, 0, 4, 0]
    seen = []
    for b, e in enumerate(sched["blk_expert"].tolist()):
        if e < 0:
            continue
        rows = range(sched["blk_row0"][b], min(sched["blk_row0"][b] + bm, sched["grp_count"][e]))
        pairs = [int(sched["order"][sched["grp_start"][e] + r]) for r in rows]
        assert all(int(ids.view(-1)[p]) == e for p in pairs)
        seen += pairs
    assert sorted(seen) == [p for p, e in enumerate(ids.view(-1).tolist()) if 0 <= e < E]
