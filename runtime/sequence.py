"""One request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ascend_v4.model.cache import SeqCache

from .sampling import Sampled, SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    cache: SeqCache | None = None
    num_computed: int = 0  # tokens already in the cache
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the prompt's full blocks
    registered_blocks: int = 0  # prompt blocks already registered in the prefix cache
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: str | int | None = None  # matched stop string or stop token
    num_preemptions: int = 0
    draft: list[int] | None = None  # draft tokens (MTP: one; DSpark: up to K) for the positions after the last one
    draft_confidence: list[float] | None = None  # DSpark: sigmoid of each draft token's confidence logit
    draft_probs: object | None = None  # DSpark sampled drafts: the distributions [k, V] they were drawn from
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    # output text bookkeeping (stop strings are matched on text)
    text: str = ""
    emitted_chars: int = 0
    detok: object | None = None  # tokenizer.IncrementalDecoder, created on the first token
    logprobs: list[Sampled] = field(default_factory=list)
    matcher: object | None = None  # structured outputs: runtime.structured.SeqMatcher (params.grammar)
    # params.prompt_logprobs: one entry per prompt position (the first stays None), filled as prefill runs
    prompt_logprobs: list[Sampled | None] | None = None
    prompt_logprobs_sent: bool = False
    penalty_state: object | None = None  # runtime.sampling.PenaltyState, made on the first penalised sample

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """all_ids[start:stop] without building prompt + output (decode steps need one or two tokens)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:stop - n]
        return self.prompt_ids[start:stop] + (self.output_ids[:stop - n] if stop > n else [])

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        """More than the last token still has to go through the model (prompt, or recompute after preemption)."""
        return self.num_computed < self.num_tokens - 1 or (not self.output_ids and self.num_computed < self.num_tokens)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
