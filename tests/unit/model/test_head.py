"""The CPU LM head (`Transformer._vocab_logits`): at the row counts of `HEAD_WXT_ROWS` it runs as W @ y^T (another
MKL kernel, faster there) and must give the fp32 logits of y @ W^T at every row count, in row order, with the
[T, V] shape the samplers index."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ascend_v4.model.transformer import HEAD_WXT_ROWS


@pytest.fixture(scope="module")
def model():
    from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model

    return load_model(ensure_dummy_checkpoint("tiny"),
                      ModelOptions(dtype=torch.float32, quant_sim=False, dequantize_weights=True))


def test_both_forms_are_exercised():
    assert 1 not in HEAD_WXT_ROWS and 16 in HEAD_WXT_ROWS and 64 not in HEAD_WXT_ROWS


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16, 32, 33, 64])
def test_head_logits_equal_the_fp32_product(model, rows):
    g = torch.Generator().manual_seed(rows)
    y = torch.randn(rows, model.args.dim, generator=g)
    got = model._vocab_logits(y)
    w = model.head.weight
    assert got.shape == (rows, w.shape[0]) and got.dtype == torch.float32
    exact = (y.double() @ w.double().t()).float()
    # fp32 products summed over dim (64 on tiny) in some order: a few ulps of the row's magnitude
    tol = 1e-6 * exact.abs().amax(-1, keepdim=True) * model.args.dim
    assert ((got - exact).abs() <= tol).all()
    assert torch.equal(got.argmax(-1), F.linear(y, w).argmax(-1))
    # each row is that row's logits (a transposed result must not mix rows)
    assert torch.allclose(got[-1], (y[-1:] @ w.t())[0], rtol=1e-5, atol=1e-5)
