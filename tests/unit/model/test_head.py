"""The CPU LM head (`ops.lm_head`, called by `Transformer._vocab_logits`): the native tile kernel (AVX-512 builds of
ops/cpu_native.c) and MKL's two forms (y @ W^T, and W @ y^T at the row counts of `HEAD_WXT_ROWS`) must each give
the fp32 logits of every row, in row order, with the [T, V] shape the samplers index."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ascend_v4 import ops
from ascend_v4.ops import cpu, cpu_native
from ascend_v4.ops.cpu import HEAD_WXT_ROWS

ROWS = [1, 2, 3, 4, 5, 7, 16, 32, 33, 64, 65]


@pytest.fixture(scope="module")
def model():
    from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model

    return load_model(ensure_dummy_checkpoint("tiny"),
                      ModelOptions(dtype=torch.float32, quant_sim=False, dequantize_weights=True))


def _check_logits(got: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
    assert got.shape == (y.shape[0], w.shape[0]) and got.dtype == torch.float32
    exact = y.double() @ w.double().t()
    # fp32 products summed over K in some order: within K ulps of the sum of their magnitudes
    bound = (y.double().abs() @ w.double().abs().t()) * y.shape[1] * 2.0 ** -24
    assert ((got.double() - exact).abs() <= bound).all()
    # each row is that row's logits (a transposed result or a tile written to the wrong place would mix rows)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))


def test_the_row_count_ranges_exercise_every_form():
    assert 1 not in HEAD_WXT_ROWS and 16 in HEAD_WXT_ROWS and 64 not in HEAD_WXT_ROWS
    assert 16 in cpu.HEAD_NATIVE_ROWS and 65 not in cpu.HEAD_NATIVE_ROWS


@pytest.mark.parametrize("rows", ROWS)
def test_model_head_logits(model, rows):
    g = torch.Generator().manual_seed(rows)
    y = torch.randn(rows, model.args.dim, generator=g)
    _check_logits(model._vocab_logits(y), y, model.head.weight)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows", ROWS)
def test_cpu_head_forms(monkeypatch, rows, native):
    lib = cpu_native.load()
    if native and (lib is None or not cpu_native.has_rows_gemm(lib)):
        pytest.skip("no native head kernel here (no C compiler or no AVX-512)")
    if not native:
        monkeypatch.setattr(cpu_native, "load", lambda: None)
    g = torch.Generator().manual_seed(100 + rows)
    w = torch.randn(1000, 64, generator=g)  # V % 4 == 0, K % 16 == 0
    y = torch.randn(rows, 64, generator=g)
    _check_logits(cpu.lm_head(y, w), y, w)


def test_native_head_is_row_count_invariant():  # (and the 65-row case of the forms above runs on MKL)
    """Each logit is summed in the same order whatever the number of rows (batch invariance)."""
    lib = cpu_native.load()
    if lib is None or not cpu_native.has_rows_gemm(lib):
        pytest.skip("no native head kernel here")
    g = torch.Generator().manual_seed(5)
    w, y = torch.randn(4000, 128, generator=g), torch.randn(23, 128, generator=g)  # 6 passes: spread prefetch
    full = cpu_native.rows_gemm(lib, y, w)
    for r in range(23):
        assert torch.equal(cpu_native.rows_gemm(lib, y[r:r + 1].contiguous(), w)[0], full[r])


def test_shapes_the_native_kernel_does_not_take_fall_back_to_mkl():
    g = torch.Generator().manual_seed(6)
    w, y = torch.randn(1002, 60, generator=g), torch.randn(8, 60, generator=g)  # V % 4 != 0, K % 16 != 0
    _check_logits(cpu.lm_head(y, w), y, w)
    _check_logits(cpu.lm_head(y.t().contiguous().t(), w), y, w)  # non-contiguous rows


def test_bad_inputs_are_named():
    with pytest.raises(ops.OpInputError, match="lm_head"):
        ops.lm_head(torch.randn(2, 8), torch.randn(10, 9))
    with pytest.raises(ops.OpInputError, match="fp32"):
        ops.lm_head(torch.randn(2, 8).bfloat16(), torch.randn(10, 8))


def test_reference_backend_is_plain_linear():
    code = ("import torch, torch.nn.functional as F; import ascend_v4.ops as o; y, w = torch.randn(5, 16), "
            "torch.randn(40, 16); print(o._CPU_LM_HEAD is None, torch.equal(o.lm_head(y, w), F.linear(y, w)))")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ASCEND_V4_OP_BACKEND": "reference"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["True", "True"], r.stderr

