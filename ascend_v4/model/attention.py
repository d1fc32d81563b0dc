"""V4 attention: low-rank q with per-head RMSNorm, one shared K=V latent, sliding window plus compressed
entries (CSA: indexer-selected, HCA: all), attention sink, inverse RoPE on the output, grouped low-rank
output projection (model-spec §4).

A step handles a flat batch of sequences (`StepBatch`). Per layer it writes the step's new window rows and
compressed entries into the paged `CachePool` (model/cache.py), turns each query's visible positions and
entries into pool row numbers through its sequence's block tables, and makes a single `ops.sparse_attn_paged`
call over the pool for the whole batch, with no copy of the cache: the row numbers, plus the step's block tables
for a paged device kernel (vllm-ascend's), built only on an NPU.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ascend_v4 import ops

from .args import CSA, HCA, WINDOW, ModelArgs
from .cache import StepBatch
from .compressor import Compressor
from .layers import DENSE, FP8, Linear, ModelOptions, RMSNorm, rms_unweighted
from .rope import apply_rope, cos_sin, inv_freq
from .tp import TPComm, TPShard


def _logical_picks(sel: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Indexer picks as positions in the flat key list [Tg, k] -> each query's own entry numbers (-1 = none),
    int32: the form a paged kernel reads through the sequence's comp block table."""
    return torch.where(sel >= 0, sel - start[:, None], -1).to(torch.int32)


class Indexer(nn.Module):
    """Lightning indexer of a CSA layer: picks index_topk compressed entries per query (model-spec §4.5)."""

    def __init__(self, args: ModelArgs, opts: ModelOptions, ratio: int):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.opts = opts
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, FP8, opts)
        self.weights_proj = Linear(args.dim, self.n_heads, DENSE, opts, fp32_compute=True)
        self.compressor = Compressor(args, opts, ratio, self.head_dim, for_indexer=True)

    def queries(self, cqq: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Indexer queries [T, h, d] and head weights [T, h] fp32 for the step's tokens.
        cqq: the attention's normed low-rank q, already through the activation quantisation."""
        q = self.wq_b(cqq, prequantized=True).view(-1, self.n_heads, self.head_dim)
        q = apply_rope(q, cos, sin)
        if self.opts.quant_sim:  # the Hadamard is orthogonal: it only matters through FP4 rounding
            q = ops.fp4_roundtrip(ops.hadamard(q), 32)
        w = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        return q, w


class Attention(nn.Module):
    """One attention layer. With attention tensor parallelism (`tp`, model/tp.py) this rank holds H/T query
    heads and G/T output groups (wq_b rows, attn_sink, wo_a groups, wo_b columns); the rest is whole, and
    `_out_proj` sums the ranks' wo_b partials through `tp_comm`."""

    def __init__(self, args: ModelArgs, opts: ModelOptions, layer_id: int, tp: TPShard = TPShard()):
        super().__init__()
        self.args, self.opts, self.layer_id, self.tp = args, opts, layer_id, tp
        self.tp_comm: TPComm | None = None  # set by Transformer.set_tp_comm when tp.size > 1
        self.kind, self.ratio = args.kind(layer_id), args.ratio(layer_id)
        H, hd = args.n_heads // tp.size, args.head_dim  # this rank's query heads
        self.n_groups = args.o_groups // tp.size  # this rank's output groups (H/G heads each)
        self.n_heads, self.head_dim, self.nope = H, hd, args.nope_dim
        self.window = args.window_size
        self.wq_a = Linear(args.dim, args.q_lora_rank, FP8, opts)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps, opts.dtype)
        self.wq_b = Linear(args.q_lora_rank, H * hd, FP8, opts)
        self.wkv = Linear(args.dim, hd, FP8, opts)
        self.kv_norm = RMSNorm(hd, args.norm_eps, opts.dtype)
        self.wo_a = Linear((H // self.n_groups) * hd, self.n_groups * args.o_lora_rank, FP8, opts)
        self.wo_b = Linear(self.n_groups * args.o_lora_rank, args.dim, FP8, opts)
        self.attn_sink = nn.Parameter(torch.empty(H, dtype=torch.float32), requires_grad=False)
        if self.kind != WINDOW:
            self.compressor = Compressor(args, opts, self.ratio, hd, for_indexer=False)
        if self.kind == CSA:
            self.indexer = Indexer(args, opts, self.ratio)
        # YaRN + theta 160000 in compressed layers (window branch included), plain theta 10000 otherwise.
        # A plain attribute, not a buffer: it is derived from args, never part of the checkpoint.
        self.freqs = inv_freq(args, self.kind != WINDOW)

    def post_load(self) -> None:
        # The reference runs the grouped wo_a einsum in BF16 on a dequantised weight (model-spec §4.7).
        self.wo_a.dequantize_(self.opts.dtype)

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """x [T, D] (normed block input) -> [T, D]. Reads and updates the caches of batch.seqs."""
        if x.shape[0] == 0:  # an idle attention-DP group's empty step: its MoE layers still join the expert exchange
            return torch.zeros_like(x)
        cos, sin = cos_sin(self.freqs, batch.positions)
        q, kv, cqq = self.q_kv(x, cos, sin)
        proj: tuple = ()  # per-token compressor (and indexer) projections, all sequences at once
        if self.kind != WINDOW:
            proj = self.compressor.project(x, batch.positions)  # kv, gate scores [T, c*dc]
        if self.kind == CSA:
            proj += self.indexer.queries(cqq, x, cos, sin) + self.indexer.compressor.project(x, batch.positions)

        groups = batch.pool_groups()
        if len(groups) == 1:
            o = self._attend(q, kv, batch, groups[0][0], proj)
        else:
            o = torch.empty_like(q)
            for which, rows in groups:
                o[rows] = self._attend(q[rows], kv[rows], batch, which, tuple(t[rows] for t in proj))
        # K = V carries rope: undo it on the output at the query position.
        o = apply_rope(o, cos, sin, inverse=True)
        return self._out_proj(o)

    def q_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        """Queries [T, H, hd] (per-head RMS, RoPE), the K=V latent [T, hd] and the quantised low-rank q (which
        the indexer shares) of the step's normed inputs x [T, D]."""
        xq = self.wq_a.quantize_input(x)  # shared by wq_a and wkv
        cq = self.q_norm(self.wq_a(xq, prequantized=True))  # [T, q_lora]
        cqq = self.wq_b.quantize_input(cq)  # shared by wq_b and the indexer's wq_b
        q = rms_unweighted(self.wq_b(cqq, prequantized=True).view(-1, self.n_heads, self.head_dim),
                           self.args.norm_eps)
        return apply_rope(q, cos, sin), self.latent_kv(xq, cos, sin, prequantized=True), cqq

    def latent_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  prequantized: bool = False) -> torch.Tensor:
        """The K=V latent [T, hd] of inputs x [T, D]: wkv, kv_norm, RoPE on the last rope dims and, with the
        quantisation simulation, the FP8 round-trip of the nope dims (64-wide blocks; the rope dims stay)."""
        kv = apply_rope(self.kv_norm(self.wkv(x, prequantized=prequantized)), cos, sin)
        if self.opts.quant_sim:
            kv = torch.cat((ops.fp8_roundtrip(kv[:, :self.nope].contiguous(), 64), kv[:, self.nope:]), -1)
        return kv

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, batch: StepBatch, which: tuple[int, ...],
                proj: tuple) -> torch.Tensor:
        """Write the new rows of sequences `which` (indices into batch.seqs, all on one CachePool, their rows back
        to back in q, kv and `proj`: compressor kv, score; CSA adds indexer q, weights, kv, score) into the pool,
        run the compressors of all of them at once, build every query's index list (window rows, then HCA
        entries / CSA indexer picks, as pool rows) and run one sparse attention. The indices come from the
        step's memo (computed once for all layers: `StepBatch.group_window_rows`, `StepBatch.compress_plan`)."""
        pool = batch.seqs[which[0]].cache.pool
        lid = self.layer_id
        win = batch.group_window_rows(which, self.window)  # [Tg, W]: query t sees positions t-W+1 .. t
        pool.write_kv(lid, win[:, -1], kv)  # the last column is each query's own row
        idx, picks = win, None
        if self.kind != WINDOW:
            comp = proj[:2] + proj[4:]  # the compressors' (kv, score) projections
            rec = batch.memo.get("record_rows")  # speculative steps: keep them for `replay_compress`
            if rec is not None and len(which) == len(batch.seqs):  # (rows of the whole batch: one pool)
                batch.memo[("proj", lid)] = tuple(t[rec] for t in comp)
            plan = self._compress(batch, which, comp)
            base = pool.comp_base(lid)
            if self.kind == HCA:
                idx = torch.cat((win, plan.hca_index(base)), dim=1)
            else:
                flat, start, length = plan.indexer_runs()  # each sequence's keys as one contiguous run
                sel = ops.indexer_topk(proj[2], pool.ikeys[lid][flat], proj[3], start, length, self.indexer.topk)
                idx = torch.cat((win, plan.selected_rows(sel, base)), dim=1)  # [Tg, W + topk]
                picks = functools.partial(_logical_picks, sel, start)
        paged = ops.PagedKV(self.window, pool.window_block, pool.comp_base(lid), pool.block_size, self.ratio,
                            functools.partial(batch.paged_tables, which), picks)
        return pool.attend(lid, q, idx, self.attn_sink, self.head_dim ** -0.5, paged=paged)  # [Tg, H, hd]

    def _compress(self, batch: StepBatch, which: tuple[int, ...], comp: tuple):
        """Run this layer's compressor (CSA: and the indexer's) over sequences `which` of the step: updates their
        run slots, writes the new entries (and indexer keys) into the pool. comp: (kv, score) projections of
        the group's rows, CSA followed by the indexer's. Returns the step's plan."""
        pool, lid = batch.seqs[which[0]].cache.pool, self.layer_id
        plan = batch.compress_plan(which, self.ratio)
        run = pool.run[lid]
        new, halves = self.compressor(comp[0], comp[1], run["comp"], plan, self.freqs)
        pool.write_kv(lid, pool.comp_base(lid) + plan.entry_rows, new)
        self._keep_block_end_state(pool.state[lid], "comp", plan, halves)
        if self.kind == CSA:
            inew, ihalves = self.indexer.compressor(comp[2], comp[3], run["index"], plan, self.freqs)
            pool.ikeys[lid][plan.entry_rows] = inew.to(pool.ikeys[lid].dtype)
            self._keep_block_end_state(pool.state[lid], "index", plan, ihalves)
        return plan

    def replay_compress(self, batch: StepBatch, comp: tuple) -> None:
        """Partial rollback of a speculative step: after `cache.rollback`, feed the kept tokens (`batch`, one pool,
        slices back to back) through this layer's compressors again, from the projections recorded during the
        step (`comp`, their rows). Window rows need nothing: rows past the kept length are never read before the
        next step rewrites them."""
        if self.kind != WINDOW and batch.seqs:
            self._compress(batch, tuple(range(len(batch.seqs))), comp)

    @staticmethod
    def _keep_block_end_state(state_pool: dict, which: str, plan, halves) -> None:
        """Store the CSA A-half of every new window that closes a block in that block's state slot (only blocks
        a later request may resume after have one)."""
        if halves is None or not plan.keep_entries.numel():
            return
        state_pool[which][plan.keep_slots, 0] = halves[0][plan.keep_entries]
        state_pool[which][plan.keep_slots, 1] = halves[1][plan.keep_entries]

    def _out_proj(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output projection: per-group wo_a (dense BF16), then wo_b. Under TP (G = this rank's
        groups) wo_b gives a partial sum: it runs in fp32 and the group's all-reduce adds the partials before
        the one rounding to the activation dtype (the activation quantisation is per 128 columns, and each
        rank's columns are whole blocks, so it is the same as on one device)."""
        G = self.n_groups
        T = o.shape[0]
        og = o.reshape(T, G, -1)  # [T, G, (H/G)*hd]
        wa = self.wo_a.dense_weight(o.dtype).view(G, self.args.o_lora_rank, -1)  # [G, r, (H/G)*hd]
        # "tgi,gri->tgr" as the bmm einsum would run, without einsum's parsing: [G, T, i] @ [G, i, r] -> [T, G*r]
        z = torch.bmm(og.transpose(0, 1), wa.transpose(1, 2)).transpose(0, 1).reshape(T, -1)
        if self.tp.size == 1:
            return self.wo_b(z)
        if self.tp_comm is None:
            raise RuntimeError(f"layer {self.layer_id}: attention TP {self.tp.size} without a TP group "
                               f"(Transformer.set_tp_comm was not called)")
        return self.tp_comm.all_reduce(self.wo_b(z.float())).to(o.dtype)
