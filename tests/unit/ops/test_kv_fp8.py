"""FP8 KV-cache entry (kv_pack_fp8 / kv_unpack_fp8) and sparse_attn_fp8 (model-spec.md §10.2, §4.6, §8.5).

The codec is checked against the QAT simulation the model already runs (`ops.fp8_roundtrip(x, 64)`), against
hand-built bytes, and for its error messages; sparse_attn_fp8 against sparse_attn on the decoded pool.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ascend_v4.ops as ops
from ascend_v4.ops.reference import kv_fp8

OPS = torch.ops.ascend_v4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _awkward_rows(n: int, hd: int, g: torch.Generator) -> torch.Tensor:
    """Random rows with the blocks a codec gets wrong first: tiny amax (below the 1e-4 floor), all zero,
    negative zero, amax whose e4m3 image rounds down into the lower binade (230/448 of a power of two),
    exact powers of two, large values."""
    x = torch.randn(n, hd, generator=g) * torch.exp2(torch.randint(-12, 12, (n, 1), generator=g).float())
    x[0, :64] *= 1e-9
    x[1, 64:128] = 0.0
    x[1, 128:192] = -0.0
    x[2, :64] = torch.linspace(-1, 1, 64) * (230 / 448)
    x[2, 0] = 230 / 448  # amax / scale = 230 -> rounds to 224 in e4m3
    x[3, :64] = 2.0 ** torch.arange(-32, 32).float()
    x[4, 64:128] = 3e4 * torch.randn(64, generator=g)
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns (torch.equal calls -0.0 and 0.0 equal)."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


# ---------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("hd,rope,want", [
    (512, 64, 584),  # V4: 448 + 128 + 7 scales + 1 pad
    (128, 0, 136),  # no rope: 128 + 2 scales padded to 8
    (192, 64, 264),
    (640, 64, 720),  # 9 scales -> 16 bytes
])
def test_entry_bytes(hd, rope, want):
    assert ops.kv_fp8_entry_bytes(hd, rope) == want
    lay = ops.kv_fp8_layout(hd, rope)
    assert (lay.nope, lay.rope_offset, lay.scale_offset, lay.scales) == (hd - rope, hd - rope, hd + rope,
                                                                         (hd - rope) // 64)


def test_unpack_decodes_hand_built_entry():
    # head_dim 192, rope 64: 128 e4m3 bytes | 128 bf16 bytes | 2 scales + 6 pad = 264 bytes
    e = torch.zeros(1, 264, dtype=torch.uint8)
    e[0, :64] = 0x38  # e4m3 1.0 (exponent field 7)
    e[0, 64:128] = 0xC0  # e4m3 -2.0 (sign, exponent field 8)
    e[0, 65] = 0x01  # smallest subnormal, 2^-9
    e[0, 128:130] = torch.tensor([0xC0, 0x3F], dtype=torch.uint8)  # bf16 0x3FC0 = 1.5, low byte first
    e[0, 130:132] = torch.tensor([0x80, 0xBE], dtype=torch.uint8)  # bf16 0xBE80 = -0.25
    e[0, 256:258] = torch.tensor([129, 126], dtype=torch.uint8)  # scales 2^2 and 2^-1
    out = ops.kv_unpack_fp8(e, 192, 64, torch.float32)[0]
    assert out[:64].eq(4.0).all()
    assert out[64].item() == -1.0 and out[65].item() == 2.0 ** -10 and out[66:128].eq(-1.0).all()
    assert out[128].item() == 1.5 and out[129].item() == -0.25 and out[130:].eq(0).all()


def test_pack_writes_the_documented_bytes():
    x = torch.zeros(1, 192)
    x[0, :4] = torch.tensor([448.0, -1.0, 0.5, 2.0 ** -9])  # amax 448 -> scale 2^0 (byte 127)
    x[0, 64] = 3.0  # amax 3: 2^ceil(log2(3/448)) = 2^-7 -> byte 120, 3 / 2^-7 = 384 = e4m3 0x7C
    x[0, 128], x[0, 191] = 1.5, -0.25
    p = ops.kv_pack_fp8(x, 64)[0]
    assert p.shape == (264,)
    assert p[:4].tolist() == [0x7E, 0xB8, 0x30, 0x01] and p[4:64].eq(0).all()
    assert p[64].item() == 0x7C and p[65:128].eq(0).all()
    assert p[128:130].tolist() == [0xC0, 0x3F] and p[254:256].tolist() == [0x80, 0xBE]
    assert p[256:258].tolist() == [127, 120] and p[258:].eq(0).all()  # padding stays zero
    # an all-zero block gets the floor's scale: 2^ceil(log2(1e-4 / 448)) = 2^-22
    assert ops.kv_pack_fp8(torch.zeros(1, 192), 64)[0, 256].item() == 127 - 22


# ---------------------------------------------------------------------------------------------- QAT equivalence
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd,rope", [(512, 64), (192, 64), (128, 0)])
def test_unpack_of_pack_is_the_qat_roundtrip(dtype, hd, rope):
    x = _awkward_rows(40, hd, _gen(hd + rope)).to(dtype)
    nope = hd - rope
    packed = ops.kv_pack_fp8(x, rope)
    assert packed.dtype == torch.uint8 and packed.shape == (40, ops.kv_fp8_entry_bytes(hd, rope))
    out = ops.kv_unpack_fp8(packed, hd, rope, dtype)
    assert out.dtype == dtype
    assert torch.equal(_bits(out[:, :nope]), _bits(ops.fp8_roundtrip(x[:, :nope], 64)))  # -0.0 included
    assert torch.equal(out[:, nope:], x[:, nope:].to(torch.bfloat16).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_is_lossless_on_values_the_model_caches(dtype):
    # The model writes kv with fp8_roundtrip(nope, 64) applied and rope in bf16; the cache must return it
    # unchanged (the stored scale may be a smaller power of two than the round-trip's, the value is equal).
    x = _awkward_rows(64, 512, _gen(5)).to(dtype)
    y = torch.cat((ops.fp8_roundtrip(x[:, :448], 64), x[:, 448:].to(torch.bfloat16).to(dtype)), dim=-1)
    z = ops.kv_unpack_fp8(ops.kv_pack_fp8(y, 64), 512, 64, dtype)
    assert torch.equal(_bits(z), _bits(y))


def test_through_the_dispatcher_equals_the_eager_path():
    x = _awkward_rows(8, 512, _gen(6))
    p = OPS.kv_pack_fp8(x, 64)
    assert torch.equal(p, ops.kv_pack_fp8(x))
    assert torch.equal(OPS.kv_unpack_fp8(p, 512, 64, torch.bfloat16), ops.kv_unpack_fp8(p, 512))


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call,match", [
    (lambda: ops.kv_pack_fp8(torch.zeros(2, 512, dtype=torch.int32)), r"kv_pack_fp8: kv must be bf16"),
    (lambda: ops.kv_pack_fp8(torch.zeros(2, 3, 512)), r"kv_pack_fp8: kv must be \[N, head_dim\]"),
    (lambda: ops.kv_pack_fp8(torch.zeros(2, 500)), r"kv_pack_fp8: .*head_dim - rope_dim = 500 - 64 = 436"),
    (lambda: ops.kv_pack_fp8(torch.zeros(2, 64), 64), r"kv_pack_fp8: .*rope_dim must be in \[0, head_dim=64\)"),
    (lambda: ops.kv_pack_fp8(torch.zeros(2, 512), 64.0), r"kv_pack_fp8: rope_dim must be an int"),
    (lambda: ops.kv_unpack_fp8(torch.zeros(2, 576, dtype=torch.uint8), 512), r"packed must be \[N, 584\]"),
    (lambda: ops.kv_unpack_fp8(torch.zeros(2, 584, dtype=torch.int8), 512), r"packed must be uint8"),
    (lambda: ops.kv_unpack_fp8(torch.zeros(2, 584, dtype=torch.uint8), 512, 64, torch.int32),
     r"dtype must be bf16"),
    (lambda: ops.sparse_attn_fp8(torch.zeros(1, 2, 512), torch.zeros(4, 512, dtype=torch.bfloat16),
                                 torch.zeros(1, 3, dtype=torch.long), torch.zeros(2), 1.0),
     r"sparse_attn_fp8: kv must be uint8"),
    (lambda: ops.sparse_attn_fp8(torch.zeros(1, 2, 512), torch.zeros(4, 576, dtype=torch.uint8),
                                 torch.zeros(1, 3, dtype=torch.long), torch.zeros(2), 1.0),
     r"sparse_attn_fp8: kv must be \[N, 584\]"),
    (lambda: ops.sparse_attn_fp8(torch.zeros(1, 2, 512), torch.zeros(4, 584, dtype=torch.uint8),
                                 torch.zeros(1, 3), torch.zeros(2), 1.0), r"idx must be integer"),
    (lambda: ops.sparse_attn_fp8(torch.zeros(1, 2, 512), torch.zeros(4, 584, dtype=torch.uint8),
                                 torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), 1.0), r"idx must be \[T,K\]"),
    (lambda: ops.sparse_attn_fp8(torch.zeros(1, 2, 512), torch.zeros(4, 584, dtype=torch.uint8),
                                 torch.zeros(1, 3, dtype=torch.long), torch.zeros(3), 1.0), r"sink must be \[H=2\]"),
    (lambda: ops.sparse_attn_fp8(torch.zeros(1, 2, 500), torch.zeros(4, 584, dtype=torch.uint8),
                                 torch.zeros(1, 3, dtype=torch.long), torch.zeros(2), 1.0), r"sparse_attn_fp8: .*436"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ops.OpInputError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- sparse_attn_fp8
def _attn_case(T, H, hd, rope, N, K, seed, dtype=torch.float32):
    g = _gen(seed)
    q = torch.randn(T, H, hd, generator=g).to(dtype)
    pool = ops.kv_pack_fp8(torch.randn(N, hd, generator=g), rope)
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K).long()
    idx = idx.masked_fill(torch.rand(T, K, generator=g) < 0.25, -1)
    return q, pool, idx, torch.randn(H, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,hd,rope,N,K", [
    (5, 4, 512, 64, 300, 40),  # V4 entry, pool much larger than the rows used (gather path)
    (6, 3, 192, 64, 20, 16),  # small pool: most rows referenced (dense-run path)
    (300, 2, 128, 0, 50, 8),  # more queries than one 256-row chunk, no rope dims
])
def test_sparse_attn_fp8_equals_sparse_attn_on_decoded_pool(dtype, T, H, hd, rope, N, K):
    q, pool, idx, sink = _attn_case(T, H, hd, rope, N, K, T + hd, dtype)
    idx[0, K // 2:] = -1  # ragged row
    idx[1] = -1  # no valid key: sink only -> zeros
    scale = hd ** -0.5
    out = ops.sparse_attn_fp8(q, pool, idx, sink, scale, rope)
    want = ops.sparse_attn(q, ops.kv_unpack_fp8(pool, hd, rope, dtype), idx, sink, scale)
    assert out.shape == q.shape and out.dtype == dtype
    # Same decoded rows, same reference attention: the reference works on the distinct referenced rows in pool
    # order, so renumbering them into the gathered block changes no arithmetic.
    assert torch.equal(out, want)
    assert out[1].abs().max() == 0


def test_sparse_attn_fp8_int32_idx_all_empty_and_no_queries():
    q, pool, idx, sink = _attn_case(3, 2, 512, 64, 10, 4, 11)
    idx32 = idx.int()
    assert torch.equal(ops.sparse_attn_fp8(q, pool, idx32, sink, 0.1),
                       ops.sparse_attn(q, ops.kv_unpack_fp8(pool, 512, 64, torch.float32), idx, sink, 0.1))
    none = torch.full_like(idx, -1)
    assert ops.sparse_attn_fp8(q, pool, none, sink, 0.1).abs().max() == 0  # nothing referenced at all
    assert ops.sparse_attn_fp8(q, pool[:0], none, sink, 0.1).abs().max() == 0  # empty pool
    assert ops.sparse_attn_fp8(q[:0], pool, idx[:0], sink, 0.1).shape == (0, 2, 512)


def test_sparse_attn_fp8_decodes_only_referenced_entries():
    # Garbage (NaN scale bytes) in entries no query points at must not reach the output.
    q, pool, idx, sink = _attn_case(4, 2, 512, 64, 30, 6, 12)
    idx[:, :] = torch.tensor([0, 3, 7, -1, 9, 12])
    bad = pool.clone()
    untouched = torch.tensor([i for i in range(30) if i not in (0, 3, 7, 9, 12)])
    bad[untouched, 576:583] = 255  # UE8M0 255 = NaN
    out = ops.sparse_attn_fp8(q, bad, idx, sink, 0.1)
    assert torch.isfinite(out).all()
    assert torch.equal(out, ops.sparse_attn_fp8(q, pool, idx, sink, 0.1))


# ---------------------------------------------------------------------------------------------- registration
def _samples():
    q, pool, idx, sink = _attn_case(3, 2, 192, 64, 12, 5, 13)
    return [
        ("kv_pack_fp8", (torch.randn(5, 192, generator=_gen(14)), 64)),
        ("kv_pack_fp8", (torch.randn(5, 128, generator=_gen(15)).bfloat16(), 0)),
        ("kv_unpack_fp8", (ops.kv_pack_fp8(torch.randn(5, 192, generator=_gen(16))), 192, 64, torch.bfloat16)),
        ("kv_unpack_fp8", (ops.kv_pack_fp8(torch.randn(5, 192, generator=_gen(17))), 192, 64, torch.float32)),
        ("sparse_attn_fp8", (q, pool, idx, sink, 0.1, 64)),
        ("sparse_attn_fp8", (q.bfloat16(), pool, idx.int(), sink, 0.1, 64)),
    ]


SAMPLES = _samples()


@pytest.mark.parametrize("name,args", SAMPLES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SAMPLES)])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(OPS, name).default, args)


@pytest.mark.parametrize("name,args", SAMPLES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SAMPLES)])
def test_fake_impl_matches_reference_shapes(name, args):
    real = getattr(ops, name)(*args)
    mode = FakeTensorMode()
    with mode:
        fake = getattr(OPS, name)(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert (fake.shape, fake.dtype) == (real.shape, real.dtype)


def test_reference_module_is_the_registered_default():
    from ascend_v4.ops import _library

    assert _library.REFERENCE["sparse_attn_fp8"] is kv_fp8.sparse_attn_fp8
    assert {"kv_pack_fp8", "kv_unpack_fp8", "sparse_attn_fp8"} <= set(_library.ALL_OPS)
