"""Continuous batching: which sequences run in the next step, and how many tokens each.

Policy per step, within a token budget (`max_num_batched_tokens`):
1. running sequences that only need their last token (decode) get 1 token each, plus their draft tokens
   (speculative decoding; cut to the budget left);
2. running sequences still prefilling get chunks of what is left of the budget;
3. waiting sequences are admitted in arrival order while fewer than `max_num_seqs` run, the budget lasts
   and their blocks can be allocated (prefix-cache hits restore their state first).
If a running sequence cannot get its blocks, the most recently admitted running sequence is preempted
(cache dropped, recomputed later from its prompt and the tokens it already generated).
An admitted sequence first looks its prompt up in the prefix cache and shares the cached blocks it finds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ascend_v4.model.cache import CachePool, NoFreeBlocks, SeqCache

from .block_manager import BlockManager, PrefixCache, chain_hashes
from .config import EngineConfig
from .sequence import Sequence, SeqStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    tokens: list[int]  # token ids fed this step (ends with the draft tokens when `draft` is set)
    needs_logits: bool  # the chunk reaches the sequence's last known token
    draft: list[int] | None = None  # speculative tokens appended after the last known one


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager, prefix: PrefixCache | None, pool: CachePool):
        self.cfg, self.blocks, self.prefix, self.pool = cfg, blocks, prefix, pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue management ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop a sequence now and free its cache and blocks (abort frees at once)."""
        if seq.status is SeqStatus.RUNNING and seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
        if seq.cache is not None:
            seq.cache.free()
        seq.cache = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if seq.cache is not None:
            seq.cache.free()
        seq.cache, seq.num_computed, seq.cached_prompt_tokens, seq.draft = None, 0, 0, None
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        try:
            seq.cache.reserve(tokens)
        except NoFreeBlocks:
            return False
        return True

    @staticmethod
    def _chunk_len(seq: Sequence, budget: int) -> int:
        return min(seq.num_tokens - seq.num_computed, budget)

    # -- one step -------------------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledChunk]:
        budget = self.cfg.max_num_batched_tokens
        out: list[ScheduledChunk] = []
        # decode first (1 token each), then running prefills, oldest first
        order = sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed > 1, s.arrival))
        for seq in order:
            if seq not in self.running or budget == 0:
                continue
            n = self._chunk_len(seq, budget)
            d = self._draft_len(seq, n, budget)
            while not self._grow(seq, seq.num_computed + n + d):
                # preempt the latest admitted sequence not already scheduled this step (else this one)
                scheduled = {id(c.seq) for c in out}
                victim = next((s for s in reversed(self.running) if id(s) not in scheduled), seq)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            out.append(self._make(seq, n, d))
            budget -= n + d
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if seq.cache is None:
                self._restore(seq)
            n = self._chunk_len(seq, budget)
            d = self._draft_len(seq, n, budget)
            if not self._grow(seq, seq.num_computed + n + d):
                seq.cache.free()  # stays waiting; blocks shared from the prefix cache go back too
                seq.cache = None
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.append(self._make(seq, n, d))
            budget -= n + d
        return out

    def _restore(self, seq: Sequence) -> None:
        """Fresh cache for an admitted sequence, from the prefix cache when its prompt prefix is stored."""
        seq.registered_blocks = 0
        if self.prefix is not None:
            B = self.cfg.block_size
            if not seq.block_hashes:
                seq.block_hashes = chain_hashes(seq.prompt_ids, B, PrefixCache.boundary(len(seq.prompt_ids), B) // B)
            # Prompt log-probs need the prefix's hidden states: recompute it (its blocks are still registered).
            hit, cache = (0, None) if seq.params.prompt_logprobs is not None else \
                self.prefix.lookup(seq.prompt_ids, seq.block_hashes, self.pool)
            if cache is not None:
                cache.state_upto = len(seq.block_hashes)  # prompt blocks a later request may resume after
                seq.cache, seq.num_computed = cache, hit
                seq.cached_prompt_tokens, seq.registered_blocks = hit, hit // B
                return
        seq.cache, seq.num_computed = SeqCache(self.pool, self.blocks, auto_trim=False), 0
        # State slots only for the prompt blocks a later request may resume after.
        seq.cache.state_upto = len(seq.block_hashes) if self.prefix is not None and self.pool.has_state else 0

    @staticmethod
    def _draft_len(seq: Sequence, n: int, budget: int) -> int:
        """Draft tokens the chunk of n tokens carries: the sequence's draft when the chunk reaches its last token,
        cut to what the step's token budget has left (drafts count against it, as in vLLM)."""
        if not seq.draft or seq.num_computed + n != seq.num_tokens:
            return 0
        return max(0, min(len(seq.draft), budget - n))

    def _make(self, seq: Sequence, n: int, d: int) -> ScheduledChunk:
        toks = seq.token_slice(seq.num_computed, seq.num_computed + n)
        draft = list(seq.draft[:d]) if d else None
        return ScheduledChunk(seq, toks + (draft or []), seq.num_computed + n == seq.num_tokens, draft)

