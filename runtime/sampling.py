"""Per-request sampling settings and the sampler.

`SamplingParams` is the per-request knob set (engine settings live elsewhere). Sampling draws from a
per-request `torch.Generator`, so a request with a seed is reproducible whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    Attributes:
        max_tokens: new tokens to generate at most.
        temperature: 0 means greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (0 or -1 = off).
        min_p: drop tokens whose probability is below min_p times the top one (0 = off).
        seed: seeds this request's generator (None = nondeterministic).
        stop_token_ids: extra token ids that end generation (EOS always does unless ignore_eos).
        ignore_eos: keep generating past EOS (benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1, 0 or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def make_generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """Pick the next token from fp32 logits [V] of one sequence."""
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits.float().cpu() / params.temperature
    if params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        drop = sp.cumsum(-1) - sp > params.top_p  # keep the smallest prefix reaching top_p mass
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
