"""Engine settings (what the engine may do), apart from model architecture (`ModelArgs`) and per-request
sampling (`SamplingParams`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


SPECULATIVE_METHODS = ("none", "mtp", "dspark")


@dataclass
class EngineConfig:
    """Attributes:
        max_num_seqs: sequences decoded together at most (running set).
        max_num_batched_tokens: token budget of one step; long prompts are prefilled in chunks of it.
        max_model_len: prompt + output tokens per sequence at most (None = the model's max_seq_len).
        block_size: tokens per cache block: the unit of paging and of prefix-cache hits. A multiple of every
            compression ratio of the model (128 for V4: one block then holds a whole entry of every kind).
        num_blocks: compressed-cache blocks for all sequences together (None = derived from cache_gib).
        cache_gib: memory for the compressed cache (entries, indexer keys, block-end compressor state).
        kv_cache_dtype: "auto" (the activation dtype) or "fp8" (584-byte FP8 entries, model-spec §10.2, for
            window rows and compressed entries; indexer keys stay in the activation dtype).
        enable_prefix_caching: share the cache blocks of a prompt prefix of whole blocks between requests.
        prefix_cache_gib: extra sliding-window blocks kept for prefix hits (compressed blocks of finished
            prompts stay cached in cache_gib's pool until it needs them; least recently used go first).
        max_queue: requests allowed to wait beyond the running set; more are refused (server: 429).
        step_timeout_s: a step taking longer marks the engine unhealthy (hang detection).
        speculative: speculative decoding, "none", "mtp" (the April checkpoints' MTP block drafts one token
            per sequence, verified in the next step with the real one) or "dspark" (the 0731/0813 DSpark
            module drafts `speculative_tokens` per sequence, verified as a chain in the next step).
        speculative_tokens: draft tokens per step and sequence (0: the default, 1 for MTP and the checkpoint's
            dspark_block_size for DSpark; MTP supports 1 only).
        speculative_threshold: DSpark's adaptive draft length: cut each draft at the first position whose
            confidence sigmoid(confidence logit) is below this (0 = fixed length).
        speculative_draft_sampling: DSpark drafts for requests with temperature > 0: "greedy" (argmax of the
            Markov-corrected logits, as vLLM's DSpark recipe; verified by matching the target's sample, which
            keeps a seeded request's tokens identical to decoding without drafts) or "sample" (drawn from
            softmax(logits / T) like the official reference; verified by speculative sampling against that
            distribution: the same output distribution, more drafts accepted at high temperature, but no longer
            the same tokens as without drafts). Greedy requests always get greedy drafts.
        speculative_mtp: the older switch for speculative="mtp" (kept for existing callers).
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    block_size: int = 128
    num_blocks: int | None = None
    cache_gib: float = 4.0
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    prefix_cache_gib: float = 1.0
    max_queue: int = 256
    step_timeout_s: float = 600.0
    speculative: str = "none"
    speculative_tokens: int = 0
    speculative_threshold: float = 0.0
    speculative_draft_sampling: str = "greedy"
    speculative_mtp: bool = False

    def __post_init__(self) -> None:
        for f in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"EngineConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"EngineConfig.kv_cache_dtype must be 'auto' or 'fp8', got {self.kv_cache_dtype!r}")
        if self.speculative_mtp and self.speculative == "none":
            self.speculative = "mtp"
        if self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"EngineConfig.speculative must be one of {', '.join(SPECULATIVE_METHODS)}, got "
                             f"{self.speculative!r}")
        self.speculative_mtp = self.speculative == "mtp"
        if self.speculative_tokens < 0 or (self.speculative == "mtp" and self.speculative_tokens > 1):
            raise ValueError(f"EngineConfig.speculative_tokens must be >= 0 (MTP: 0 or 1), got "
                             f"{self.speculative_tokens}")
        if self.speculative_draft_sampling not in ("greedy", "sample"):
            raise ValueError(f"EngineConfig.speculative_draft_sampling must be 'greedy' or 'sample', got "
                             f"{self.speculative_draft_sampling!r}")
        if not 0 <= self.speculative_threshold < 1:
            raise ValueError(f"EngineConfig.speculative_threshold must be in [0, 1), got {self.speculative_threshold}")
        if self.max_queue < 0:
            raise ValueError(f"EngineConfig.max_queue must be >= 0, got {self.max_queue}")

    @classmethod
    def from_kwargs(cls, **kw) -> "EngineConfig":
        """Build from keyword arguments, ignoring those that are not engine settings."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kw.items() if k in names})
