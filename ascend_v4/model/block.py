"""One V4 layer (model-spec §5): mHC around attention, then mHC around the MoE. Shared by the main layers,
the MTP block (transformer.py) and the DSpark stages (dspark.py)."""

from __future__ import annotations

import torch
from torch import nn

from ascend_v4 import ops

from .args import ModelArgs
from .attention import Attention
from .cache import StepBatch
from .layers import ModelOptions, RMSNorm
from .moe import MoE
from .tp import TPShard


def _f32(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)


class Block(nn.Module):
    """One layer: x <- hc_post(attn(norm(hc_pre(x)))), then the same around the MoE."""

    attn_cls = Attention  # the DSpark stages use their own attention (dspark.py)

    def __init__(self, args: ModelArgs, opts: ModelOptions, layer_id: int, experts: range | None = None,
                 tp: TPShard = TPShard()):
        super().__init__()
        self.args, self.layer_id = args, layer_id
        n, d = args.hc_mult, args.dim
        mix = (2 + n) * n
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _f32(mix, n * d), _f32(mix), _f32(3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _f32(mix, n * d), _f32(mix), _f32(3)
        self.attn_norm = RMSNorm(d, args.norm_eps, opts.dtype)
        self.ffn_norm = RMSNorm(d, args.norm_eps, opts.dtype)
        self.attn = self.attn_cls(args, opts, layer_id, tp)
        self.ffn = MoE(args, opts, layer_id, experts)

    def _pre(self, x: torch.Tensor, unit: str):
        a = self.args
        return ops.hc_pre(x, getattr(self, f"hc_{unit}_fn"), getattr(self, f"hc_{unit}_base"),
                          getattr(self, f"hc_{unit}_scale"), a.norm_eps, a.hc_eps, a.hc_sinkhorn_iters)

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """x [T, n, D] residual streams -> [T, n, D]."""
        return self.sublayers(x, lambda y: self.attn(y, batch), batch.tokens)

    def sublayers(self, x: torch.Tensor, attend, tokens: torch.Tensor) -> torch.Tensor:
        """The layer around an attention call `attend` (normed input [T, D] -> [T, D]): mHC, attention, mHC, MoE
        (its gate gets `tokens` [T] for hash routing)."""
        y, post, comb = self._pre(x, "attn")
        x = ops.hc_post(attend(self.attn_norm(y)), x, post, comb)
        y, post, comb = self._pre(x, "ffn")
        return ops.hc_post(self.ffn(self.ffn_norm(y), tokens), x, post, comb)
