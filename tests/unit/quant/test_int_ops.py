"""The appended integer ops: reference semantics, input checks, fake impls."""

from __future__ import annotations

import pytest
import torch

from ascend_v4 import ops
from ascend_v4.ops.reference.int_gemm import act_quant_int8, pack_int4_rows


def _data(m=5, n=64, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, 1, generator=g) * 0.01 + 1e-3
    return x, w, s


def test_w8a8_is_exact_integer_accumulation():
    x, w, s = _data()
    xq, a = act_quant_int8(x)
    acc = xq.long() @ w.long().t()  # exact
    want = acc.float() * a * s.t()
    assert torch.equal(ops.w8a8_gemm(x, w, s), want)
    assert torch.equal(xq, torch.round(x / a).clamp(-127, 127).to(torch.int8))


def test_w4a8_equals_w8a8_on_unpacked():
    x, _, _ = _data(seed=1)
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-8, 8, (64, 96), generator=g, dtype=torch.int8)
    s = torch.rand(64, 1, generator=g)
    assert torch.equal(ops.w4a8_gemm(x, pack_int4_rows(q), s), ops.w8a8_gemm(x, q, s))


def test_roundtrip_matches_gemm_numerics():
    x, w, s = _data(seed=3)
    dense = torch.nn.functional.linear(ops.int8_act_roundtrip(x), w.float() * s)
    torch.testing.assert_close(dense, ops.w8a8_gemm(x, w, s), rtol=1e-5, atol=1e-5)
    assert ops.int8_act_roundtrip(torch.zeros(2, 8)).abs().sum() == 0  # all-zero rows stay zero


def test_input_checks():
    x, w, s = _data()
    with pytest.raises(ops.OpInputError, match="w8a8_gemm.*x must be"):
        ops.w8a8_gemm(x[:, :10], w, s)
    with pytest.raises(ops.OpInputError, match="w_scale"):
        ops.w8a8_gemm(x, w, s.double())
    with pytest.raises(ops.OpInputError, match="w4a8_gemm.*int8"):
        ops.w4a8_gemm(x, w.float(), s)


def test_fake_impls_and_dispatch():
    x, w, s = _data()
    with torch.device("meta"):
        y = torch.ops.ascend_v4.w8a8_gemm(x.to("meta"), w.to("meta"), s.to("meta"))
    assert y.shape == (5, 64)
    p = pack_int4_rows(torch.zeros(64, 96, dtype=torch.int8))
    assert torch.ops.ascend_v4.w4a8_gemm(x, p, s).shape == (5, 64)
    torch.library.opcheck(torch.ops.ascend_v4.w8a8_gemm, (x, w, s), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.ascend_v4.int8_act_roundtrip, (x,), test_utils=("test_schema", "test_faketensor"))
