"""Static-batch generation over the model's per-sequence caches: prefill all prompts in one flat step (in
chunks of at most `max_step_tokens`), then decode every unfinished sequence together, one token per step.

This is the simple loop behind `LLM.generate` today; the continuously batched engine with paged caches
replaces it later with the same model calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ascend_v4.model.cache import SeqCache, StepBatch, new_seq_cache
from ascend_v4.model.transformer import Transformer

from .sampling import SamplingParams, sample


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS / stop token) or "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0


def generate_ids(model: Transformer, prompts: list[list[int]], params: list[SamplingParams],
                 max_step_tokens: int = 8192) -> list[Completion]:
    """Generate for token-id prompts (BOS included by the caller if wanted). Returns one Completion each."""
    args = model.args
    device = model.embed.weight.device
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < args.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {args.vocab_size}): {bad[:5]}")
    outs = [Completion(list(p)) for p in prompts]
    caches = [new_seq_cache(args, model.opts.dtype, device) for _ in prompts]
    gens = [sp.make_generator() for sp in params]
    stops = [set(sp.stop_token_ids) | (set() if sp.ignore_eos else {args.eos_token_id}) for sp in params]

    # Prefill: flat chunks of several prompts; only each prompt's last row needs logits.
    t0 = time.perf_counter()
    last_logits: dict[int, torch.Tensor] = {}
    pending = [(i, 0) for i in range(len(prompts))]
    while pending:
        chunks, rows, budget, nxt = [], [], max_step_tokens, []
        for i, done in pending:
            take = min(len(prompts[i]) - done, budget) if budget > 0 else 0
            if take == 0:
                nxt.append((i, done))
                continue
            chunks.append((caches[i], prompts[i][done:done + take]))
            budget -= take
            rows.append((i, done + take == len(prompts[i])))
            if done + take < len(prompts[i]):
                nxt.append((i, done + take))
        batch = StepBatch.build(chunks, device)
        x = model(batch)
        batch.commit()
        ends = [(i, s.offset + s.n - 1) for (i, fin), s in zip(rows, batch.seqs) if fin]
        if ends:
            lg = model.logits(x[torch.tensor([r for _, r in ends], device=x.device)])
            for (i, _), l in zip(ends, lg):
                last_logits[i] = l
        pending = nxt
    prefill_s = time.perf_counter() - t0

    active = list(range(len(prompts)))
    for i in active:
        _append(outs[i], sample(last_logits[i], params[i], gens[i]), params[i], stops[i])
    active = [i for i in active if outs[i].finish_reason is None]
    t1 = time.perf_counter()
    while active:
        batch = StepBatch.build([(caches[i], [outs[i].token_ids[-1]]) for i in active], device)
        lg = model.logits(model(batch))
        batch.commit()
        for i, l in zip(active, lg):
            _append(outs[i], sample(l, params[i], gens[i]), params[i], stops[i])
        active = [i for i in active if outs[i].finish_reason is None]
    decode_s = time.perf_counter() - t1
    for o in outs:
        o.prefill_s, o.decode_s = prefill_s, decode_s
    return outs


def _append(out: Completion, tok: int, params: SamplingParams, stops: set[int]) -> None:
    out.token_ids.append(tok)
    if tok in stops:
        out.finish_reason = "stop"
    elif len(out.token_ids) >= params.max_tokens:
        out.finish_reason = "length"


__all__ = ["Completion", "generate_ids", "SeqCache"]
