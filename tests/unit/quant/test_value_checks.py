"""`ascend_v4.quant.value_checks`: the first bad element of raw tensor bytes, for every dtype, in any buffer type
and across chunk boundaries (the word test is cross-checked against a plain element-wise reference)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ascend_v4.quant import value_checks as vc
from ascend_v4.quant.value_checks import (NEVER_BAD, NonFiniteValueError, TensorValueChecker, check_chunk,
                                          check_tensor, e8m0_limit, find_bad)

TORCH = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
         "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
WIDTH = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def _raw(t: torch.Tensor) -> bytearray:
    return bytearray(t.contiguous().view(torch.uint8).numpy().tobytes())


def _reference_first(dtype: str, raw: bytes, scaled: str | None = None) -> int | None:
    """Element-wise reference: decode every element with torch and test it."""
    if not raw:
        return None
    u8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if dtype == "F8_E8M0":
        bad = u8 >= e8m0_limit(scaled)
    else:
        x = u8.view(TORCH[dtype]).double()
        bad = ~torch.isfinite(x)
    idx = torch.nonzero(bad)
    return int(idx[0, 0]) if idx.numel() else None


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 bytes, so short buffers span many word blocks."""
    monkeypatch.setattr(vc, "_BLOCK_BYTES", 64)


# ---------------------------------------------------------------------------------------------- per dtype
@pytest.mark.parametrize("dtype", ["F64", "F32", "BF16", "F16"])
@pytest.mark.parametrize("value,text", [(float("nan"), "nan"), (float("inf"), "+inf"), (float("-inf"), "-inf")])
def test_floats(dtype, value, text, small_blocks):
    for n in (1, 3, 37, 200):
        for pos in sorted({0, n // 2, n - 1}):
            t = torch.randn(n, dtype=torch.float64).to(TORCH[dtype])
            assert find_bad(dtype, _raw(t)) is None
            t[pos] = value
            if pos + 1 < n:
                t[-1] = value  # a later bad element must not win
            assert find_bad(dtype, _raw(t)) == (pos, text), (n, pos)


def test_float_extremes_are_finite():
    for dtype in ("F64", "F32", "BF16", "F16"):
        fi = torch.finfo(TORCH[dtype])
        t = torch.tensor([fi.max, -fi.max, fi.tiny, -fi.tiny, 0.0, -0.0, fi.smallest_normal / 4],
                         dtype=TORCH[dtype])
        assert find_bad(dtype, _raw(t)) is None, dtype


def test_f8_e4m3_nan_bytes(small_blocks):
    ok = bytes(b for b in range(256) if b & 0x7F != 0x7F)
    assert find_bad("F8_E4M3", ok) is None  # 448, -448, zeros, subnormals: every non-NaN code
    for nan in (0x7F, 0xFF):
        for pos in (0, 5, 8, 63, 64, 100):
            buf = bytearray([0x38] * 130)
            buf[pos] = nan
            buf[129] = 0x7F
            assert find_bad("F8_E4M3", buf) == (pos, f"nan (byte {nan:#04x})")


def test_f8_e5m2_inf_nan():
    t = torch.tensor([1.0, 57344.0, -57344.0, float("inf"), float("nan")], dtype=torch.float8_e5m2)
    assert find_bad("F8_E5M2", _raw(t[:3])) is None
    assert find_bad("F8_E5M2", _raw(t)) == (3, "+inf")
    assert find_bad("F8_E5M2", _raw(t[4:])) == (0, "nan")
    assert find_bad("F8_E5M2", bytes([0xFC])) == (0, "-inf")


def test_e8m0_limits_match_the_definition():
    """First bad byte: the smallest b with 2^(b-127) * max|format| not finite in bfloat16 (nor in float32 for
    the products that are exactly representable); byte 255 is NaN for every format."""
    assert (e8m0_limit("F8_E4M3"), e8m0_limit("I8"), e8m0_limit(None)) == (247, 253, 247)
    for scaled, fmax in (("F8_E4M3", 448.0), ("I8", 6.0), (None, 448.0)):
        lim = e8m0_limit(scaled)
        for b in range(255):
            prod = torch.tensor(2.0 ** (b - 127), dtype=torch.float64) * fmax
            assert bool(torch.isfinite(prod.to(torch.bfloat16))) == (b < lim), (scaled, b)
            assert bool(torch.isfinite(prod.float())) == (b < lim), (scaled, b)
    assert e8m0_limit("BF16") == e8m0_limit(None)  # not a format UE8M0 scales: the conservative bound


def test_e8m0_scales(small_blocks):
    good = bytearray(range(0, 247))
    assert find_bad("F8_E8M0", good) is None
    assert find_bad("F8_E8M0", good, scaled="I8") is None
    for scaled, lim in (("F8_E4M3", 247), ("I8", 253), (None, 247)):
        buf = bytearray(range(lim))  # every good byte
        assert find_bad("F8_E8M0", buf, scaled=scaled) is None
        for b in range(lim, 256):
            for pos in (0, 7, 8, 65, len(buf)):
                bad = bytearray(buf)
                bad.insert(pos, b)
                i, text = find_bad("F8_E8M0", bad, scaled=scaled)
                assert i == pos
                assert text == "nan (byte 0xff)" if b == 255 else f"byte {b:#04x}" in text and "overflows" in text
    assert find_bad("F8_E8M0", bytes([127, 250]), scaled="I8") is None  # 2^123 x 6 fits
    assert find_bad("F8_E8M0", bytes([127, 250]), scaled="F8_E4M3")[0] == 1  # 2^123 x 448 does not


def test_integer_dtypes_never_bad():
    buf = bytes([0xFF, 0x7F, 0x80, 0x7C] * 16)
    for dtype in sorted(NEVER_BAD):
        assert find_bad(dtype, buf) is None, dtype
    with pytest.raises(ValueError, match="unknown safetensors dtype"):
        find_bad("Q4_K", buf)


@pytest.mark.parametrize("dtype", ["F64", "F32", "BF16", "F16", "F8_E4M3", "F8_E5M2", "F8_E8M0"])
def test_random_bytes_match_reference(dtype, small_blocks):
    """Random bit patterns (bad values in every lane of a word, the top lane included)."""
    rng = random.Random(dtype)
    w = WIDTH[dtype]
    for trial in range(300):
        n = rng.randrange(0, 40) * w
        raw = bytearray(rng.getrandbits(8) for _ in range(n))
        if dtype != "F8_E8M0":  # make most elements finite so the first bad one lands anywhere
            for k in range(0, n, w):
                if rng.random() < 0.9:
                    raw[k + w - 1] &= 0x3F
        elif rng.random() < 0.5:
            raw = bytearray(b % 247 if rng.random() < 0.95 else b for b in raw)
        scaled = rng.choice([None, "F8_E4M3", "I8"]) if dtype == "F8_E8M0" else None
        got = find_bad(dtype, raw, scaled=scaled)
        assert (got[0] if got else None) == _reference_first(dtype, raw, scaled), (trial, raw.hex())


# ---------------------------------------------------------------------------------------------- buffers
def test_buffer_types_and_alignment(small_blocks):
    t = torch.randn(100).bfloat16()
    t[41] = float("nan")
    raw = _raw(t)
    for buf in (bytes(raw), raw, memoryview(raw), np.frombuffer(bytes(raw), dtype=np.uint8),
                np.frombuffer(raw, dtype=np.uint16), torch.frombuffer(raw, dtype=torch.uint8), t):
        assert find_bad("BF16", buf) == (41, "nan"), type(buf)
    # a slice whose storage does not start on a word boundary: head bytes, and a realigning copy
    u8 = torch.frombuffer(raw, dtype=torch.uint8)
    for start in range(0, 16, 2):
        assert find_bad("BF16", u8[start:]) == (41 - start // 2, "nan")
        assert find_bad("BF16", t[start // 2:]) == (41 - start // 2, "nan")
    f = torch.randn(50)
    f[17] = float("inf")
    assert find_bad("F32", f.view(torch.uint8)[4:]) == (16, "+inf")
    odd = torch.frombuffer(bytearray(b"\0\0") + _raw(f), dtype=torch.uint8)[2:]  # F32 at storage offset 2
    assert find_bad("F32", odd) == (17, "+inf")
    assert find_bad("F32", f.reshape(5, 10).t()) is not None  # non-contiguous: made contiguous first
    assert find_bad("BF16", b"") is None and find_bad("BF16", torch.empty(0)) is None
    with pytest.raises(ValueError, match="whole number"):
        find_bad("BF16", b"\x00\x00\x00")


# ---------------------------------------------------------------------------------------------- chunks, errors
def test_check_chunk_reports_the_tensor_index():
    t = torch.randn(6, 10).bfloat16()
    t[4, 7] = float("-inf")
    raw = _raw(t)
    check_chunk("BF16", raw[:80], tensor="x", first_element=0, shape=(6, 10))
    with pytest.raises(NonFiniteValueError) as ei:
        check_chunk("BF16", raw[80:], tensor="layers.3.attn_norm.weight", file="model-00002-of-00046.safetensors",
                    first_element=40, shape=(6, 10))
    e = ei.value
    assert isinstance(e, ValueError)
    assert (e.index, e.position, e.value, e.dtype) == (47, (4, 7), "-inf", "BF16")
    assert str(e) == "model-00002-of-00046.safetensors: layers.3.attn_norm.weight: element 47 [4, 7] is -inf (BF16)"
    n = torch.randn(32).bfloat16()
    n[17] = float("nan")
    with pytest.raises(NonFiniteValueError) as ei:
        check_tensor("BF16", n, tensor="layers.3.attn_norm.weight", file="model-00002-of-00046.safetensors")
    assert str(ei.value) == "model-00002-of-00046.safetensors: layers.3.attn_norm.weight: element 17 is nan (BF16)"
    with pytest.raises(NonFiniteValueError, match=r"w\.scale: element 5 \[1, 1\] is nan \(byte 0xff\) "
                                                  r"\(F8_E8M0 scale\)"):
        check_chunk("F8_E8M0", bytes([127, 127, 127, 127, 127, 255]), tensor="w.scale", shape=(2, 4),
                    first_element=0, scale_of="F8_E4M3")


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F8_E4M3", "F64"])
def test_streaming_chunks_split_anywhere(dtype, small_blocks):
    rng = random.Random(1)
    n = 500
    for trial in range(40):
        t = torch.randn(n, dtype=torch.float64).to(TORCH[dtype])
        pos = rng.randrange(n)
        t[pos] = float("nan")
        raw = _raw(t)
        cuts = sorted(rng.randrange(len(raw) + 1) for _ in range(rng.randrange(1, 12)))
        chk = TensorValueChecker(dtype, tensor="t", file="f.safetensors", shape=(n,))
        with pytest.raises(NonFiniteValueError) as ei:
            prev = 0
            for c in [*cuts, len(raw)]:
                chk.feed(raw[prev:c])
                prev = c
            chk.finish()
        assert ei.value.index == pos, (trial, cuts)
    # element-aligned 64-byte chunks through check_chunk with first_element
    t = torch.randn(n, dtype=torch.float64).to(TORCH[dtype])
    t[n - 3] = float("nan")
    raw, w = _raw(t), WIDTH[dtype]
    hits = []
    for off in range(0, len(raw), 64):
        try:
            check_chunk(dtype, raw[off:off + 64], tensor="t", first_element=off // w)
        except NonFiniteValueError as e:
            hits.append(e.index)
    assert hits == [n - 3]


def test_streaming_clean_and_partial():
    t = torch.randn(33).bfloat16()
    raw = _raw(t)
    chk = TensorValueChecker("BF16", tensor="t")
    for i in range(len(raw)):
        chk.feed(raw[i:i + 1])
    chk.finish()
    chk = TensorValueChecker("BF16", tensor="t")
    chk.feed(raw[:5])
    with pytest.raises(ValueError, match="whole number"):
        chk.finish()
    chk = TensorValueChecker("I8", tensor="t")  # never bad: bytes are only counted
    chk.feed(b"\xff" * 7)
    chk.finish()
    assert chk.bytes_seen == 7
