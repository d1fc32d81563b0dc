"""Triton mHC kernels (hc_pre with the in-kernel Sinkhorn, hc_post, hc_head) vs the reference goldens.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set only while this module imports
the kernels and while each test runs, by the fixture in conftest.py); on a CUDA machine they run compiled on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from ascend_v4.ops.reference import mhc as ref
from ascend_v4.ops.triton import _interpret

try:  # imports triton itself under TRITON_INTERPRET=1 on CPU (the variable is restored afterwards)
    K, DEV = _interpret.kernel_modules()
    ISOLATED = None
except ImportError as e:
    pytest.skip(f"triton is not installed ({e}): pip install -e '.[test]'", allow_module_level=True)
except _interpret.InterpreterUnavailable as e:
    K, DEV, ISOLATED = None, torch.device("cpu"), str(e)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}



if ISOLATED:  # triton was imported compiled before this module: run the whole module in a fresh process
    def test_isolated_rerun():
        _interpret.rerun_pytest_isolated(__file__)


def _params(n: int, D: int, rows: int, g: torch.Generator):
    fn = 0.05 * torch.randn(rows, n * D, generator=g)
    return fn, torch.randn(rows, generator=g), 0.5 + torch.rand(3, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,n,D,iters", [(3, 4, 96, 20), (5, 3, 50, 20), (2, 4, 700, 1)])
def test_hc_pre(dtype, T, n, D, iters):
    g = torch.Generator().manual_seed(T * n * D + iters)
    x = torch.randn(T, n, D, generator=g).to(dtype)
    fn, base, scale = _params(n, D, (2 + n) * n, g)
    got = K.mhc.hc_pre(x.to(DEV), fn.to(DEV), base.to(DEV), scale.to(DEV), 1e-6, 1e-6, iters)
    want = ref.hc_pre(x, fn, base, scale, 1e-6, 1e-6, iters)
    for a, b, tol in zip(got, want, (TOL[dtype], TOL[torch.float32], TOL[torch.float32])):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.cpu().float(), b.float(), **tol)
    if iters == 20:  # Sinkhorn ends on a column step: columns sum to ~1
        torch.testing.assert_close(got[2].sum(-2).cpu(), torch.ones(T, n), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,n,D", [(3, 4, 96), (4, 3, 50)])
def test_hc_head(dtype, T, n, D):
    g = torch.Generator().manual_seed(T + n + D)
    x = torch.randn(T, n, D, generator=g).to(dtype)
    fn, base, scale = _params(n, D, n, g)
    got = K.mhc.hc_head(x.to(DEV), fn.to(DEV), base.to(DEV), scale[:1].to(DEV), 1e-6, 1e-6)
    want = ref.hc_head(x, fn, base, scale[:1], 1e-6, 1e-6)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,n,D", [(3, 4, 96), (2, 3, 300)])
def test_hc_post(dtype, T, n, D):
    g = torch.Generator().manual_seed(7 * T + n + D)
    f = torch.randn(T, D, generator=g).to(dtype)
    res = torch.randn(T, n, D, generator=g).to(dtype)
    post = 2 * torch.rand(T, n, generator=g)
    comb = torch.rand(T, n, n, generator=g)  # not symmetric: catches a transposed sum
    got = K.mhc.hc_post(f.to(DEV), res.to(DEV), post.to(DEV), comb.to(DEV))
    want = ref.hc_post(f, res, post, comb)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOL[dtype])


def test_mhc_empty_batch():
    x = torch.zeros(0, 4, 8, device=DEV)
    fn, base, scale = torch.zeros(24, 32, device=DEV), torch.zeros(24, device=DEV), torch.ones(3, device=DEV)
    y, post, comb = K.mhc.hc_pre(x, fn, base, scale, 1e-6, 1e-6, 20)
    assert y.shape == (0, 8) and post.shape == (0, 4) and comb.shape == (0, 4, 4)
    assert K.mhc.hc_post(x[:, 0], x, post, comb).shape == (0, 4, 8)
