"""The dense routed-expert path (`MoE._dense_experts`, used on CPU where weights are expanded at load) against
its golden, `Expert.forward` run expert by expert (`MoE._expert_loop`): bit for bit, with the QAT simulation,
another rank's experts (-1 ids), skewed routing and both activation dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ascend_v4.model.args import ModelArgs
from ascend_v4.model.layers import ModelOptions
from ascend_v4.model.moe import MoE


def _moe(dtype: torch.dtype, quant_sim: bool) -> MoE:
    args = ModelArgs.from_preset("tiny")
    moe = MoE(args, ModelOptions(dtype=dtype, quant_sim=quant_sim, dequantize_weights=True), args.n_layers - 1)
    g = torch.Generator().manual_seed(0)
    for e in moe.experts:
        for lin in (e.w1, e.w2, e.w3):  # dense, as after Transformer.post_load's expansion
            lin.weight = nn.Parameter((torch.randn(lin.out_features, lin.in_features, generator=g) * 0.05)
                                      .to(dtype), requires_grad=False)
            lin.scale = None
    moe.post_load()
    return moe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_sim", [True, False])
def test_dense_experts_equal_the_per_expert_modules(dtype, quant_sim):
    moe = _moe(dtype, quant_sim)
    E, k, D = moe.args.n_routed_experts, moe.args.n_activated_experts, moe.args.dim
    g = torch.Generator().manual_seed(1)
    for T in (1, 7, 300):
        x = (torch.randn(T, D, generator=g) * 3).to(dtype)
        ids = torch.randint(0, E, (T, k), generator=g)
        ids[::3, 0] = -1  # pairs another rank handles
        if T == 300:
            ids[:200, 1:] = 0  # one expert takes most pairs
        w = torch.rand(T, k, generator=g)
        got, want = moe._dense_experts(x, ids, w), moe._expert_loop(x, ids, w)
        assert got.dtype == torch.float32 and torch.equal(got, want), (T, (got - want).abs().max())
    none = torch.full((3, k), -1)
    assert torch.equal(moe._dense_experts(x[:3], none, w[:3]), torch.zeros(3, D))


@pytest.mark.parametrize("fmt", ["int8_channel", "int4_channel"])
def test_integer_experts_go_through_one_seam_op_bit_for_bit(fmt, monkeypatch):
    """W8A8 / W4A8 experts kept packed: MoE.run_local makes ONE ops.moe_experts_int call (what the NPU maps to
    one grouped matmul per projection), equal bit for bit to the per-expert Expert modules."""
    from ascend_v4 import ops
    from ascend_v4.quant import get_format

    args = ModelArgs.from_preset("tiny")
    moe = MoE(args, ModelOptions(dtype=torch.float32), args.n_layers - 1)
    g = torch.Generator().manual_seed(5)
    for e in moe.experts:
        for lin in (e.w1, e.w2, e.w3):
            lin.set_format(fmt, down=lin is e.w2)
            for name, lay in get_format(fmt).layout(lin.out_features, lin.in_features, lin is e.w2).items():
                t = (torch.randint(-128, 128, lay.shape, generator=g, dtype=torch.int8) if lay.dtype == torch.int8
                     else torch.rand(lay.shape, generator=g) * 0.01)  # int8 bytes (int4: two codes), scales
                setattr(lin, name, nn.Parameter(t.to(lay.dtype), requires_grad=False))
    moe.post_load()
    calls = []
    real = ops.moe_experts_int
    monkeypatch.setattr(ops, "moe_experts_int", lambda *a: calls.append(1) or real(*a))
    T, k = 11, moe.args.n_activated_experts
    x = torch.randn(T, moe.args.dim, generator=g)
    ids = torch.randint(0, moe.args.n_routed_experts, (T, k), generator=g)
    ids[::4, 0] = -1
    w = torch.rand(T, k, generator=g)
    got = moe.run_local(x, ids, w)
    assert calls == [1] and torch.equal(got, moe._expert_loop(x, ids, w))
