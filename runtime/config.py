"""Engine settings (what the engine may do), apart from model architecture (`ModelArgs`) and per-request
sampling (`SamplingParams`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class EngineConfig:
    """Attributes:
        max_num_seqs: sequences decoded together at most (running set).
        max_num_batched_tokens: token budget of one step; long prompts are prefilled in chunks of it.
        max_model_len: prompt + output tokens per sequence at most (None = the model's max_seq_len).
        block_size: tokens per cache block: the unit of cache accounting and of prefix-cache hits.
        num_blocks: cache blocks for all sequences together (None = derived from cache_gib).
        cache_gib: cache memory budget used to derive num_blocks from the model's bytes per token.
        enable_prefix_caching: reuse the cache state of a shared, block-aligned prompt prefix.
        prefix_cache_gib: memory for prefix-cache snapshots (least recently used evicted first).
        max_queue: requests allowed to wait beyond the running set; more are refused (server: 429).
        step_timeout_s: a step taking longer marks the engine unhealthy (hang detection).
        speculative_mtp: MTP speculative decoding: the MTP block drafts one token per sequence, verified
            in the next step together with the real one (2 tokens per step when accepted).
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    block_size: int = 64
    num_blocks: int | None = None
    cache_gib: float = 4.0
    enable_prefix_caching: bool = True
    prefix_cache_gib: float = 1.0
    max_queue: int = 256
    step_timeout_s: float = 600.0
    speculative_mtp: bool = False

    def __post_init__(self) -> None:
        for f in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"EngineConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.max_queue < 0:
            raise ValueError(f"EngineConfig.max_queue must be >= 0, got {self.max_queue}")

    @classmethod
    def from_kwargs(cls, **kw) -> "EngineConfig":
        """Build from keyword arguments, ignoring those that are not engine settings."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kw.items() if k in names})
