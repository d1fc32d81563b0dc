"""Offline generation on any engine with the `Engine` interface (`Engine`, `DistEngine`): submit prompts, step
until they finish, return each request's step outputs (`run_to_completion`) or its completion with phase timings
(`complete`). The one loop `LLM`, `Engine.generate`, `DistEngine.generate` and `generate_ids` share."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from ascend_v4.model.transformer import Transformer

from .config import EngineConfig
from .engine import Engine
from .sampling import SamplingParams

_batch_ids = itertools.count()  # request ids unique across calls on one long-lived engine


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS / stop token / stop string) or "length"
    text: str = ""
    prefill_s: float = 0.0  # until every request had its first token
    decode_s: float = 0.0  # the rest


def _submit(engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[str]:
    """Add every prompt; a refused one (RequestError) aborts those already added and is named by its index."""
    base = f"offline-{next(_batch_ids)}"
    ids = [f"{base}-{i}" for i in range(len(prompts))]
    for i, (rid, p, sp) in enumerate(zip(ids, prompts, params)):
        try:
            engine.add_request(rid, list(p), sp)
        except ValueError as e:  # RequestError
            for done in ids[:i]:
                engine.abort(done)
            raise type(e)(f"prompt {i}: {e}") from e
    return ids


def run_to_completion(engine, prompts: list[list[int]], params: list[SamplingParams],
                      on_step=None) -> list[list]:
    """Every step output of each request, in prompt order. `on_step(outs)` sees each step's outputs."""
    ids = _submit(engine, prompts, params)
    outs: dict[str, list] = {rid: [] for rid in ids}
    while engine.has_unfinished():
        step = engine.step()
        for o in step:
            if o.request_id in outs:
                outs[o.request_id].append(o)
        if on_step is not None:
            on_step(outs)
    return [outs[r] for r in ids]


def complete(engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
    """One Completion per prompt (token ids, text, finish reason, prefill / decode wall time of the batch)."""
    t0 = time.perf_counter()
    t_first: list[float] = []

    def first_tokens(outs: dict) -> None:
        if not t_first and all(any(o.new_token_ids or o.finished for o in v) for v in outs.values()):
            t_first.append(time.perf_counter())

    res = run_to_completion(engine, prompts, params, first_tokens)
    t_end = time.perf_counter()
    t1 = t_first[0] if t_first else t_end
    comps = []
    for p, outs in zip(prompts, res):
        c = Completion(list(p), [t for o in outs for t in o.new_token_ids],
                       outs[-1].finish_reason if outs else None, "".join(o.new_text for o in outs))
        c.prefill_s, c.decode_s = t1 - t0, t_end - t1
        comps.append(c)
    return comps


def generate_ids(model: Transformer, prompts: list[list[int]], params: list[SamplingParams], tokenizer=None,
                 max_step_tokens: int = 8192) -> list[Completion]:
    """`complete` on a fresh single-process engine sized for this batch (every prompt admitted at once)."""
    if tokenizer is None:
        from ascend_v4.tokenizer import Tokenizer
        tokenizer = Tokenizer.default()
    cfg = EngineConfig(max_num_seqs=max(1, len(prompts)), max_num_batched_tokens=max_step_tokens,
                       enable_prefix_caching=False, max_queue=0)
    return complete(Engine(model, tokenizer, cfg), prompts, params)


__all__ = ["Completion", "complete", "run_to_completion", "generate_ids"]
