"""The ascend_v4:: custom ops as registered (schema, fake impl, reference) and sanity of the references.

`torch.library.opcheck` runs each op through its schema, autograd-registration, fake-tensor and
AOT-dispatch checks; the sanity tests compare each reference with a naive loop of the spec's formula
(model-spec.md §4.4–4.6, §5, §8), so the goldens the device kernels are tested against are themselves checked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import ascend_v4.ops as ops
from ascend_v4.ops.reference import formats as fmt

OPS = torch.ops.ascend_v4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _experts(E: int, I: int, D: int, fp4: bool, g: torch.Generator):
    q = fmt.quant_fp4 if fp4 else fmt.quant_fp8_block
    W = {n: [] for n in ("w1", "s1", "w2", "s2", "w3", "s3")}
    for _ in range(E):
        for name, shape in (("1", (I, D)), ("3", (I, D)), ("2", (D, I))):
            w, s = q(0.1 * torch.randn(*shape, generator=g))
            W["w" + name].append(w)
            W["s" + name].append(s)
    return W


def _samples():
    """(op name, args) with small inputs for every op."""
    g = _gen(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    T, H, D, N, K = 3, 4, 16, 10, 5
    idx = torch.randint(-1, N, (T, K), generator=g)
    w8, s8 = fmt.quant_fp8_block(0.1 * r(20, 128))
    w4, s4 = fmt.quant_fp4(0.1 * r(20, 64))
    W = _experts(3, 64, 32, True, g)
    n, Dm = 4, 8
    return [
        ("sparse_attn", (r(T, H, D), r(N, D), idx, r(H), D ** -0.5)),
        ("sparse_attn", (r(T, H, D).bfloat16(), r(N, D).bfloat16(), idx.int(), r(H), D ** -0.5)),
        ("indexer_topk", (r(T, 2, D), r(N, D), r(T, 2), torch.tensor([0, 0, 4]), torch.tensor([3, 0, 6]), 4)),
        ("compress_kv", (r(4, 8, D), r(4, 8, D))),
        ("quant_gemm", (r(2, 128), w8, s8, True)),
        ("quant_gemm", (r(2, 64).bfloat16(), w4, s4, False)),
        ("moe_experts", (r(4, 32), torch.tensor([[0, 2], [-1, 1], [2, 2], [0, -1]]), torch.rand(4, 2, generator=g),
                         W["w1"], W["s1"], W["w2"], W["s2"], W["w3"], W["s3"], 10.0, False)),
        ("hc_pre", (r(T, n, Dm), 0.1 * r((2 + n) * n, n * Dm), r((2 + n) * n), torch.rand(3, generator=g), 1e-6,
                    1e-6, 20)),
        ("hc_post", (r(T, Dm), r(T, n, Dm), torch.rand(T, n, generator=g), torch.rand(T, n, n, generator=g))),
        ("hc_head", (r(T, n, Dm), 0.1 * r(n, n * Dm), r(n), torch.rand(1, generator=g), 1e-6, 1e-6)),
        ("fp8_roundtrip", (r(3, 128), 128)),
        ("fp4_roundtrip", (r(3, 64), 32)),
        ("hadamard", (r(3, 16),)),
    ]


SAMPLES = _samples()


# opcheck's schema check (SchemaCheckMode) compares inputs with arithmetic that CPU torch lacks for
# float8_e4m3fn / float8_e8m0fnu, so ops taking packed weights skip that one check.
_FP8_INPUT_CHECKS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _has_fp8(args) -> bool:
    flat = [t for a in args for t in (a if isinstance(a, list) else [a])]
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu) for t in flat)


@pytest.mark.parametrize("name,args", SAMPLES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SAMPLES)])
def test_opcheck(name, args):
    kw = {"test_utils": _FP8_INPUT_CHECKS} if _has_fp8(args) else {}
    torch.library.opcheck(getattr(OPS, name).default, args, **kw)


@pytest.mark.parametrize("name,args", SAMPLES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SAMPLES)])
def test_fake_impl_matches_reference_shapes(name, args):
    real = getattr(ops, name)(*args)
    mode = FakeTensorMode()
    conv = lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
    fargs = [[conv(t) for t in a] if isinstance(a, list) else conv(a) for a in args]
    with mode:
        fake = getattr(OPS, name)(*fargs)
    for f, r in zip(*(x if isinstance(x, tuple) else (x,) for x in (fake, real))):
        assert (f.shape, f.dtype) == (r.shape, r.dtype)


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("N", [12, 400], ids=["dense-run", "gather"])  # both of the reference's code paths
def test_sparse_attn_matches_naive_softmax_with_sink(N):
    g = _gen(1)
    T, H, D, K = 300, 2, 8, 6  # T > the reference's 256-row chunk
    q, kv, sink = torch.randn(T, H, D, generator=g), torch.randn(N, D, generator=g), torch.randn(H, generator=g)
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)])  # distinct rows per query
    idx = idx.masked_fill(torch.rand(T, K, generator=g) < 0.3, -1)
    idx[5] = -1
    out = ops.sparse_attn(q, kv, idx, sink, 0.3)
    for t in (0, 5, 255, 256, 299):
        rows = kv[idx[t][idx[t] >= 0]]
        for h in range(H):
            logits = torch.cat([rows @ q[t, h] * 0.3, sink[h:h + 1]])
            p = torch.softmax(logits, 0)[:-1]  # the sink takes probability mass but has no value
            torch.testing.assert_close(out[t, h], p @ rows if len(rows) else torch.zeros(D))


def test_indexer_topk_matches_naive_ranking():
    g = _gen(2)
    T, h, d, N, topk = 260, 2, 8, 40, 6
    q, k, w = torch.randn(T, h, d, generator=g), torch.randn(N, d, generator=g), torch.randn(T, h, generator=g)
    k_start = torch.randint(0, 20, (T,), generator=g)
    k_len = torch.randint(0, 21, (T,), generator=g)
    out = ops.indexer_topk(q, k, w, k_start, k_len, topk)
    for t in (0, 1, 100, 255, 256, 259):
        rows = torch.arange(k_start[t], k_start[t] + k_len[t])
        score = (torch.relu(q[t] @ k[rows].T) * w[t][:, None]).sum(0)
        best = rows[score.argsort(descending=True)][:topk]
        want = torch.cat([best, torch.full((topk - len(best),), -1)])
        assert torch.equal(out[t], want)


def test_compress_kv_is_a_per_channel_softmax_pool():
    g = _gen(3)
    kv, score = torch.randn(2, 8, 5, generator=g), torch.randn(2, 8, 5, generator=g)
    score[1, :4] = float("-inf")  # unused slots
    out = ops.compress_kv(kv, score)
    for n in range(2):
        for c in range(5):
            wts = torch.softmax(score[n, :, c], 0)
            torch.testing.assert_close(out[n, c], (wts * kv[n, :, c]).sum())
    torch.testing.assert_close(out[1], ops.compress_kv(kv[1:, 4:], score[1:, 4:])[0])


# ---------------------------------------------------------------------------------------------- GEMMs
def test_arithmetic_fp4_rounding_equals_the_code_table_bit_for_bit():
    """round_to_fp4 (used by fp4_roundtrip) against bucketize + LUT (used by quant_fp4): every fp32 bit pattern
    of |x| <= 7 at a stride of 997 patterns, each decision midpoint and its two neighbours, signed zeros and
    subnormals; compared as bits (so -0.0 vs 0.0 counts)."""
    bits = torch.arange(0, 2 ** 32, 997, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = bits[torch.isfinite(bits) & (bits.abs() <= 7)]
    mids = torch.tensor([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5.0, 6.0])
    near = torch.cat([mids, torch.nextafter(mids, torch.full_like(mids, 9)), torch.nextafter(mids, -torch.ones(15))])
    x = torch.cat([x, near, -near, torch.tensor([-0.0, 0.0, 1e-40, -1e-40, 6.5, -6.5])])
    want = fmt.fp4_codes_to_float(fmt.float_to_fp4_codes(x))
    assert torch.equal(fmt.round_to_fp4(x).view(torch.int32), want.view(torch.int32))


def test_fp4_packing_is_low_nibble_first():
    w = torch.zeros(1, 16, dtype=torch.uint8)
    w[0, :2] = torch.tensor([0x21, 0x8F])  # codes 1, 2 | 15, 8
    s = torch.full((1, 1), 128, dtype=torch.uint8).view(torch.float8_e8m0fnu)  # scale 2 for the 1x32 run
    dense = fmt.dequant_fp4(w.view(torch.int8), s)
    assert dense[0, :4].tolist() == [1.0, 2.0, -12.0, -0.0] and not dense[0, 4:].any()


@pytest.mark.parametrize("fp4", [False, True])
def test_quant_gemm_equals_dense_matmul(fp4):
    g = _gen(4)
    w, s = (fmt.quant_fp4 if fp4 else fmt.quant_fp8_block)(torch.randn(24, 256, generator=g))
    dense = fmt.dequant_fp4(w, s) if fp4 else fmt.dequant_fp8_block(w, s)
    x = torch.randn(3, 256, generator=g)
    torch.testing.assert_close(ops.quant_gemm(x, w, s, False), x @ dense.T)
    torch.testing.assert_close(ops.quant_gemm(x, w, s, True), fmt.fp8_roundtrip(x, 128) @ dense.T)


def test_moe_experts_matches_per_token_loop():
    g = _gen(5)
    T, k, E, D, I, L = 5, 2, 4, 32, 64, 1.5  # small clamp limit so both clamps bite
    W = _experts(E, I, D, True, g)
    x, tw = torch.randn(T, D, generator=g), torch.rand(T, k, generator=g)
    ids = torch.tensor([[0, 3], [3, -1], [1, 1], [-1, -1], [2, 0]])
    out = ops.moe_experts(x, ids, tw, W["w1"], W["s1"], W["w2"], W["s2"], W["w3"], W["s3"], L, False)
    deq = lambda n, e: fmt.dequant_fp4(W["w" + n][e], W["s" + n][e])  # noqa: E731
    for t in range(T):
        want = torch.zeros(D)
        for j in range(k):
            e = int(ids[t, j])
            if e < 0:
                continue
            a = F.silu((deq("1", e) @ x[t]).clamp(max=L)) * (deq("3", e) @ x[t]).clamp(-L, L)
            want += deq("2", e) @ (a * tw[t, j])
        torch.testing.assert_close(out[t], want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- mHC
def test_hc_pre_spec_properties():
    g = _gen(6)
    T, n, D = 4, 4, 16
    x = torch.randn(T, n, D, generator=g)
    fn, base = 0.1 * torch.randn(24, n * D, generator=g), torch.randn(24, generator=g)
    scale = torch.rand(3, generator=g)
    y, post, comb = ops.hc_pre(x, fn, base, scale, 1e-6, 1e-6, 20)
    u = x.flatten(1)
    mix = (u @ fn.T) / torch.sqrt(u.square().mean(-1, keepdim=True) + 1e-6)
    pre = torch.sigmoid(mix[:, :n] * scale[0] + base[:n]) + 1e-6
    torch.testing.assert_close(y, (pre[:, :, None] * x).sum(1))
    torch.testing.assert_close(post, 2 * torch.sigmoid(mix[:, n:2 * n] * scale[1] + base[n:2 * n]))
    torch.testing.assert_close(comb.sum(-2), torch.ones(T, n), atol=1e-5, rtol=0)  # ends on columns
    torch.testing.assert_close(comb.sum(-1), torch.ones(T, n), atol=1e-3, rtol=0)  # ~doubly stochastic


def test_hc_post_sums_over_the_source_stream():
    g = _gen(7)
    f, res = torch.randn(2, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    post, comb = torch.rand(2, 3, generator=g), torch.rand(2, 3, 3, generator=g)
    out = ops.hc_post(f, res, post, comb)
    for t in range(2):
        for j in range(3):
            want = post[t, j] * f[t] + sum(comb[t, i, j] * res[t, i] for i in range(3))
            torch.testing.assert_close(out[t, j], want)


def test_hc_head_formula():
    g = _gen(8)
    x, fn = torch.randn(3, 4, 8, generator=g), 0.1 * torch.randn(4, 32, generator=g)
    base, scale = torch.randn(4, generator=g), torch.rand(1, generator=g)
    u = x.flatten(1)
    pre = torch.sigmoid((u @ fn.T) * torch.rsqrt(u.square().mean(-1, keepdim=True) + 1e-6) * scale + base) + 1e-6
    torch.testing.assert_close(ops.hc_head(x, fn, base, scale, 1e-6, 1e-6), (pre[:, :, None] * x).sum(1))


# ---------------------------------------------------------------------------------------------- round-trips
def test_roundtrips_are_idempotent_and_on_grid():
    x = torch.randn(4, 128, generator=_gen(9)) * 3
    y8 = ops.fp8_roundtrip(x, 128)
    assert torch.equal(ops.fp8_roundtrip(y8, 128), y8)
    y4 = ops.fp4_roundtrip(x, 32)
    assert torch.equal(ops.fp4_roundtrip(y4, 32), y4)
    runs = x.view(4, 4, 32).abs().amax(-1, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(runs / 6)))  # pow2 scale, rounded up
    assert torch.isin((y4.view(4, 4, 32) / scale).abs(), fmt.FP4_LUT.abs()).all()


def test_hadamard_is_orthonormal():
    x = torch.randn(3, 64, generator=_gen(10))
    y = ops.hadamard(x)
    torch.testing.assert_close(ops.hadamard(y), x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert ops.hadamard(torch.eye(4)).tolist() == [[0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5],
                                                   [0.5, 0.5, -0.5, -0.5], [0.5, -0.5, -0.5, 0.5]]
