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
