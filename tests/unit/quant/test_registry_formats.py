"""Format registry and the tensor formats: layouts, fast (table) paths == generic float paths, exactness of the
BF16 expansion and of the FP4 -> FP8 recast, error bounds of the int formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ascend_v4.ops.reference.formats import dequant_fp4, quant_fp4, quant_fp8_block
from ascend_v4.ops.reference.int_gemm import pack_int4_rows, unpack_int4_rows
from ascend_v4.quant import DuplicateFormatError, UnknownFormatError, format_names, get_format, register_format
from ascend_v4.quant.formats.fp8_recast import LossyRecastError, recast_fp4_to_fp8
from ascend_v4.quant.formats.int8_channel import quantize_dense
from ascend_v4.quant.verify import expected_max_rel, linear_error


def _fp4(o=256, i=512, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, generator=g) * i ** -0.5
    w = w * torch.exp2(spread * torch.randn(o, i // 32, generator=g)).repeat_interleave(32, 1)  # scales vary
    p, s = quant_fp4(w)
    return {"weight": p, "scale": s}


def test_registry():
    assert set(format_names()) >= {"fp8_block", "fp4_mx", "bf16", "int8_channel", "int4_channel"}
    with pytest.raises(DuplicateFormatError, match="int8_channel"):
        @register_format("int8_channel")
        class Again:  # noqa: F841
            pass
    with pytest.raises(UnknownFormatError, match="registered"):
        get_format("int3")
    for name in format_names():  # every format module documents its scale layout
        doc = __import__(type(get_format(name)).__module__, fromlist=["x"]).__doc__
        assert "Scale layout" in doc, name


def test_layouts_ascend_v1():
    lay = get_format("int8_channel").layout(512, 256)
    assert {k: (v.shape, v.st_dtype) for k, v in lay.items()} == {
        "weight": ((512, 256), "I8"), "weight_scale": ((512, 1), "F32"), "weight_offset": ((512, 1), "F32")}
    up = get_format("int4_channel").layout(512, 256)
    down = get_format("int4_channel").layout(512, 256, down=True)
    assert up["weight"].shape == (256, 256) and up["scale_bias"].shape == (512, 1)
    assert down["scale_bias"].shape == (512, 16)


@pytest.mark.parametrize("dst", ["int8_channel", "int4_channel"])
def test_fp4_table_path_equals_dense_path(dst):
    src = _fp4()
    fp4, bf16 = get_format("fp4_mx"), get_format("bf16")
    fast = get_format(dst).convert(fp4, src, down=True)
    dense = fp4.dequantize(src)
    slow = get_format(dst).convert(bf16, {"weight": dense.to(torch.bfloat16)}, down=True)  # exact in bf16
    for k in fast:
        assert torch.equal(fast[k], slow[k]), k
    if dst == "int8_channel":
        q, amax = quantize_dense(dense)
        assert torch.equal(q, fast["weight"])


def test_int_error_bounds():
    src = _fp4(seed=1)
    ref = get_format("fp4_mx").dequantize(src)
    for dst, l2_max in (("int8_channel", 0.02), ("int4_channel", 0.2)):
        got = get_format(dst).dequantize(get_format(dst).convert(get_format("fp4_mx"), src))
        mx, mean, l2 = linear_error(ref, got)
        assert mx <= expected_max_rel(dst), (dst, mx)
        assert 0 < l2 < l2_max, (dst, l2)
    # the clip search beats plain min-max int4
    amax = ref.abs().amax(1, keepdim=True)
    minmax = torch.round(ref * 7 / amax).clamp(-8, 7) * amax / 7
    got = get_format("int4_channel").dequantize(get_format("int4_channel").convert(get_format("fp4_mx"), src))
    assert linear_error(ref, got)[2] < 0.9 * linear_error(ref, minmax)[2]


def test_int4_packing_and_scale_bias():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (6, 32), generator=g, dtype=torch.int8)
    p = pack_int4_rows(q)
    assert p.shape == (3, 32) and torch.equal(unpack_int4_rows(p), q)
    b = p.view(torch.uint8)
    assert torch.equal((b & 15).to(torch.int8), q[0::2] & 15) and torch.equal((b >> 4).to(torch.int8), q[1::2] & 15)
    from ascend_v4.quant.formats.int4_channel import pack

    scale = np.linspace(0.1, 0.6, 6).astype(np.float32)
    t = pack(q, scale, down=True)
    want = 8 * torch.from_numpy(scale)[:, None].double() * q.double().reshape(6, 16, 2).sum(-1)
    torch.testing.assert_close(t["scale_bias"].double(), want)
    assert torch.equal(t["weight_offset"], torch.zeros(6, 1))


def test_bf16_and_fp8_sources_exact():
    src = _fp4(seed=2)
    ref = get_format("fp4_mx").dequantize(src)
    assert torch.equal(get_format("bf16").convert(get_format("fp4_mx"), src)["weight"].float(), ref)
    w = torch.randn(384, 256, generator=torch.Generator().manual_seed(3))
    wq, ws = quant_fp8_block(w)
    f8 = {"weight": wq, "scale": ws}
    assert torch.equal(get_format("bf16").convert(get_format("fp8_block"), f8)["weight"].float(),
                       get_format("fp8_block").dequantize(f8))


@pytest.mark.parametrize("shape", [(256, 512), (200, 96)])  # full and partial 128x128 blocks
def test_fp8_recast_is_lossless(shape):
    src = _fp4(*shape, seed=4, spread=2.0)
    w, s = recast_fp4_to_fp8(src["weight"], src["scale"])
    assert w.dtype == torch.float8_e4m3fn and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    out = get_format("fp8_block").dequantize({"weight": w, "scale": s})
    assert torch.equal(out, dequant_fp4(src["weight"], src["scale"]))


def test_fp8_recast_refuses_lossy_blocks():
    src = _fp4(128, 128, seed=5)
    s = src["scale"].view(torch.uint8).clone()
    s[0, 0] = s.max() + 20  # one run 20 binades above the others in its block
    with pytest.raises(LossyRecastError, match="not exact"):
        recast_fp4_to_fp8(src["weight"], s.view(torch.float8_e8m0fnu))


def test_fp8_table_path_equals_dense_path():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(300, 256, generator=g) * torch.exp2(3 * torch.randn(300, 1, generator=g))
    wq, ws = quant_fp8_block(w)
    src = {"weight": wq, "scale": ws}
    fast = get_format("int8_channel").convert(get_format("fp8_block"), src)
    q, amax = quantize_dense(get_format("fp8_block").dequantize(src))
    assert torch.equal(fast["weight"], q)
    assert torch.equal(fast["weight_scale"], torch.from_numpy(amax / np.float32(127)).reshape(-1, 1))


def test_fp8_to_bf16_table_path_equals_reference():
    from ascend_v4.ops.reference.formats import dequant_fp8_block
    from ascend_v4.quant.formats.bf16 import fp8_to_bf16

    g = torch.Generator().manual_seed(8)
    finite = torch.arange(256, dtype=torch.uint8)
    finite = finite[(finite & 0x7F) != 0x7F]  # every non-NaN e4m3 byte
    rows = 128 * 32
    w = finite[torch.randint(0, len(finite), (rows, 256), generator=g)]
    s = torch.arange(0, 256, 4, dtype=torch.uint8)[:rows // 128 * 2].view(-1, 2)  # scales 2^-127 .. 2^124, and NaN-free
    for wt, st in [(w, s), (w, s.clamp(min=10)), (w[:200], s[:2].clamp(min=10))]:
        wq, sq = wt.view(torch.float8_e4m3fn), st.view(torch.float8_e8m0fnu)
        want = dequant_fp8_block(wq, sq, torch.bfloat16)
        assert torch.equal(fp8_to_bf16(wq, sq).view(torch.int16), want.view(torch.int16))
    w[3, 7] = 0x7F  # a NaN byte: the reference path (NaN bits of torch's bf16 cast depend on vector position)
    out = fp8_to_bf16(w.view(torch.float8_e4m3fn), s.clamp(min=10).view(torch.float8_e8m0fnu))
    assert out[3, 7].isnan() and not out[:3].isnan().any()
