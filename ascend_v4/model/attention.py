"""V4 attention: low-rank q with per-head RMSNorm, one shared K=V latent, sliding window plus compressed
entries (CSA: indexer-selected, HCA: all), attention sink, inverse RoPE on the output, grouped low-rank
output projection (model-spec §4).

A step handles a flat batch of sequences (`StepBatch`). Per layer it writes the step's new window rows and
compressed entries into the paged `CachePool` (model/cache.py), turns each query's visible positions and
entries into pool row numbers through its sequence's block tables, and makes a single `ops.sparse_attn` call
over the pool for the whole batch: the shape a paged device kernel gets, with no copy of the cache.
"""

from __future__ import annotations

import torch
from torch import nn

from ascend_v4 import ops

from .args import CSA, HCA, WINDOW, ModelArgs
from .cache import StepBatch
from .compressor import Compressor
from .layers import DENSE, FP8, Linear, ModelOptions, RMSNorm, rms_unweighted
from .rope import apply_rope, cos_sin, inv_freq
from .tp import TPComm, TPShard


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
        T = x.shape[0]
        if T == 0:  # an idle attention-DP group's empty step: its MoE layers still join the expert exchange
            return torch.zeros_like(x)
        eps = self.args.norm_eps
        cos, sin = cos_sin(self.freqs, batch.positions)
        xq = self.wq_a.quantize_input(x)  # shared by wq_a and wkv
        cq = self.q_norm(self.wq_a(xq, prequantized=True))  # [T, q_lora]
        cqq = self.wq_b.quantize_input(cq)  # shared by wq_b and the indexer's wq_b
        q = rms_unweighted(self.wq_b(cqq, prequantized=True).view(T, self.n_heads, self.head_dim), eps)
        q = apply_rope(q, cos, sin)  # [T, H, hd]
        kv = apply_rope(self.kv_norm(self.wkv(xq, prequantized=True)), cos, sin)  # [T, hd]
        if self.opts.quant_sim:  # FP8 round-trip of the nope dims, 64-wide blocks; rope dims stay
            kv = torch.cat((ops.fp8_roundtrip(kv[:, :self.nope].contiguous(), 64), kv[:, self.nope:]), -1)
        proj: tuple = ()  # per-token compressor (and indexer) projections, all sequences at once
        if self.kind != WINDOW:
            proj = self.compressor.project(x, batch.positions)  # kv, gate scores [T, c*dc]
        if self.kind == CSA:
            proj += self.indexer.queries(cqq, x, cos, sin) + self.indexer.compressor.project(x, batch.positions)

        groups: dict[int, list] = {}  # sequences by cache pool (the engine has one; standalone caches own one each)
        for s in batch.seqs:
            groups.setdefault(id(s.cache.pool), []).append(s)
        if len(groups) == 1:
            o = self._attend(q, batch.positions, kv, batch, list(range(len(batch.seqs))), proj, offset=0)
        else:
            o = torch.empty_like(q)
            index = {id(s): i for i, s in enumerate(batch.seqs)}
            for seqs in groups.values():
                rows = torch.cat([torch.arange(s.offset, s.offset + s.n, device=x.device) for s in seqs])
                part = tuple(t[rows] for t in proj)
                o[rows] = self._attend(q[rows], batch.positions[rows], kv[rows], batch,
                                       [index[id(s)] for s in seqs], part, offset=None)
        # K = V carries rope: undo it on the output at the query position.
        o = apply_rope(o, cos, sin, inverse=True)
        return self._out_proj(o)

    def _attend(self, q: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, batch: StepBatch,
                which: list[int], proj: tuple, offset: int | None) -> torch.Tensor:
        """Write the new rows of sequences `which` (indices into batch.seqs, all on one CachePool) into the pool,
        build every query's index list (window rows, then HCA entries / CSA indexer picks, as pool rows) and run
        one sparse attention. q, positions, kv and `proj` (compressor kv, score; CSA adds indexer q, weights, kv,
        score) hold exactly these sequences' rows; offset=0: each SeqSlice.offset indexes them (whole batch),
        None: back to back. Window and entry rows come from the step's memo (computed once for all layers)."""
        seqs = [batch.seqs[i] for i in which]
        pool = seqs[0].cache.pool
        lid, W, dev = self.layer_id, self.window, q.device
        idx_rows, ipool, i_start, i_len, i_map = [], [], [], [], []
        off, ibase = 0, 0
        if offset == 0:  # the whole batch on this pool: the step's KV rows in one write (rows memoised per step)
            pool.write_kv(lid, batch.token_rows(W), kv)
        for i, s in zip(which, seqs):
            o0 = s.offset if offset == 0 else off
            off += s.n
            sl = slice(o0, o0 + s.n)
            pos = positions[sl]
            cache = s.cache
            # Query t sees positions [t-W+1, t] (negative ones are empty); the last column is t's own row.
            win = batch.window_rows(i, W)  # [n, W]
            if offset is None:
                pool.write_kv(lid, win[:, -1], kv[sl])
            parts = [win]
            if self.kind != WINDOW:
                cs, ist = cache.states[lid]
                first = cs.n_entries
                new, halves = self.compressor(proj[0][sl], proj[1][sl], cs, self.freqs)
                n_ent = cs.n_entries
                erows = batch.entry_rows(i, lid, n_ent)  # [N] rows in the comp region
                base = pool.comp_base(lid)
                pool.write_kv(lid, base + erows[first:], new)
                self._keep_block_end_state(pool.state[lid], "comp", cache, lid, first, halves)
                visible = (pos + 1) // self.ratio  # entries w < (t+1)//m are complete at t
                if self.kind == HCA:
                    e = torch.arange(n_ent, device=dev)[None, :]
                    parts.append(torch.where(e < visible[:, None], base + erows[e], torch.full_like(e, -1)))
                else:
                    inew, ihalves = self.indexer.compressor(proj[4][sl], proj[5][sl], ist, self.freqs)
                    pool.ikeys[lid][erows[first:]] = inew.to(pool.ikeys[lid].dtype)
                    self._keep_block_end_state(pool.state[lid], "index", cache, lid, first, ihalves)
                    # The indexer op takes each query's keys as one contiguous run: gather this sequence's.
                    ipool.append(pool.ikeys[lid][erows])
                    i_start.append(torch.full_like(pos, ibase))
                    i_len.append(visible.clamp(max=n_ent))
                    i_map.append((ibase, torch.cat((base + erows, erows.new_full((1,), -1)))))  # [N+1], -1 last
                    ibase += n_ent
            idx_rows.append(parts)

        if self.kind == CSA:
            sel = ops.indexer_topk(proj[2], torch.cat(ipool), proj[3], torch.cat(i_start), torch.cat(i_len),
                                   self.indexer.topk)  # [T, topk] rows of the gathered keys
            off = 0
            for parts, s, (b0, rows) in zip(idx_rows, seqs, i_map):
                si = sel[off:off + s.n]
                parts.append(rows[torch.where(si >= 0, si - b0, rows.shape[0] - 1)])
                off += s.n
        idx = self._stack_indices(idx_rows)
        return pool.attend(lid, q, idx, self.attn_sink, self.head_dim ** -0.5)  # [T, H, hd]

    @staticmethod
    def _keep_block_end_state(state_pool: dict, which: str, cache, lid: int, first: int, halves) -> None:
        """Store the CSA A-half of every new window that closes a block in that block's state slot."""
        if halves is None:
            return
        epb = cache.pool.entries_per_block(lid)
        n = halves[0].shape[0]
        for e in range(first + (-(first + 1)) % epb, first + n, epb):  # e + 1 is a multiple of epb
            slot = cache.state_slots[e // epb]
            if slot >= 0:  # only blocks a later request may resume after have a slot
                state_pool[which][slot, 0] = halves[0][e - first]
                state_pool[which][slot, 1] = halves[1][e - first]

    @staticmethod
    def _stack_indices(idx_rows: list[list[torch.Tensor]]) -> torch.Tensor:
        """Per-sequence lists of [n, k_i] index blocks -> one [T, K] tensor padded with -1."""
        per_seq = [torch.cat(parts, dim=1) for parts in idx_rows]
        width = max(p.shape[1] for p in per_seq)
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=-1) for p in per_seq])

    def _out_proj(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output projection: per-group wo_a (dense BF16), then wo_b. Under TP (G = this rank's
        groups) wo_b gives a partial sum: it runs in fp32 and the group's all-reduce adds the partials before
        the one rounding to the activation dtype (the activation quantisation is per 128 columns, and each
        rank's columns are whole blocks, so it is the same as on one device)."""
        G = self.n_groups
        T = o.shape[0]
        og = o.reshape(T, G, -1)  # [T, G, (H/G)*hd]
        wa = self.wo_a.dense_weight(o.dtype).view(G, self.args.o_lora_rank, -1)  # [G, r, (H/G)*hd]
        z = torch.einsum("tgi,gri->tgr", og, wa).reshape(T, -1)  # [T, G*r]
        if self.tp.size == 1:
            return self.wo_b(z)
        if self.tp_comm is None:
            raise RuntimeError(f"layer {self.layer_id}: attention TP {self.tp.size} without a TP group "
                               f"(Transformer.set_tp_comm was not called)")
        return self.tp_comm.all_reduce(self.wo_b(z.float())).to(o.dtype)
