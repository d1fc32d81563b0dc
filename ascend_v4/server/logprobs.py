"""Log-probs in the OpenAI shapes: chat (`ChoiceLogprobs`), legacy completions (`CompletionLogprobs`, echoed prompt
tokens included) and vLLM's `prompt_logprobs`. The numbers come from the engine (`Sampled`, `StepOutput`)."""

from __future__ import annotations

from ascend_v4.runtime.sampling import Sampled

from .outputs import OutputTracker, token_text
from .protocol import ChoiceLogprobs, CompletionLogprobs, LogprobEntry, PromptLogprob, TopLogprob


def chat_logprobs(tokenizer, sampled: list[Sampled]) -> ChoiceLogprobs:
    def top(tok: int, lp: float) -> TopLogprob:
        return TopLogprob(token=token_text(tokenizer, tok), logprob=lp, bytes=list(tokenizer.token_bytes(tok)))

    return ChoiceLogprobs(content=[
        LogprobEntry(token=token_text(tokenizer, s.token), logprob=s.logprob if s.logprob is not None else 0.0,
                     bytes=list(tokenizer.token_bytes(s.token)),
                     top_logprobs=[top(t, lp) for t, lp in (s.top or [])])
        for s in sampled])


def completion_logprobs(tokenizer, sampled: list[Sampled | None], offset: int, prompt_ids: list[int] = (),
                        lp: CompletionLogprobs | None = None) -> CompletionLogprobs:
    """Legacy-completions log-probs of `sampled` (appended to `lp`); a None entry (the first prompt token,
    which nothing predicts) is `prompt_ids`' token with log-prob and alternatives None."""
    lp = lp or CompletionLogprobs()
    for j, s in enumerate(sampled):
        tok = token_text(tokenizer, s.token if s is not None else prompt_ids[j])
        lp.tokens.append(tok)
        lp.token_logprobs.append(s.logprob if s is not None else None)
        lp.top_logprobs.append({token_text(tokenizer, t): v for t, v in s.top} if s is not None and s.top else None)
        lp.text_offset.append(offset)
        offset += len(tok)
    return lp


def choice_logprobs(tokenizer, t: OutputTracker, echo_ids: list[int] | None) -> CompletionLogprobs:
    """A choice's log-probs: with echo (`echo_ids`, the prompt's ids), every prompt token's first (the first token
    with None: nothing predicts it), then the generated ones; offsets counted over the token texts from 0 (as
    vLLM does)."""
    if echo_ids is None or t.prompt_logprobs is None:
        return completion_logprobs(tokenizer, t.logprobs, 0)
    lp = completion_logprobs(tokenizer, t.prompt_logprobs, 0, echo_ids)
    end = lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else 0
    return completion_logprobs(tokenizer, t.logprobs, end, lp=lp)


def vllm_prompt_logprobs(tokenizer, plp: list[Sampled | None] | None) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}},
    the token itself first, then its alternatives."""
    if plp is None:
        return None
    out: list = []
    for s in plp:
        if s is None:
            out.append(None)
            continue
        d = {str(s.token): PromptLogprob(logprob=s.logprob, rank=s.rank, decoded_token=token_text(tokenizer, s.token))}
        for r, (t, v) in enumerate(s.top or [], 1):
            d.setdefault(str(t), PromptLogprob(logprob=v, rank=r, decoded_token=token_text(tokenizer, t)))
        out.append(d)
    return out


__all__ = ["chat_logprobs", "completion_logprobs", "choice_logprobs", "vllm_prompt_logprobs"]
