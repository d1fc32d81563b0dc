"""KV compressor of CSA (ratio 4, overlapping) and HCA (ratio 128) layers, and the indexer's own (dc=128).

Per token: a = W_kv x, g = W_gate x + ape[pos mod m] (fp32, width c*dc; c = 2 with overlap). Entry w pools,
per channel with a softmax over slots: HCA the m tokens of window w; CSA 8 slots = the A-half (first dc
channels) of window w-1's tokens and the B-half of window w's tokens (model-spec §4.4). Then RMSNorm, RoPE
at position w*m on the last rope dims, and the QAT round-trip (FP8 for KV, Hadamard + FP4 for indexer keys).
"""

from __future__ import annotations

import torch
from torch import nn

from ascend_v4 import ops

from .args import ModelArgs
from .compress_plan import CompressPlan
from .layers import DENSE, Linear, ModelOptions, RMSNorm
from .rope import apply_rope, cos_sin


class Compressor(nn.Module):
    def __init__(self, args: ModelArgs, opts: ModelOptions, ratio: int, dc: int, for_indexer: bool):
        super().__init__()
        self.ratio, self.dc, self.opts = ratio, dc, opts
        self.overlap = ratio == 4
        self.for_indexer = for_indexer
        self.nope = dc - args.rope_head_dim
        c = 2 if self.overlap else 1
        self.wkv = Linear(args.dim, c * dc, DENSE, opts, fp32_compute=True)
        self.wgate = Linear(args.dim, c * dc, DENSE, opts, fp32_compute=True)
        self.ape = nn.Parameter(torch.empty(ratio, c * dc, dtype=torch.float32), requires_grad=False)
        self.norm = RMSNorm(dc, args.norm_eps, opts.dtype)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projections of every token of the step at once (one weight read for the whole batch):
        x [T, D], positions [T] -> kv, gate scores [T, c*dc] fp32 (the logits plus the slot bias
        ape[position mod m])."""
        return self.wkv(x).float(), self.wgate(x).float() + self.ape[positions % self.ratio]

    def forward(self, kv: torch.Tensor, score: torch.Tensor, run: tuple, plan: CompressPlan,
                freqs: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Feed a group of sequences' step tokens (kv, score [Tg, c*dc] from `project`, slot bias included) through
        their running states (`run` = this compressor's `CachePool.run` tensors, updated in place; `plan` = the
        step's indices, compress_plan.py). Returns the E new entries [E, dc] (activation dtype) and, for CSA, the
        A-half (kv, score) [E, m, dc] fp32 of each new window: the state the next entry pools with, which the
        paged cache keeps at block ends so a shared prefix can resume there."""
        m, dc, E = self.ratio, self.dc, plan.n_new
        buf_kv, buf_sc, prev_kv, prev_sc = run
        C = buf_kv.shape[-1]
        flat_kv, flat_sc = buf_kv.view(-1, C), buf_sc.view(-1, C)
        out, halves = kv.new_empty(0, dc).to(self.opts.dtype), None
        if E:
            win_kv, win_sc = kv.new_empty(E * m, C), kv.new_empty(E * m, C)  # the closing windows' token rows
            for win, step, flat in ((win_kv, kv, flat_kv), (win_sc, score, flat_sc)):
                win[plan.dst_step] = step[plan.src_step]
                if plan.dst_buf.numel():
                    win[plan.dst_buf] = flat[plan.src_buf]
            win_kv, win_sc = win_kv.view(E, m, C), win_sc.view(E, m, C)
            if self.overlap:
                # slots 0..m-1: A-half of the previous window; m..2m-1: B-half of this one.
                halves = (win_kv[:, :, :dc], win_sc[:, :, :dc])
                prev = [torch.cat((h, h.new_full((1, m, dc), fill), p[plan.prev_slots]))[plan.prev_from]
                        for h, fill, p in zip(halves, (0.0, float("-inf")), (prev_kv, prev_sc))]
                win_kv = torch.cat((prev[0], win_kv[:, :, dc:]), dim=1)  # [E, 2m, dc]
                win_sc = torch.cat((prev[1], win_sc[:, :, dc:]), dim=1)
            pooled = ops.compress_kv(win_kv, win_sc)  # [E, dc] fp32
            # Post-processing in the order of the reference: cast, norm, RoPE at the window's first position.
            out = apply_rope(self.norm(pooled.to(self.opts.dtype)), *cos_sin(freqs, plan.wpos))
            if self.opts.quant_sim:
                if self.for_indexer:
                    out = ops.fp4_roundtrip(ops.hadamard(out), 32)
                else:
                    out = torch.cat((ops.fp8_roundtrip(out[:, :self.nope].contiguous(), 64), out[:, self.nope:]), -1)
        # The state after the step (written after the reads above): open windows' tokens, last A-halves.
        if plan.buf_dst.numel():
            flat_kv[plan.buf_dst], flat_sc[plan.buf_dst] = kv[plan.buf_src], score[plan.buf_src]
        if halves is not None and plan.last_slots.numel():
            prev_kv[plan.last_slots] = halves[0][plan.last_entries]
            prev_sc[plan.last_slots] = halves[1][plan.last_entries]
        return out, halves
