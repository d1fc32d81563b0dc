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

from .args import WINDOW, ModelArgs
from .block import Block, _f32
from .dspark import BlockContext, Draft, DSparkStage, markov_sample, write_context
from .cache import CacheMark, SeqSlice, StepBatch, rollback
from .layers import FP8, Linear, ModelOptions, RMSNorm
from .moe import MoE
from .tp import TPComm, TPShard, check_tp


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
        # `mtp.{i}`: the April MTP block(s), or the DSpark stages of 0731/0813 checkpoints (dspark.py).
        self.mtp = nn.ModuleList([MTPBlock(a, o, a.n_layers + i, experts, tp) for i in range(a.n_mtp_layers)]
                                 + [DSparkStage(a, o, s, experts, tp) for s in range(a.n_dspark_stages)])

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
    def forward(self, batch: StepBatch, taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Run the step's tokens through every main layer, updating the caches.

        Returns the final residual streams [T, n, D] (what `logits` and the MTP block consume). With `taps` (a
        list), appends the DSpark target features: the output streams of each `dspark_target_layer_ids` layer
        averaged over the hc copies, [T, D] each, in that order.
        The caller commits the batch (`batch.commit()`) once all layers that need it have run.
        """
        h = self.embed(batch.tokens)  # [T, D]
        x = h.unsqueeze(1).expand(-1, self.args.hc_mult, -1).contiguous()  # [T, n, D]
        want = set(self.args.dspark_target_layer_ids) if taps is not None else ()
        for i, layer in enumerate(self.layers):
            x = layer(x, batch)
            if i in want:
                taps.append(x.mean(dim=1))
        return x

    def _vocab_logits(self, y: torch.Tensor) -> torch.Tensor:
        """Normed head input y [T, D] -> fp32 logits [T, V] (TP: each rank's vocab rows, gathered)."""
        logits = ops.lm_head(y.float(), self.head.weight)  # [T, V] fp32 (TP: [T, V/T], this rank's rows)
        return logits if self.tp.size == 1 else self.tp_comm.all_gather(logits)

    def _head(self, x: torch.Tensor, fn, base, scale, norm: RMSNorm) -> torch.Tensor:
        a = self.args
        return self._vocab_logits(norm(ops.hc_head(x, fn, base, scale, a.norm_eps, a.hc_eps)))

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

    # -- DSpark (dspark.py) --------------------------------------------------------------------------------
    @torch.no_grad()
    def dspark_context(self, taps: list[torch.Tensor], batch: StepBatch) -> None:
        """Write the step's tokens into every DSpark stage's ring (call after `forward(batch, taps)`)."""
        write_context(self.mtp, taps, batch, self.args.window_size)

    @torch.no_grad()
    def dspark_draft(self, anchors: torch.Tensor, main_pos: torch.Tensor, caches: list, k: int,
                     sample: dict | None = None) -> Draft:
        """Propose k tokens for each of S sequences: anchors [S] (the token at main_pos + 1, just sampled),
        main_pos [S] (the last position whose target features are in the rings), caches: their SeqCaches (one
        pool). Returns `Draft` (tokens [S, k], confidence logits [S, k]); greedy, except the sequences in
        `sample` ({index: (temperature, k generators)}: `markov_sample`)."""
        a = self.args
        S, dev = anchors.shape[0], anchors.device
        pools = {id(c.pool): c.pool for c in caches}
        if len(pools) > 1:
            raise ValueError("dspark_draft: the sequences' caches must share one CachePool")
        ids = torch.full((S, k), a.dspark_noise_token_id, dtype=torch.long, device=dev)
        ids[:, 0] = anchors
        ids = ids.reshape(-1)  # [S*k]: [anchor, noise x (k-1)] per sequence
        pool = next(iter(pools.values()), None)
        ctx = BlockContext.build(pool, caches, main_pos, ids, k, a.window_size)
        x = self.embed(ids).unsqueeze(1).expand(-1, a.hc_mult, -1).contiguous()  # [S*k, n, D]
        for st in self.mtp:
            x = st.forward_block(x, ctx)
        last = self.mtp[-1]
        h = ops.hc_head(x, last.hc_head_fn, last.hc_head_base, last.hc_head_scale, a.norm_eps, a.hc_eps)  # [S*k, D]
        logits = self._vocab_logits(last.norm(h))  # [S*k, V]
        return markov_sample(last, h.view(S, k, h.shape[-1]), logits.view(S, k, logits.shape[-1]), anchors, sample)

    # -- speculative decoding: keep a prefix of a step ------------------------------------------------------
    @torch.no_grad()
    def truncate_step(self, batch: StepBatch, cuts: dict[int, tuple[CacheMark, int]]) -> None:
        """Keep only the first n_i tokens of sequence i of a committed step (cuts: {i: (its `mark` from before
        the step, n_i)}; the rest were rejected drafts). Each cache goes back to its mark, then the kept tokens
        go through every compressor again from the projections the forward recorded (run the forward with
        `batch.memo["record_rows"]` = the batch rows of these sequences, ascending). The window rows and the DSpark
        rings need nothing: rows past a cache's length are rewritten before anything reads them."""
        recorded = batch.memo.get("record_rows")
        where = {} if recorded is None else {r: j for j, r in enumerate(recorded.tolist())}
        slices, src, off = [], [], 0
        for i, (m, n) in sorted(cuts.items()):
            s = batch.seqs[i]
            rollback(s.cache, m)
            if n:
                rows = [where.get(s.offset + j) for j in range(n)]
                if None in rows:
                    raise ValueError(f"truncate_step: sequence {i}'s rows were not recorded (record_rows)")
                slices.append(SeqSlice(s.cache, off, s.start, n))
                src += rows
                off += n
        if not slices:
            return
        src_t = torch.tensor(src, dtype=torch.long, device=batch.tokens.device)
        rows_t = recorded[src_t]
        sub = StepBatch(batch.tokens[rows_t], batch.positions[rows_t], slices)
        for layer in self.layers:
            if layer.attn.kind == WINDOW:
                continue
            comp = batch.memo.get(("proj", layer.layer_id))
            if comp is None:  # recorded only for a batch on one cache pool (as the engine's)
                raise ValueError(f"truncate_step: layer {layer.layer_id}'s compressor inputs were not recorded: run "
                                 "the forward with batch.memo['record_rows'] set, all sequences on one CachePool")
            layer.attn.replay_compress(sub, tuple(t[src_t] for t in comp))
        for s in slices:
            s.cache.length = s.start + s.n

