"""Triton attention kernels (sparse_attn, indexer_topk, compress_kv) vs the reference goldens.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set only while this module imports
the kernels and while each test runs, by the fixture in conftest.py); on a CUDA machine they run compiled on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from ascend_v4.ops.reference import attention as ref
from ascend_v4.ops.triton import _interpret

try:  # imports triton itself under TRITON_INTERPRET=1 on CPU (the variable is restored afterwards)
    K, DEV = _interpret.kernel_modules()
    ISOLATED = None
except ImportError as e:
    pytest.skip(f"triton is not installed ({e}): pip install -e '.[test]'", allow_module_level=True)
except _interpret.InterpreterUnavailable as e:
    K, DEV, ISOLATED = None, torch.device("cpu"), str(e)

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}



if ISOLATED:  # triton was imported compiled before this module: run the whole module in a fresh process
    def test_isolated_rerun():
        _interpret.rerun_pytest_isolated(__file__)


def _close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == want.shape and out.dtype == want.dtype
    torch.testing.assert_close(out.float().cpu(), want.float().cpu(), **TOL[dtype])


# ---------------------------------------------------------------------------------------------- sparse_attn
def _distinct_idx(T: int, N: int, Kn: int, g: torch.Generator) -> torch.Tensor:
    # Distinct rows per query (as the model produces: window rows and compressed rows never repeat), about
    # a fifth of the slots empty (-1).
    idx = torch.stack([torch.randperm(N, generator=g)[:Kn] for _ in range(T)])
    return idx.masked_fill(torch.rand(T, Kn, generator=g) < 0.2, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,D,N,Kn", [
    (2, 16, 64, 40, 40),  # decode-like: one query per row, 16 heads (one head block)
    (3, 5, 40, 20, 13),  # odd heads / head dim / index count
    (6, 20, 24, 300, 70),  # prefill-like rows, two head blocks, more indices than one BLOCK_K
])
def test_sparse_attn(dtype, T, H, D, N, Kn):
    g = torch.Generator().manual_seed(T * 1000 + H * 10 + D)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    kv = torch.randn(N, D, generator=g).to(dtype)
    idx = _distinct_idx(T, N, Kn, g)
    idx[0, Kn // 2:] = -1  # a ragged row (padding at the end, as in decode)
    idx[-1] = -1  # a row with no valid key: only the sink -> zeros
    sink = torch.randn(H, generator=g)
    scale = D ** -0.5
    out = K.attention.sparse_attn(q.to(DEV), kv.to(DEV), idx.to(DEV), sink.to(DEV), scale)
    _close(out, ref.sparse_attn(q, kv, idx, sink, scale), dtype)
    assert out[-1].abs().max() == 0


def test_sparse_attn_int32_idx_and_empty():
    g = torch.Generator().manual_seed(7)
    q, kv = torch.randn(2, 3, 16, generator=g), torch.randn(5, 16, generator=g)
    idx = torch.tensor([[0, 4, -1], [2, -1, 1]], dtype=torch.int32)
    sink = torch.zeros(3)
    out = K.attention.sparse_attn(q.to(DEV), kv.to(DEV), idx.to(DEV), sink.to(DEV), 0.25)
    _close(out, ref.sparse_attn(q, kv, idx, sink, 0.25), torch.float32)
    empty = K.attention.sparse_attn(q[:0].to(DEV), kv.to(DEV), idx[:0].to(DEV), sink.to(DEV), 0.25)
    assert empty.shape == (0, 3, 16)


# ---------------------------------------------------------------------------------------------- indexer_topk
def _dense_scores(q, k, w, k_start, k_len):
    # Full [T, N] score matrix with -inf outside each query's range (fine at test sizes).
    s = torch.einsum("ths,th->ts", torch.relu(torch.einsum("thd,sd->ths", q.float(), k.float())), w.float())
    pos = torch.arange(k.shape[0])
    ok = (pos >= k_start[:, None]) & (pos < (k_start + k_len)[:, None])
    return s.masked_fill(~ok, float("-inf"))


def _check_topk(out, q, k, w, k_start, k_len, topk, dtype):
    want = ref.indexer_topk(q, k, w, k_start, k_len, topk)
    out = out.cpu()
    assert out.shape == want.shape and out.dtype == torch.long
    # Same padding; the selected rows lie in range, are distinct, and carry the best scores (ties and
    # near-ties may pick different rows, so compare the scores, not the row numbers).
    assert torch.equal(out < 0, want < 0)
    dense = _dense_scores(q, k, w, k_start, k_len)
    for t in range(out.shape[0]):
        sel = out[t][out[t] >= 0]
        assert ((sel >= k_start[t]) & (sel < k_start[t] + k_len[t])).all()
        assert sel.unique().numel() == sel.numel()
        got, exp = dense[t, sel], dense[t, want[t][want[t] >= 0]]
        torch.testing.assert_close(got, exp, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_topk_decode_batch(dtype):
    # Four sequences packed in one key buffer, one query each; one empty, one shorter than topk.
    g = torch.Generator().manual_seed(11)
    h, d, N, topk = 5, 24, 150, 16
    k_start = torch.tensor([0, 40, 40, 100])
    k_len = torch.tensor([40, 0, 9, 50])
    q = torch.randn(4, h, d, generator=g).to(dtype)
    k = torch.randn(N, d, generator=g).to(dtype)
    w = torch.randn(4, h, generator=g).to(dtype)
    out = K.attention.indexer_topk(q.to(DEV), k.to(DEV), w.to(DEV), k_start.to(DEV), k_len.to(DEV), topk)
    _check_topk(out, q, k, w, k_start, k_len, topk, dtype)
    assert (out[1] == -1).all() and (out[2, 9:] == -1).all() and (out[2, :9] >= 40).all()


def test_indexer_topk_prefill_causal_chunked(monkeypatch):
    # One sequence, causal ranges (t + 1) // 4 as in CSA; a tiny score budget forces several query chunks.
    monkeypatch.setattr(K.attention, "_SCORE_BUFFER_ELEMS", 40)
    g = torch.Generator().manual_seed(12)
    T, h, d, topk = 33, 3, 16, 5
    n_ent = (T + 1) // 4
    q = torch.randn(T, h, d, generator=g)
    k = torch.randn(n_ent, d, generator=g)
    w = torch.rand(T, h, generator=g)
    k_start = torch.zeros(T, dtype=torch.long)
    k_len = (torch.arange(T) + 1) // 4
    out = K.attention.indexer_topk(q.to(DEV), k.to(DEV), w.to(DEV), k_start.to(DEV), k_len.to(DEV), topk)
    _check_topk(out, q, k, w, k_start, k_len, topk, torch.float32)
    assert (out[:3] == -1).all()  # no complete window yet


def test_indexer_topk_ties_pick_the_lower_row():
    # Small integers: every score is exact whatever the summation order, and most of them tie.
    g = torch.Generator().manual_seed(13)
    q = torch.randint(-2, 3, (3, 2, 16), generator=g).float()
    w = torch.randint(1, 3, (3, 2), generator=g).float()
    k = torch.randint(-1, 2, (5, 16), generator=g).float().repeat(4, 1)  # every key four times
    k_start, k_len = torch.tensor([0, 3, 0]), torch.tensor([20, 17, 9])
    out = K.attention.indexer_topk(q.to(DEV), k.to(DEV), w.to(DEV), k_start.to(DEV), k_len.to(DEV), 8)
    assert torch.equal(out.cpu(), ref.indexer_topk(q, k, w, k_start, k_len, 8))


def test_indexer_topk_degenerate():
    q, k, w = torch.randn(2, 2, 16), torch.randn(4, 16), torch.randn(2, 2)
    z = torch.zeros(2, dtype=torch.long)
    assert (K.attention.indexer_topk(q.to(DEV), k.to(DEV), w.to(DEV), z.to(DEV), z.to(DEV), 3) == -1).all()
    assert K.attention.indexer_topk(q.to(DEV), k.to(DEV), w.to(DEV), z.to(DEV), z.to(DEV) + 4, 0).shape == (2, 0)


# ---------------------------------------------------------------------------------------------- compress_kv
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,L,d", [(5, 8, 33), (2, 128, 20)])
def test_compress_kv(dtype, N, L, d):
    g = torch.Generator().manual_seed(N * L + d)
    kv = torch.randn(N, L, d, generator=g).to(dtype)
    score = (3 * torch.randn(N, L, d, generator=g)).to(dtype)
    if L == 8:
        score[0, :4] = float("-inf")  # CSA window 0: no previous window
        kv[0, :4] = 0
    score[-1, L - 3:] = float("-inf")  # the sequence ends inside this window: trailing slots unused
    out = K.attention.compress_kv(kv.to(DEV), score.to(DEV))
    want = ref.compress_kv(kv, score)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)
