"""Synthetic offline workloads: random token-id prompts (optionally sharing a prefix) and per-request output
lengths (optionally spread around a mean), reproducible from a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass

# Random prompt ids avoid the special / reserved ranges (model-spec §11: 0-2 are BOS/EOS/pad, 128000 and up
# are placeholders), so no prompt accidentally contains a control token.
FIRST_ID, LAST_ID = 100, 128000


@dataclass(frozen=True)
class Workload:
    """One concurrency level's requests: `prompts[i]` is generated for exactly `output_lens[i]` tokens."""

    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        """Useful output tokens: what the requests asked for (not what a padded batch computed)."""
        return sum(self.output_lens)


def output_len_range(output_len: int, spread: float) -> tuple[int, int]:
    """Smallest and largest output length for `output_len` tokens with relative spread `spread` in [0, 1)."""
    return max(1, round(output_len * (1 - spread))), max(1, round(output_len * (1 + spread)))


def make_workload(num_requests: int, input_len: int, output_len: int, *, spread: float = 0.0,
                  shared_prefix: int = 0, bos_id: int = 0, vocab_size: int = LAST_ID, seed: int = 0) -> Workload:
    """`num_requests` prompts of exactly `input_len` ids (BOS first) and their output lengths.

    Args:
        shared_prefix: the first `shared_prefix` ids (BOS included) are the same in every prompt; the rest
            differs per prompt. Must be smaller than `input_len`.
        spread: output lengths are drawn uniformly from `output_len_range(output_len, spread)` (as
            `vllm bench serve --random-range-ratio` does); 0 gives every request exactly `output_len`.
        seed: the same seed gives the same workload; different seeds give different non-shared parts but
            the same shared prefix (a warm-up run with seed + 1 then caches exactly the shared part).
    """
    if num_requests < 1 or input_len < 1 or output_len < 1:
        raise ValueError(f"num_requests, input_len and output_len must be >= 1, got {num_requests}, {input_len}, "
                         f"{output_len}")
    if not 0 <= shared_prefix < input_len:
        raise ValueError(f"shared_prefix must be in [0, input_len) = [0, {input_len}), got {shared_prefix}")
    if not 0 <= spread < 1:
        raise ValueError(f"spread must be in [0, 1), got {spread}")
    last = min(LAST_ID, vocab_size)
    if last <= FIRST_ID:
        raise ValueError(f"vocab_size {vocab_size} leaves no ordinary token ids in [{FIRST_ID}, {LAST_ID})")
    # The prefix has its own generator, independent of `seed`, so warm-up and timed runs share it.
    prefix_rng = random.Random(f"shared-prefix-{shared_prefix}")
    prefix = [bos_id] + [prefix_rng.randrange(FIRST_ID, last) for _ in range(max(shared_prefix - 1, 0))]
    rng = random.Random(seed)
    own = input_len - len(prefix)
    prompts = [prefix + [rng.randrange(FIRST_ID, last) for _ in range(own)] for _ in range(num_requests)]
    lo, hi = output_len_range(output_len, spread)
    lens = [rng.randint(lo, hi) for _ in range(num_requests)]
    return Workload(prompts, lens)


__all__ = ["Workload", "make_workload", "output_len_range", "FIRST_ID", "LAST_ID"]
