"""V4 attention: low-rank q with per-head RMSNorm, one shared K=V latent, sliding window plus compressed
entries (CSA: indexer-selected, HCA: all), attention sink, inverse RoPE on the output, grouped low-rank
output projection (model-spec §4).

A step handles a flat batch of sequences (`StepBatch`). Per layer it builds one KV pool (each sequence's
recent window rows, its new rows and its compressed entries) and one index list per query, then makes a
single `ops.sparse_attn` call for the whole batch: the same shape a paged kernel gets.
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
    def __init__(self, args: ModelArgs, opts: ModelOptions, layer_id: int):
        super().__init__()
        self.args, self.opts, self.layer_id = args, opts, layer_id
        self.kind, self.ratio = args.kind(layer_id), args.ratio(layer_id)
        H, hd = args.n_heads, args.head_dim
        self.n_heads, self.head_dim, self.nope = H, hd, args.nope_dim
        self.window = args.window_size
        self.wq_a = Linear(args.dim, args.q_lora_rank, FP8, opts)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps, opts.dtype)
        self.wq_b = Linear(args.q_lora_rank, H * hd, FP8, opts)
        self.wkv = Linear(args.dim, hd, FP8, opts)
        self.kv_norm = RMSNorm(hd, args.norm_eps, opts.dtype)
        self.wo_a = Linear((H // args.o_groups) * hd, args.o_groups * args.o_lora_rank, FP8, opts)
        self.wo_b = Linear(args.o_groups * args.o_lora_rank, args.dim, FP8, opts)
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
        if self.kind != WINDOW:
            ckv, csc = self.compressor.project(x)  # [T, c*dc] each, all sequences at once
        if self.kind == CSA:
            iq, iw = self.indexer.queries(cqq, x, cos, sin)
            ikv, isc = self.indexer.compressor.project(x)

        pool, idx_rows = [], []
        ipool, i_start, i_len, i_base = [], [], [], []
        rows = 0
        for s in batch.seqs:
            lc = s.cache.layers[self.layer_id]
            sl = slice(s.offset, s.offset + s.n)
            pos = batch.positions[sl]
            # Window rows: positions [lo, start) from the ring, then this chunk's rows.
            lo = max(0, s.start - self.window + 1)
            ring = lc.window[torch.arange(lo, s.start, device=x.device) % self.window]
            local = torch.cat((ring, kv[sl]))  # rows hold positions lo .. start+n-1
            # Query t sees positions [t-W+1, t]: a contiguous run of `local` rows.
            first = pos - self.window + 1 - lo  # [n]
            win = first[:, None] + torch.arange(self.window, device=x.device)[None, :]
            win = torch.where(win >= 0, win + rows, torch.full_like(win, -1))
            parts = [win]
            pool.append(local)
            rows += local.shape[0]
            if self.kind != WINDOW:
                lc.comp.append(self.compressor(ckv[sl], csc[sl], s.start, lc.comp_state, self.freqs))
                comp = lc.comp.view()
                visible = (pos + 1) // self.ratio  # entries w < (t+1)//m are complete at t
                if self.kind == HCA:
                    e = torch.arange(comp.shape[0], device=x.device)[None, :]
                    parts.append(torch.where(e < visible[:, None], e + rows, torch.full_like(e, -1)))
                else:
                    lc.index_keys.append(self.indexer.compressor(ikv[sl], isc[sl], s.start, lc.index_state,
                                                                 self.freqs))
                    ikeys = lc.index_keys.view()
                    base = sum(k.shape[0] for k in ipool)
                    ipool.append(ikeys)
                    i_start.append(torch.full_like(pos, base))
                    i_len.append(visible.clamp(max=ikeys.shape[0]))
                    i_base.append(torch.full_like(pos, rows - base))  # index row -> kv pool row
                pool.append(comp)
                rows += comp.shape[0]
            idx_rows.append(parts)

        if self.kind == CSA:
            sel = ops.indexer_topk(iq, torch.cat(ipool), iw, torch.cat(i_start), torch.cat(i_len),
                                   self.indexer.topk)  # [T, topk] rows of the index pool
            shift = torch.cat(i_base)[:, None]
            sel = torch.where(sel >= 0, sel + shift, sel)
            off = 0
            for parts, s in zip(idx_rows, batch.seqs):
                parts.append(sel[off:off + s.n])
                off += s.n
        idx = self._stack_indices(idx_rows)
        o = ops.sparse_attn(q, torch.cat(pool), idx, self.attn_sink, self.head_dim ** -0.5)  # [T, H, hd]

        # K = V carries rope: undo it on the output at the query position.
        o = apply_rope(o, cos, sin, inverse=True)
        for s in batch.seqs:  # ring update after attention (the chunk's own rows were read from `kv`)
            lc = s.cache.layers[self.layer_id]
            keep = min(s.n, self.window)
            p = torch.arange(s.start + s.n - keep, s.start + s.n, device=x.device)
            lc.window[p % self.window] = kv[s.offset + s.n - keep: s.offset + s.n].to(lc.window.dtype)
        return self._out_proj(o)

    @staticmethod
    def _stack_indices(idx_rows: list[list[torch.Tensor]]) -> torch.Tensor:
        """Per-sequence lists of [n, k_i] index blocks -> one [T, K] tensor padded with -1."""
        per_seq = [torch.cat(parts, dim=1) for parts in idx_rows]
        width = max(p.shape[1] for p in per_seq)
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=-1) for p in per_seq])

    def _out_proj(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output projection: per-group wo_a (dense BF16), then wo_b."""
        G = self.args.o_groups
        T = o.shape[0]
        og = o.reshape(T, G, -1)  # [T, G, (H/G)*hd]
        wa = self.wo_a.dense_weight(o.dtype).view(G, self.args.o_lora_rank, -1)  # [G, r, (H/G)*hd]
        z = torch.einsum("tgi,gri->tgr", og, wa).reshape(T, -1)  # [T, G*r]
        return self.wo_b(z)
