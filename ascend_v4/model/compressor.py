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
from .cache import CompressorState
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

    def forward(self, kv: torch.Tensor, score: torch.Tensor, state: CompressorState,
                freqs: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Feed one sequence's next projected tokens (kv, score [n, c*dc] from `project`, slot bias included);
        advances `state` and returns the new entries [k, dc] (in the activation dtype) and, for CSA, the A-half
        (kv, score) [k, m, dc] fp32 of each new window: the state the next entry pools with, which the paged
        cache keeps at block ends so a shared prefix can resume there."""
        m, dc = self.ratio, self.dc
        halves = None
        if state.buf_kv is not None:
            kv, score = torch.cat((state.buf_kv, kv)), torch.cat((state.buf_score, score))
        n_win = kv.shape[0] // m
        used = n_win * m
        state.buf_kv, state.buf_score = kv[used:], score[used:]
        if n_win == 0:
            return kv.new_empty(0, dc).to(self.opts.dtype), None
        kv = kv[:used].view(n_win, m, -1)  # [w, m, c*dc]
        score = score[:used].view(n_win, m, -1)
        if self.overlap:
            # slots 0..m-1: A-half of the previous window; m..2m-1: B-half of this one.
            prev_kv = torch.cat((self._prev(state, "kv", kv), kv[:-1, :, :dc]))  # [w, m, dc]
            prev_sc = torch.cat((self._prev(state, "score", score), score[:-1, :, :dc]))
            halves = (kv[:, :, :dc], score[:, :, :dc])
            state.prev_kv, state.prev_score = kv[-1, :, :dc], score[-1, :, :dc]
            kv = torch.cat((prev_kv, kv[:, :, dc:]), dim=1)  # [w, 2m, dc]
            score = torch.cat((prev_sc, score[:, :, dc:]), dim=1)
        pooled = ops.compress_kv(kv, score)  # [w, dc] fp32
        first = state.n_entries
        state.n_entries += n_win
        # Post-processing in the order of the reference: cast, norm, RoPE at the window's first position.
        out = self.norm(pooled.to(self.opts.dtype))
        wpos = torch.arange(first, first + n_win, device=kv.device) * m
        out = apply_rope(out, *cos_sin(freqs, wpos))
        if self.opts.quant_sim:
            if self.for_indexer:
                out = ops.fp4_roundtrip(ops.hadamard(out), 32)
            else:
                out = torch.cat((ops.fp8_roundtrip(out[:, :self.nope].contiguous(), 64), out[:, self.nope:]), -1)
        return out, halves

    def _prev(self, state: CompressorState, what: str, like: torch.Tensor) -> torch.Tensor:
        """A-half of the window before the first one in this chunk: from the state, else empty (-inf score)."""
        t = state.prev_kv if what == "kv" else state.prev_score
        if t is not None:
            return t[None]
        fill = 0.0 if what == "kv" else float("-inf")
        return like.new_full((1, self.ratio, self.dc), fill)
