"""The DeepSeek-V4 transformer: embedding, mHC blocks (attention + MoE), final mHC head, norm and LM head,
plus the MTP block(s) (model-spec §3, §5, §7).

The residual state is n = hc_mult streams per token, [T, n, D], for a flat batch of tokens from several
sequences (`StepBatch`). Parameter names equal the official checkpoint keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ascend_v4 import ops

from .args import ModelArgs
from .attention import Attention
from .cache import StepBatch
from .layers import FP8, Linear, ModelOptions, RMSNorm
from .moe import MoE
from .tp import TPComm, TPShard, check_tp


def _f32(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)


class Block(nn.Module):
    """One layer: x <- hc_post(attn(norm(hc_pre(x)))), then the same around the MoE."""

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
        self.attn = Attention(args, opts, layer_id, tp)
        self.ffn = MoE(args, opts, layer_id, experts)

    def _pre(self, x: torch.Tensor, unit: str):
        a = self.args
        return ops.hc_pre(x, getattr(self, f"hc_{unit}_fn"), getattr(self, f"hc_{unit}_base"),
                          getattr(self, f"hc_{unit}_scale"), a.norm_eps, a.hc_eps, a.hc_sinkhorn_iters)

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """x [T, n, D] residual streams -> [T, n, D]."""
        y, post, comb = self._pre(x, "attn")
        x = ops.hc_post(self.attn(self.attn_norm(y), batch), x, post, comb)
        y, post, comb = self._pre(x, "ffn")
        return ops.hc_post(self.ffn(self.ffn_norm(y), batch.tokens), x, post, comb)


class MTPBlock(Block):
    """Multi-token prediction block `mtp.{i}`: predicts token t+2 from the main model's final streams at t and
    the embedding of token t+1 (window-only attention, score-routed MoE)."""

    def __init__(self, args: ModelArgs, opts: ModelOptions, layer_id: int, experts: range | None = None,
                 tp: TPShard = TPShard()):
        super().__init__(args, opts, layer_id, experts, tp)
        d, n = args.dim, args.hc_mult
        self.e_proj = Linear(d, d, FP8, opts)
        self.h_proj = Linear(d, d, FP8, opts)
        self.enorm = RMSNorm(d, args.norm_eps, opts.dtype)
        self.hnorm = RMSNorm(d, args.norm_eps, opts.dtype)
        self.norm = RMSNorm(d, args.norm_eps, opts.dtype)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _f32(n, n * d), _f32(n), _f32(1)

    def forward_mtp(self, streams: torch.Tensor, next_emb: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """streams [T, n, D] main final state, next_emb [T, D] embedding of the next token -> [T, n, D]."""
        e = self.e_proj(self.enorm(next_emb))  # [T, D]
        h = self.h_proj(self.hnorm(streams))  # [T, n, D], per stream
        return super().forward(e.unsqueeze(1) + h, batch)


class VocabEmbedding(nn.Module):
    """Token embedding whose rows (vocab) may be split over a TP group: each rank looks up the ids it holds,
    zeros elsewhere, and the all-reduce adds exactly one non-zero row per token (exact)."""

    def __init__(self, vocab: int, dim: int, dtype: torch.dtype, tp: TPShard):
        super().__init__()
        self.tp, self.rows = tp, tp.part(vocab)
        self.tp_comm: TPComm | None = None
        self.weight = nn.Parameter(torch.empty(self.rows.stop - self.rows.start, dim, dtype=dtype),
                                   requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.rows.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        y = F.embedding(torch.where(mine, local, 0), self.weight) * mine[:, None].to(self.weight.dtype)
        return self.tp_comm.all_reduce(y)


class Transformer(nn.Module):
    """Build under `torch.device("meta")`, then load a checkpoint with `ascend_v4.checkpoint.load_checkpoint`.

    `experts`: global ids of the routed experts this rank holds in every MoE (default: all; expert parallelism).
    `tp`: this rank's place in an attention tensor-parallel group (model/tp.py: what is split); the runtime then
    calls `set_tp_comm` with the group's collectives.
    """

    def __init__(self, args: ModelArgs, opts: ModelOptions | None = None, *, experts: range | None = None,
                 tp: TPShard = TPShard()):
        super().__init__()
        check_tp(args, tp.size)
        self.args, self.opts, self.tp = args, opts or ModelOptions(), tp
        self.tp_comm: TPComm | None = None
        a, o = args, self.opts
        self.embed = VocabEmbedding(a.vocab_size, a.dim, o.dtype, tp)
        self.layers = nn.ModuleList(Block(a, o, i, experts, tp) for i in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps, o.dtype)
        # The head runs in fp32 (model-spec §3): keep its weight fp32 rather than upcasting per call.
        # Under TP each rank holds vocab rows tp.part(V) and the logits are gathered.
        self.head = nn.Linear(a.dim, a.vocab_size // tp.size, bias=False, dtype=torch.float32)
        self.head.weight.requires_grad_(False)
        n = a.hc_mult
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _f32(n, n * a.dim), _f32(n), _f32(1)
        self.mtp = nn.ModuleList(MTPBlock(a, o, a.n_layers + i, experts, tp) for i in range(a.n_mtp_layers))

    def set_tp_comm(self, comm: TPComm | None) -> None:
        """Give every TP-sharded module the group's collectives (the runtime, once the process groups exist)."""
        for m in self.modules():
            if hasattr(m, "tp_comm"):
                m.tp_comm = comm

    @torch.no_grad()
    def post_load(self) -> None:
        """Called by the loader once every tensor is in place."""
        for m in self.modules():
            if m is not self and hasattr(m, "post_load"):
                m.post_load()
        if self.opts.dequantize_weights:
            for m in self.modules():
                if isinstance(m, Linear):
                    m.dequantize_(self.opts.dtype)
            for m in self.modules():
                if isinstance(m, MoE):
                    m.post_load()

    @torch.no_grad()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Run the step's tokens through every main layer, updating the caches.

        Returns the final residual streams [T, n, D] (what `logits` and the MTP block consume).
        The caller commits the batch (`batch.commit()`) once all layers that need it have run.
        """
        h = self.embed(batch.tokens)  # [T, D]
        x = h.unsqueeze(1).expand(-1, self.args.hc_mult, -1).contiguous()  # [T, n, D]
        for layer in self.layers:
            x = layer(x, batch)
        return x

    def _head(self, x: torch.Tensor, fn, base, scale, norm: RMSNorm) -> torch.Tensor:
        a = self.args
        y = ops.hc_head(x, fn, base, scale, a.norm_eps, a.hc_eps)  # [T, D]
        logits = F.linear(norm(y).float(), self.head.weight)  # [T, V] fp32 (TP: [T, V/T], this rank's rows)
        return logits if self.tp.size == 1 else self.tp_comm.all_gather(logits)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final streams [T, n, D] (any subset of rows) -> fp32 logits [T, V]."""
        return self._head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.norm)

    @torch.no_grad()
    def mtp_logits(self, x: torch.Tensor, next_tokens: torch.Tensor, batch: StepBatch, i: int = 0,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """Draft logits from MTP block i: x [T, n, D] main final streams at the step's tokens, next_tokens [T]
        the token after each (the MTP block's own window cache is layer n_layers + i of the batch caches).
        Every row goes through the block (its cache needs them all); `rows` limits which get logits."""
        blk = self.mtp[i]
        y = blk.forward_mtp(x, self.embed(next_tokens), batch)
        if rows is not None:
            y = y[rows]
        return self._head(y, blk.hc_head_fn, blk.hc_head_base, blk.hc_head_scale, blk.norm)
