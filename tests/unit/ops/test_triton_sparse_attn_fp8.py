"""Triton sparse_attn_fp8 (in-kernel decode of FP8 cache entries) vs the reference golden.

On CPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1 while the module imports and while
each test runs), on a CUDA machine compiled on the GPU; same scheme as test_triton_attention.py. The kernel
module is not in `_interpret._MODULES`, so it is imported here, after `_common`, under the same variable.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import ascend_v4.ops as ops
from ascend_v4.ops.reference import kv_fp8 as ref
from ascend_v4.ops.triton import _interpret

_MOD = "ascend_v4.ops.triton.sparse_attn_fp8"


def _load():
    K, dev = _interpret.kernel_modules()
    if dev.type == "cuda":
        return importlib.import_module(_MOD), dev
    with _interpret.interpreter_env():
        mod = importlib.import_module(_MOD)
        # imported compiled earlier, or against an older attention module: import again under the interpreter
        if mod.launch_sparse_attn is not K.attention.launch_sparse_attn:
            mod = importlib.reload(mod)
    return mod, dev


try:
    M, DEV = _load()
    ISOLATED = None
except ImportError as e:
    pytest.skip(f"triton is not installed ({e}): pip install -e '.[test]'", allow_module_level=True)
except _interpret.InterpreterUnavailable as e:
    M, DEV, ISOLATED = None, torch.device("cpu"), str(e)

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}



if ISOLATED:
    def test_isolated_rerun():
        _interpret.rerun_pytest_isolated(__file__)


def _case(T, H, hd, rope, N, Kn, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, hd, generator=g).to(dtype)
    x = torch.randn(N, hd, generator=g) * torch.exp2(torch.randint(-3, 2, (N, 1), generator=g).float())
    x[0, :64] = 0.0  # an all-zero block (floor scale) and tiny values (e4m3 subnormals after scaling)
    x[1, :64] *= 1e-3
    pool = ops.kv_pack_fp8(x, rope)
    idx = torch.stack([torch.randperm(N, generator=g)[:Kn] for _ in range(T)])
    idx = idx.masked_fill(torch.rand(T, Kn, generator=g) < 0.2, -1)
    idx[0, Kn // 2:] = -1  # ragged row
    idx[-1] = -1  # no valid key: sink only -> zeros
    return q, pool, idx, torch.randn(H, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,hd,rope,N,Kn", [
    (3, 16, 512, 64, 40, 40),  # V4 entry (584 B), one head block, K > one BLOCK_K
    (4, 5, 192, 64, 30, 13),  # odd heads / index count
    (3, 20, 128, 0, 90, 70),  # no rope dims, two head blocks, D <= 128 -> BLOCK_K 64
])
def test_sparse_attn_fp8_matches_reference(dtype, T, H, hd, rope, N, Kn):
    q, pool, idx, sink = _case(T, H, hd, rope, N, Kn, T * 100 + hd, dtype)
    scale = hd ** -0.5
    out = M.sparse_attn_fp8(q.to(DEV), pool.to(DEV), idx.to(DEV), sink.to(DEV), scale, rope)
    want = ref.sparse_attn_fp8(q, pool, idx, sink, scale, rope)
    assert out.shape == want.shape and out.dtype == want.dtype
    torch.testing.assert_close(out.float().cpu(), want.float().cpu(), **TOL[dtype])
    assert out[-1].abs().max() == 0


def test_in_kernel_decode_is_exact():
    # One valid entry per query and a sink of -inf-like weight: the output is that entry's decoded row
    # (softmax weight 1), so any decode error shows up unblurred. fp32 -> exact products.
    N, hd = 6, 512
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, hd, generator=g) * torch.exp2(torch.randint(-10, 10, (N, 1), generator=g).float())
    x[2, 448:] = -x[2, 448:]  # negative rope values: the high byte carries the sign
    pool = ops.kv_pack_fp8(x)
    idx = torch.arange(N).view(N, 1)
    q = torch.zeros(N, 1, hd)
    sink = torch.full((1,), -1e4)
    out = M.sparse_attn_fp8(q.to(DEV), pool.to(DEV), idx.to(DEV), sink.to(DEV), 1.0, 64).cpu()
    torch.testing.assert_close(out[:, 0], ops.kv_unpack_fp8(pool, hd, 64, torch.float32), atol=0, rtol=0)


def test_int32_idx_and_empty():
    q, pool, idx, sink = _case(2, 3, 192, 64, 5, 3, 7, torch.float32)
    out = M.sparse_attn_fp8(q.to(DEV), pool.to(DEV), idx.int().to(DEV), sink.to(DEV), 0.25, 64)
    torch.testing.assert_close(out.cpu(), ref.sparse_attn_fp8(q, pool, idx, sink, 0.25, 64), **TOL[torch.float32])
    empty = M.sparse_attn_fp8(q[:0].to(DEV), pool.to(DEV), idx[:0].to(DEV), sink.to(DEV), 0.25, 64)
    assert empty.shape == (0, 3, 192)


def test_launcher_takes_the_reference_arguments():
    import inspect

    assert list(inspect.signature(M.sparse_attn_fp8).parameters) == list(
        inspect.signature(ref.sparse_attn_fp8).parameters)


def test_backends_register_it_for_cuda_when_triton_is_chosen(monkeypatch):
    from ascend_v4.ops import _backends

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.library, "register_kernel", lambda op, dev, fn: calls.append((op, dev, fn)))
    monkeypatch.setenv("ASCEND_V4_OP_BACKEND", "triton")
    chosen = _backends.register_device_kernels.__wrapped__()  # uncached: the real one ran at import
    assert chosen.get("cuda") == "triton"
    fp8 = [(dev, fn) for op, dev, fn in calls if op == "ascend_v4::sparse_attn_fp8"]
    assert len(fp8) == 1 and fp8[0][0] == "cuda" and fp8[0][1].__name__ == "sparse_attn_fp8"
