"""Offline generation for token-id prompts: runs the `Engine` to completion with every prompt admitted at once
(one flat prefill step when the token budget allows, then batched decode) and reports phase timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ascend_v4.model.transformer import Transformer

from .config import EngineConfig
from .engine import Engine
from .sampling import SamplingParams


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS / stop token / stop string) or "length"
    text: str = ""
    prefill_s: float = 0.0  # until every request had its first token
    decode_s: float = 0.0  # the rest


def generate_ids(model: Transformer, prompts: list[list[int]], params: list[SamplingParams], tokenizer=None,
                 max_step_tokens: int = 8192) -> list[Completion]:
    """Generate for token-id prompts (BOS included by the caller if wanted). Returns one Completion each."""
    if tokenizer is None:
        from ascend_v4.tokenizer import Tokenizer
        tokenizer = Tokenizer.default()
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
    cfg = EngineConfig(max_num_seqs=max(1, len(prompts)), max_num_batched_tokens=max_step_tokens,
                       enable_prefix_caching=False, max_queue=0)
    engine = Engine(model, tokenizer, cfg)
    rids = [f"p{i}" for i in range(len(prompts))]
    try:
        for rid, p, sp in zip(rids, prompts, params):
            engine.add_request(rid, p, sp)
    except Exception as e:  # RequestError is a ValueError; name the prompt
        raise ValueError(f"prompt {rids.index(rid)}: {e}") from e
    outs = {rid: Completion(list(p)) for rid, p in zip(rids, prompts)}
    t0 = time.perf_counter()
    t_first = None
    while engine.has_unfinished():
        for o in engine.step():
            c = outs[o.request_id]
            c.token_ids += o.new_token_ids
            c.text += o.new_text
            if o.finished:
                c.finish_reason = o.finish_reason
        if t_first is None and all(c.token_ids for c in outs.values()):
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    t_first = t_first or t_end
    for c in outs.values():
        c.prefill_s, c.decode_s = t_first - t0, t_end - t_first
    return [outs[r] for r in rids]
