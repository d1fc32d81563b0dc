"""NPU code path of the FP8 KV-cache ops (ops/npu/sparse_attn_fp8.py) on CPU tensors.

The FP8-free codec is compared bit for bit with the reference (which uses torch's float8 casts); the routing
of sparse_attn_fp8 runs against the torch_npu test double (tests/unit/npu/double, put on sys.path only inside
the fixture), with the op library "missing" (A2/A3 decode path down to the reference attention). The 950
path (`ascend_v4::npu_sparse_attn_fp8` -> aclnnSparseAttnKvQuant) is not run here: that would need a CPU
model of the FP8-KV Ascend C kernel, which the double does not have; only its selection is checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import ascend_v4.ops as ops
from ascend_v4.ops.npu import kernels
from ascend_v4.ops.npu import sparse_attn_fp8 as npu_kv8
from ascend_v4.ops.npu._loader import OpLibrary
from ascend_v4.ops.reference import kv_fp8 as ref

ROOT = Path(__file__).resolve().parents[3]
DOUBLE = ROOT / "tests" / "unit" / "npu" / "double"
NO_LIB = OpLibrary(False, Path("/nonexistent/vendors/ascend_v4"), Path("/nonexistent/lib.so"), "not built (test)")
LIB = OpLibrary(True, Path("/model/vendors/ascend_v4"), Path("/model/lib.so"), "pretend loaded (test)")



def _e4m3_grid() -> torch.Tensor:
    """Every finite e4m3 value, every midpoint between neighbours (the ties), signed zeros, tiny values."""
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    pos = v[torch.isfinite(v) & (v >= 0)].sort().values
    mids = (pos[1:] + pos[:-1]) / 2
    nudge = torch.cat((mids * (1 + 2 ** -20), mids * (1 - 2 ** -20)))
    extra = torch.tensor([0.0, -0.0, 448.0, -448.0, 1e-30, -1e-30, 2.0 ** -10, 3 * 2.0 ** -11])
    return torch.cat((v[torch.isfinite(v)], mids, -mids, nudge, -nudge, extra))


def test_e4m3_codes_equal_torch_cast_everywhere():
    x = _e4m3_grid()
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(npu_kv8.e4m3_codes(x), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_free_codec_is_bit_exact_with_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 512, generator=g) * torch.exp2(torch.randint(-24, 24, (96, 1), generator=g).float())
    x[0, :64] = 0.0
    x[1, :64] *= 1e-12
    x = x.to(dtype)
    p = npu_kv8.kv_pack_fp8(x, 64)
    assert torch.equal(p, ref.kv_pack_fp8(x, 64))
    for out_dtype in (torch.float32, torch.bfloat16):
        a = npu_kv8.kv_unpack_fp8(p, 512, 64, out_dtype)
        b = ref.kv_unpack_fp8(p, 512, 64, out_dtype)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _case(T, H, N, K, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 512, generator=g).to(dtype)
    pool = ops.kv_pack_fp8(torch.randn(N, 512, generator=g))
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)])
    idx = idx.masked_fill(torch.rand(T, K, generator=g) < 0.25, -1)
    idx[-1] = -1
    return q, pool, idx.int(), torch.randn(H, generator=g)


@pytest.mark.parametrize("slot_max", [npu_kv8.SLOT_GATHER_MAX, 16], ids=["per-slot", "dedup"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a2_a3_path_decodes_then_runs_bf16_attention(tnpu, monkeypatch, slot_max, dtype):
    monkeypatch.setattr(npu_kv8, "SLOT_GATHER_MAX", slot_max)
    q, pool, idx, sink = _case(6, 4, 200, 24, 1, dtype)
    with kernels.use_backend(kernels.Backend(tnpu, NO_LIB)) as b:
        assert npu_kv8.path(b, q) == "decode+reference"
        out = npu_kv8.sparse_attn_fp8(q, pool, idx, sink, 512 ** -0.5, 64)
    want = ref.sparse_attn_fp8(q, pool, idx, sink, 512 ** -0.5, 64)
    assert out.shape == want.shape and out.dtype == want.dtype
    # same decoded rows; the per-slot gather feeds them in another order (summation order only)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2 ** -8, rtol=2 ** -7)
    torch.testing.assert_close(out, want, **tol)
    assert out[-1].abs().max() == 0


def test_path_selection(tnpu, monkeypatch):
    q = torch.zeros(1, 1, 512, dtype=torch.bfloat16)
    assert not npu_kv8.is_950(tnpu)  # the double reports SoC -1
    assert npu_kv8.path(kernels.Backend(tnpu, LIB), q) == "decode+ascendc"  # A2/A3: BF16 Ascend C kernel
    monkeypatch.setattr(tnpu.npu, "get_soc_version", lambda: 260)
    assert npu_kv8.is_950(tnpu)
    assert npu_kv8.path(kernels.Backend(tnpu, NO_LIB), q) == "decode+reference"  # 950 without the library
    has = hasattr(torch.ops.ascend_v4, npu_kv8.BINDING_OP)
    want = "ascendc-fp8" if has else "decode+ascendc"  # a library built before the FP8 binding lacks the op
    assert npu_kv8.path(kernels.Backend(tnpu, LIB), q) == want
    assert npu_kv8.path(kernels.Backend(tnpu, LIB), q.float()) == "decode+ascendc"  # the FP8 kernel is bf16-only
    assert npu_kv8.path(kernels.Backend(tnpu, LIB), q, 8) == "decode+ascendc"  # rope bytes not whole UB blocks


def test_registered_for_privateuse1_without_importing_torch_npu():
    had = "torch_npu" in sys.modules
    npu_kv8.register()
    for op in npu_kv8.kernel_table():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ascend_v4::{op}", "PrivateUse1"), op
    assert ("torch_npu" in sys.modules) == had


def test_binding_schema_is_in_the_cpp_source():
    src = (ROOT / "ops/csrc/torch_binding.cpp").read_text().replace('"\n        "', "")
    assert f'"{npu_kv8.BINDING_SCHEMA}"' in src
    assert 'm.impl("npu_sparse_attn_fp8"' in src
