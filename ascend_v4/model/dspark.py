"""DSpark, the draft module of V4-Flash-0731 / V4-Pro-0813 (dspark-spec.md §2): three window-only stages under
`mtp.{0,1,2}` that propose a block of K tokens per sequence from one anchor token, a rank-r Markov head applied
token by token, and a confidence head.

Where the pieces live in this toolkit:

* **Rings.** Each stage's 128-slot ring of context KV (`kv_norm_s(wkv_s(main_x_p))`, RoPE at p, FP8 round-trip
  of the nope dims) is the stage's *window cache*: cache layer `n_layers + s` of the paged pool, addressed by
  position like every window row. `write_context` fills it for every token of a target forward (prefill chunks,
  decodes, verify chunks), so chunked prefill, prefix-cache hits (window blocks are shared), preemption and
  the FP8 cache need nothing of their own, and a ring never holds a rejected position that a draft could
  read: a draft at main position p reads positions p-W+1 .. p, all committed, and rows past a rollback are
  rewritten by the next forward before anything reads them.
* **Block.** `[anchor, noise x (K-1)]` at positions p+1 .. p+K goes through the stages; its own K=V rows are
  never cached. Every block query sees the ring and all K block rows (non-causal inside the block) plus the
  sink (`DSparkAttention.forward_block`).
* **Head.** The last stage's mHC head and norm, the target's LM head (shared), then the Markov correction
  step by step in fp32 (`markov_w2 . markov_w1[prev]` added to the logits of slot k, prev = the token just
  drafted) and the confidence logit `proj([h_k ; e_k])` (h_k before the norm).

Shapes: S sequences drafting, K block slots each, rows ordered sequence-major ([S*K] = s*K + k).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .attention import Attention
from .block import Block, _f32
from .layers import FP8, Linear, ModelOptions, RMSNorm
from .rope import apply_rope, cos_sin
from .step_batch import StepBatch
from .tp import TPShard


@dataclass
class BlockContext:
    """What every stage's attention needs for one draft forward (built once, shared by the stages).

    positions: [S*K] block positions p+1 .. p+K per sequence. ring_rows: [S, W] window-region pool rows of
    positions p-W+1 .. p (-1 before position 0), the same rows in every stage's layer. key_index: [S*K, W+K]
    rows of the key tensor each query sees: its sequence's W ring rows (gathered first), then its K block rows.
    """

    pool: object  # model.cache.CachePool
    positions: torch.Tensor
    ring_rows: torch.Tensor
    key_index: torch.Tensor
    tokens: torch.Tensor  # [S*K] block token ids (the MoE gate's argument; stages route by score)

    @classmethod
    def build(cls, pool, caches: list, main_pos: torch.Tensor, tokens: torch.Tensor, K: int,
              window: int) -> "BlockContext":
        dev = main_pos.device
        S = main_pos.shape[0]
        rel = torch.arange(1 - window, 1, device=dev)
        ring = [c.window_rows(p + rel) for c, p in zip(caches, main_pos)]  # each [W]
        ring_rows = torch.stack(ring) if ring else torch.zeros(0, window, dtype=torch.long, device=dev)
        # Keys: the S*W gathered ring rows, then the S*K block rows.
        ring_idx = torch.where(ring_rows >= 0, torch.arange(S * window, device=dev).view(S, window), -1)
        block_idx = S * window + torch.arange(S * K, device=dev).view(S, K)
        key_index = torch.cat((ring_idx, block_idx), 1).repeat_interleave(K, dim=0)  # [S*K, W+K]
        positions = (main_pos[:, None] + 1 + torch.arange(K, device=dev)).reshape(-1)
        return cls(pool, positions, ring_rows, key_index, tokens)


class DSparkAttention(Attention):
    """A stage's attention: window-only (theta 10000, no YaRN, model-spec §4.2), over the ring plus the block."""

    def context_kv(self, main_x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Ring entries [T, hd] of the projected target features main_x [T, D] at their positions."""
        cos, sin = cos_sin(self.freqs, positions)
        return self.latent_kv(main_x, cos, sin)

    def forward_block(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """x [S*K, D] (normed stage input of the block) -> [S*K, D]; reads this stage's ring, writes nothing."""
        if x.shape[0] == 0:  # an idle rank's empty draft: the MoE still joins the expert exchange
            return torch.zeros_like(x)
        cos, sin = cos_sin(self.freqs, ctx.positions)
        q, kv, _ = self.q_kv(x, cos, sin)  # [S*K, H, hd], [S*K, hd]
        pool = ctx.pool
        ring = pool.kv[self.layer_id][ctx.ring_rows.clamp_min(0).reshape(-1)]  # [S*W, E] (E: pool row format)
        keys = torch.cat((ring, pool.pack(kv)))  # [S*W + S*K, E]
        o = pool.attend(self.layer_id, q, ctx.key_index, self.attn_sink, self.head_dim ** -0.5, kv=keys)
        return self._out_proj(apply_rope(o, cos, sin, inverse=True))


class MarkovHead(nn.Module):
    """markov_w1 [V, r] (token -> rank-r embedding, BF16 as stored) and markov_w2 [V, r] (held fp32, as the
    reference upcasts it at load: the correction is added to fp32 logits)."""

    def __init__(self, vocab: int, rank: int, dtype: torch.dtype):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab, rank, dtype=dtype)
        self.markov_w2 = nn.Linear(rank, vocab, bias=False, dtype=torch.float32)
        for p in self.parameters():
            p.requires_grad_(False)


class ConfidenceHead(nn.Module):
    """proj [1, D + r] without bias, fp32 (upcast at load like the reference)."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.proj = nn.Linear(dim + rank, 1, bias=False, dtype=torch.float32)
        self.proj.weight.requires_grad_(False)


@dataclass
class Draft:
    """One draft forward's result for S sequences: tokens [S, K] (d_0 .. d_{K-1}, position p+2+k), the raw
    confidence logits [S, K] (sigmoid: P(d_k accepted | d_0 .. d_{k-1} accepted)) and, for the sequences whose
    tokens were sampled, the distributions they were sampled from ({sequence index: [K, V]})."""

    tokens: torch.Tensor
    confidence: torch.Tensor
    probs: dict[int, torch.Tensor] = field(default_factory=dict)


def write_context(stages: nn.ModuleList, taps: list[torch.Tensor], batch: StepBatch, window: int) -> None:
    """Fill every stage's ring with the step's tokens: main_x = main_norm(main_proj([taps])), one ring entry per
    token and stage, written at the token's window row (each cache pool of the batch apart)."""
    if not batch.seqs:
        return
    first = stages[0]
    main_x = first.main_norm(first.main_proj(torch.cat(taps, -1)))  # [T, D]
    for which, sel in batch.pool_groups():
        pool = batch.seqs[which[0]].cache.pool
        rows = batch.group_window_rows(which, window)[:, -1]  # each token's own row
        x, pos = (main_x, batch.positions) if sel is None else (main_x[sel], batch.positions[sel])
        for st in stages:
            pool.write_kv(st.attn.layer_id, rows, st.attn.context_kv(x, pos))


def markov_sample(stage, h: torch.Tensor, logits: torch.Tensor, anchors: torch.Tensor,
                  sample: dict[int, tuple[float, list[torch.Generator]]] | None = None) -> Draft:
    """Draw the block's tokens one slot at a time: argmax of the corrected logits, or for the sequences in
    `sample` ({index: (temperature, one generator per slot)}) a draw from softmax(corrected logits / T), as the
    reference does with T > 0 (dspark-spec.md §2 step 5; a categorical draw instead of its Gumbel-max, the same
    distribution).

    h [S, K, D] the last stage's mHC head output (before the norm), logits [S, K, V] fp32 from the LM head,
    anchors [S]. Slot k adds markov_w2 . markov_w1[prev] to its logits, prev = the anchor for k = 0, else
    d_{k-1}; its confidence logit is proj([h_k ; markov_w1[prev]])."""
    mh, proj = stage.markov_head, stage.confidence_head.proj.weight
    prev, toks, conf = anchors, [], []
    sample = sample or {}
    probs: dict[int, list[torch.Tensor]] = {i: [] for i in sample}
    for k in range(logits.shape[1]):
        e = mh.markov_w1.weight[prev].float()  # [S, r]
        u = logits[:, k] + F.linear(e, mh.markov_w2.weight)  # [S, V]
        prev = u.max(-1).indices
        if sample:
            prev = prev.clone()
            for i, (temp, gens) in sample.items():
                p = torch.softmax(u[i] / temp, dim=-1)
                prev[i] = torch.multinomial(p, 1, generator=gens[k])[0]
                probs[i].append(p)
        toks.append(prev)
        conf.append(F.linear(torch.cat((h[:, k].float(), e), -1), proj).squeeze(-1))
    dev = anchors.device
    return Draft(torch.stack(toks, 1) if toks else torch.zeros(anchors.shape[0], 0, dtype=torch.long, device=dev),
                 torch.stack(conf, 1) if conf else torch.zeros(anchors.shape[0], 0, device=dev),
                 {i: torch.stack(ps) for i, ps in probs.items() if ps})


class DSparkStage(Block):
    """Stage s (`mtp.{s}`): a V4 block with DSpark attention and score routing, plus main_proj / main_norm
    (stage 0) and the head parts (last stage: norm, mHC head, Markov head, confidence head)."""

    attn_cls = DSparkAttention

    def __init__(self, args: ModelArgs, opts: ModelOptions, s: int, experts: range | None = None,
                 tp: TPShard = TPShard()):
        super().__init__(args, opts, args.n_layers + s, experts, tp)
        d, n = args.dim, args.hc_mult
        if s == 0:
            self.main_proj = Linear(len(args.dspark_target_layer_ids) * d, d, FP8, opts)
            self.main_norm = RMSNorm(d, args.norm_eps, opts.dtype)
        if s == args.n_dspark_stages - 1:
            self.norm = RMSNorm(d, args.norm_eps, opts.dtype)
            self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _f32(n, n * d), _f32(n), _f32(1)
            self.markov_head = MarkovHead(args.vocab_size, args.dspark_markov_rank, opts.dtype)
            self.confidence_head = ConfidenceHead(d, args.dspark_markov_rank)

    def forward_block(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """x [S*K, n, D] residual streams of the block -> [S*K, n, D]."""
        return self.sublayers(x, lambda y: self.attn.forward_block(y, ctx), ctx.tokens)
