"""The engine: requests in, one model step at a time, token/text deltas out.

    engine = Engine(model, tokenizer, EngineConfig())
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step(): ...

Each step runs the scheduler's chunks of all scheduled sequences as one flat batch through the model
(prefill chunks and decode tokens mixed), samples where a chunk reached a sequence's last token, then
detokenizes incrementally and applies stop conditions. Not thread-safe: `AsyncEngine` drives it from one
thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ascend_v4.model.cache import COMP_KIND, STATE_KIND, WINDOW_KIND, SeqSlice, StepBatch, mark, rollback
from ascend_v4.model.transformer import Transformer
from ascend_v4.ops import active_backends, cpu_native
from ascend_v4.tokenizer import Tokenizer

from .block_manager import BlockManager, PrefixCache, make_cache_pool
from .config import EngineConfig
from .cpu_alloc import keep_freed_heap
from .sampling import (PenaltyState, SampleRow, Sampled, SamplingParams, has_penalties, position_generator,
                       score_tokens)
from .scheduler import Scheduler
from .sequence import Sequence, SeqStatus
from .speculative import (SpecStats, accepted_prefix, check_method, default_tokens, dspark_propose, mtp_propose,
                          sample_step)
from .structured import GrammarCompiler, GrammarError, compute_masks, mask_rows, unpack_mask

PROMPT_LOGPROB_ROWS = 256  # prompt positions per slice through the LM head when scoring a prompt


class RequestError(ValueError):
    """A request the engine cannot take (bad prompt, too long, duplicate id)."""


@dataclass
class StepOutput:
    """What one request gained in one step (streaming delta) and, when finished, how it ended."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: str | int | None = None
    logprobs: list[Sampled] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    # SamplingParams.prompt_logprobs: every prompt position's entry (position 0: None), in the first output only
    prompt_logprobs: list[Sampled | None] | None = None


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 token_sync: Callable[[list[Sampled]], list[Sampled]] | None = None, lockstep: bool = False):
        """`token_sync`: for multi-process runs where the ranks of a TP group step the same engine (SPMD), a
        collective that replaces each rank's sampled tokens by the group leader's, so they advance identically.
        `lockstep`: attention data parallelism; every step runs one main forward (and with MTP one MTP forward)
        even with nothing scheduled (an empty batch), because the MoE layers exchange tokens with every rank."""
        self.model, self.tokenizer, self.token_sync, self.lockstep = model, tokenizer, token_sync, lockstep
        self.config = cfg = config or EngineConfig()
        args = model.args
        self.max_model_len = min(cfg.max_model_len or args.max_seq_len, args.max_seq_len)
        device = model.embed.weight.device
        if device.type == "cpu":
            keep_freed_heap()  # activations come straight from malloc on the CPU: keep its freed pages
            if active_backends()["cpu"] == "cpu":  # (not with ASCEND_V4_OP_BACKEND=reference)
                cpu_native.load()  # build / load the C kernels now, not in the first request (cached per machine)
        self.pool = pool = make_cache_pool(model, cfg, device)
        self.blocks = BlockManager.for_pool(pool)
        self.prefix = PrefixCache(self.blocks, args.window_size) if cfg.enable_prefix_caching else None
        self.scheduler = Scheduler(cfg, self.blocks, self.prefix, pool)
        self.seqs: dict[str, Sequence] = {}
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "finished": 0, "aborted": 0}
        self.spec = cfg.speculative  # none | mtp | dspark (runtime/speculative.py)
        if self.spec != "none":
            check_method(self.spec, args, f"checkpoint {args.name}")
        self.spec_tokens = default_tokens(self.spec, args, cfg.speculative_tokens)
        self.spec_stats = SpecStats()
        self.device = device
        # Structured outputs: grammar compiler (built on the first request with a grammar) and one thread
        # that computes the step's token masks while the forward pass runs.
        self._grammars: GrammarCompiler | None = None
        self._mask_thread: ThreadPoolExecutor | None = None
        self.mask_seconds = 0.0  # time spent computing grammar masks (tools/bench_structured.py)
        self.mask_wait_seconds = 0.0  # of which the step waited for after its forward pass (not overlapped)

    # -- requests ---------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams):
        """Raise RequestError for a request this engine cannot take; returns its grammar matcher (or None).
        (A multi-group front end validates here requests that another group's engine will run.)"""
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        vocab = self.model.args.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids outside [0, {vocab}): {bad[:5]}")
        if len(prompt_ids) + 1 > self.max_model_len:
            raise RequestError(f"prompt has {len(prompt_ids)} tokens; the maximum context length is "
                               f"{self.max_model_len} (prompt plus at least one generated token)")
        if params.grammar is None:
            return None
        try:  # structured outputs: one matcher per sequence (n > 1: one each)
            return self.grammar_compiler().matcher(params.grammar)
        except GrammarError as e:
            raise RequestError(str(e)) from None

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        matcher = self.validate(prompt_ids, params)
        seq = Sequence(request_id, list(prompt_ids), params, params.make_generator())
        seq.matcher = matcher
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None] * len(prompt_ids)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        self.counters["prompt_tokens"] += len(prompt_ids)

    def abort(self, request_id: str) -> StepOutput | None:
        """Stop a request now; its cache blocks are free when this returns."""
        seq = self.seqs.pop(request_id, None)
        if seq is None or seq.finished:
            return None
        self.scheduler.finish(seq, "abort")
        self.counters["aborted"] += 1
        return self._output(seq, [], "", [])

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    @property
    def max_running(self) -> int:
        """Sequences this engine runs at once (a multi-group engine: all groups together)."""
        return self.config.max_num_seqs

    # -- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()  # as vLLM's model runner: no autograd or version-counter work per op
    def step(self) -> list[StepOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            if self.lockstep:
                self._empty_step()
            return []
        self.counters["steps"] += 1
        # Draft-carrying chunks may be rejected: remember the cache state to return to.
        marks = {id(c.seq): mark(c.seq.cache, len(c.tokens)) for c in chunks if c.draft}
        masks = self._start_masks(chunks)  # structured outputs: grammar masks, computed beside the forward
        batch = StepBatch.build([(c.seq.cache, c.tokens) for c in chunks], self.device)
        dspark = self.spec == "dspark"
        if dspark and marks:  # the compressor inputs of drafting sequences, for a partial rollback
            batch.memo["record_rows"] = torch.tensor(
                [r for c, s in zip(chunks, batch.seqs) if c.draft for r in range(s.offset, s.offset + s.n)],
                dtype=torch.long, device=self.device)
        taps = [] if dspark else None
        x = self.model(batch, taps)
        if dspark:  # every token of the step goes into the DSpark rings
            self.model.dspark_context(taps, batch)
        batch.commit()
        if self.prefix is not None:  # before sampling: a request may finish (and free its blocks) this step
            for c in chunks:
                seq = c.seq
                if seq.registered_blocks < len(seq.block_hashes):
                    seq.registered_blocks = self.prefix.register(seq.prompt_ids, seq.block_hashes, seq.cache,
                                                                 seq.registered_blocks)
        for c, s in zip(chunks, batch.seqs):
            if c.seq.prompt_logprobs is not None:
                self._score_prompt(c.seq, x, s)
        # max_tokens == 0 (scoring only): nothing is sampled; the request ends once its prompt is in.
        need = [(c, s) for c, s in zip(chunks, batch.seqs) if c.needs_logits and c.seq.params.max_tokens > 0]
        # Rows with logits: the last known token's row and, with a draft, the row of every draft token after it.
        rows = [r for c, s in need for r in range(s.offset + s.n - 1 - len(c.draft or ()), s.offset + s.n)]
        logits = self.model.logits(x[torch.tensor(rows, device=x.device)]) if need else None
        allowed = self._finish_masks(masks)  # {id(seq): bool [1 + draft tokens, V]: each verify row's mask}
        todo, chains = [], []  # one SampleRow per logit row; row j counts the draft tokens before it as output
        for c, _ in need:
            a = allowed.get(id(c.seq))
            if c.draft and c.seq.draft_probs is not None:  # sampled drafts: speculative sampling
                chains.append((len(todo), c.draft, c.seq.draft_probs))
            todo.append(self._sample_row(c.seq, allowed=None if a is None else a[0]))
            for j in range(len(c.draft or ())):
                todo.append(self._sample_row(c.seq, extra=c.draft[:j + 1], allowed=None if a is None else a[j + 1]))
        sampled = sample_step(logits, todo, chains) if todo else []
        if self.token_sync is not None:
            sampled = self.token_sync(sampled)

        # Verify the chains, undo rejected positions, then append the kept tokens (a finished request frees its
        # cache in `_advance`, so every cache change comes first).
        plan, kept, cuts, k = [], [], {}, 0
        for i, (c, s) in enumerate(zip(chunks, batch.seqs)):
            seq = c.seq
            if not c.needs_logits or seq.params.max_tokens == 0:
                seq.num_computed += len(c.tokens)
                if c.needs_logits:  # max_tokens == 0: the prompt is in, the request ends
                    plan.append((seq, None))
                else:
                    kept.append((c, s))
                continue
            nd = len(c.draft or ())
            got = sampled[k:k + 1 + nd]
            k += len(got)
            if nd:
                n = accepted_prefix(got, c.draft)
                self.spec_stats.record(nd, n)
                seq.draft = seq.draft_confidence = seq.draft_probs = None
                got = got[:n + 1]
                if n < nd and not dspark:  # MTP: undo both positions; the real token is fed again next step
                    rollback(seq.cache, marks[id(seq)])
                    plan.append((seq, got))
                    continue
                if n < nd:  # DSpark: keep the last known token and the n accepted drafts
                    cuts[i] = (marks[id(seq)], len(c.tokens) - nd + n)
                    seq.num_computed += len(c.tokens) - nd + n
                    plan.append((seq, got))
                    continue
            seq.num_computed += len(c.tokens)
            kept.append((c, s))
            plan.append((seq, got))
        if cuts:
            self.model.truncate_step(batch, cuts)
        outs = []
        for seq, got in plan:
            outs.append(self._finish(seq, "length") if got is None else self._advance(seq, got))
        if self.spec == "mtp" and self.model.mtp:
            mtp_propose(self, x, kept)
        elif dspark:
            dspark_propose(self, [seq for seq, got in plan if got is not None])
        for c in chunks:  # drop window blocks the sequences' windows have left (after any rollback)
            if c.seq.cache is not None:
                c.seq.cache.trim()
        return outs

    def _empty_batch(self) -> StepBatch:
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        return StepBatch(empty, empty, [])

    def _empty_step(self) -> None:
        """An idle DP group's step: the forward passes of an empty batch, whose MoE layers join the expert
        exchange of the busy groups (`lockstep`)."""
        batch = self._empty_batch()
        x = self.model(batch, [] if self.spec == "dspark" else None)
        if self.spec == "mtp":
            self.model.mtp_logits(x, batch.tokens, batch, rows=batch.tokens)
        elif self.spec == "dspark":
            dspark_propose(self, [])

    def _score_prompt(self, seq: Sequence, x: torch.Tensor, s: SeqSlice) -> None:
        """Prompt log-probs of the positions this step's chunk predicts: row `offset + i` (position start + i)
        predicts the prompt token at start + i + 1. Positions already scored (before a preemption) are skipped;
        rows go through the head in slices so a long chunk never holds [chunk, vocab] logits at once."""
        lps, n_prompt = seq.prompt_logprobs, len(seq.prompt_ids)
        pos = [p for p in range(s.start, min(s.start + s.n, n_prompt - 1)) if lps[p + 1] is None]
        for i in range(0, len(pos), PROMPT_LOGPROB_ROWS):
            part = pos[i:i + PROMPT_LOGPROB_ROWS]
            rows = torch.tensor([s.offset + p - s.start for p in part], device=x.device)
            scored = score_tokens(self.model.logits(x[rows]), [seq.prompt_ids[p + 1] for p in part],
                                  seq.params.prompt_logprobs)
            for p, sc in zip(part, scored):
                lps[p + 1] = sc

    def _finish(self, seq: Sequence, reason: str) -> StepOutput:
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.request_id, None)
        self.counters["finished"] += 1
        return self._output(seq, [], "", [])

    def _stops(self, seq: Sequence) -> set[int]:
        p = seq.params
        return set(p.stop_token_ids) | (set() if p.ignore_eos else {self.model.args.eos_token_id})

    def _sample_row(self, seq: Sequence, extra: list[int] = (), allowed: torch.Tensor | None = None) -> SampleRow:
        p = seq.params
        out = seq.output_ids + list(extra) if extra else seq.output_ids
        banned = sorted(self._stops(seq)) if len(out) < p.min_tokens else None
        penalties = None
        if has_penalties(p):  # kept up to date per token, not rebuilt from the id lists every step
            if seq.penalty_state is None:
                seq.penalty_state = PenaltyState(seq.prompt_ids, self.model.args.vocab_size, self.device)
            seq.penalty_state.sync(seq.output_ids)
            penalties = (seq.penalty_state, list(extra))
        gen = seq.generator if p.greedy else position_generator(seq.generator, len(out))
        return SampleRow(p, gen, seq.prompt_ids, out, banned, allowed, penalties)

    # -- structured outputs (runtime/structured.py) --------------------------------------------------
    def grammar_compiler(self) -> GrammarCompiler:
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.model.args.vocab_size,
                                             self.model.args.eos_token_id)
        return self._grammars

    def _start_masks(self, chunks) -> tuple[list, Future | None] | None:
        """Grammar masks of this step's sampled rows (with a draft: also the row after each draft token), on a thread:
        llguidance releases the GIL, so this overlaps the forward pass."""
        rows = [(c.seq, c.draft or None) for c in chunks
                if c.needs_logits and c.seq.matcher is not None and c.seq.params.max_tokens > 0]
        if not rows:
            return None
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")

        def run() -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                return compute_masks(self.grammar_compiler(), [(seq.matcher, d) for seq, d in rows])
            finally:
                self.mask_seconds += time.perf_counter() - t0
        return rows, self._mask_thread.submit(run)

    def _finish_masks(self, masks) -> dict[int, torch.Tensor]:
        """{id(seq): bool [1 + len(draft), V]} on the device: the mask of each of its verify rows."""
        if masks is None:
            return {}
        rows, fut = masks
        t0 = time.perf_counter()
        done = fut.result()
        self.mask_wait_seconds += time.perf_counter() - t0
        bits = unpack_mask(done, self.model.args.vocab_size, self.device)
        return {id(seq): bits[r:r + 1 + len(d or ())] for (seq, d), r in zip(rows, mask_rows(rows))}

    def _advance(self, seq: Sequence, got: list[Sampled]) -> StepOutput:
        """Append the step's kept tokens (the target's token, after any accepted draft tokens) and apply stop
        conditions token by token: tokens after a stop are dropped."""
        p, args = seq.params, self.model.args
        stops = self._stops(seq)
        if seq.detok is None:
            seq.detok = self.tokenizer.incremental_decoder(skip_special_tokens=p.skip_special_tokens)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        reason, taken = None, []
        for s in got:
            seq.output_ids.append(s.token)
            if seq.matcher is not None:  # structured outputs: advance the grammar on accepted tokens only
                seq.matcher.accept(s.token)
            taken.append(s)
            self.counters["generation_tokens"] += 1
            if s.token in stops:
                reason, seq.stop_reason = "stop", (None if s.token == args.eos_token_id else s.token)
            # Incremental text; the decoder never emits half of a multi-byte character. Stop tokens are not text.
            if reason is None:
                seq.text += seq.detok.feed(s.token)
            if reason is None and p.stop:
                hit = min(((seq.text.find(x), x) for x in p.stop if x in seq.text), default=None)
                if hit is not None:
                    seq.text, reason, seq.stop_reason = seq.text[:hit[0]], "stop", hit[1]
            if reason is None and (len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len):
                reason = "length"
            if reason is not None:
                break
        # Hold back an incomplete UTF-8 character and any tail that may still become a stop string.
        if reason is not None and not isinstance(seq.stop_reason, str):  # text not cut at a stop string
            seq.text += seq.detok.flush()
        hold = 0 if reason else max((len(x) - 1 for x in p.stop), default=0)
        safe = len(seq.text) - hold
        new_text = seq.text[seq.emitted_chars:max(safe, seq.emitted_chars)]
        seq.emitted_chars += len(new_text)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.seqs.pop(seq.request_id, None)
            self.counters["finished"] += 1
        return self._output(seq, [t.token for t in taken], new_text, taken if p.logprobs is not None else [])

    @staticmethod
    def _output(seq: Sequence, toks, text, lps) -> StepOutput:
        plp = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent and seq.status is not SeqStatus.WAITING \
                and not seq.in_prefill and seq.finish_reason != "abort":
            plp, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        return StepOutput(seq.request_id, toks, text, seq.finished, seq.finish_reason, seq.stop_reason, lps,
                          len(seq.prompt_ids), seq.cached_prompt_tokens, len(seq.output_ids), plp)

    # -- observability -------------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.scheduler
        u = self.blocks.usage()
        cached = sum(u[f"{k}_blocks_cached"] * self.pool.block_bytes(k) for k in (COMP_KIND, WINDOW_KIND, STATE_KIND))
        return {"waiting": len(s.waiting), "running": len(s.running), "blocks_total": self.blocks.num_blocks,
                "blocks_used": self.blocks.used, "cache_usage": self.blocks.used / self.blocks.num_blocks,
                "prefix_hit_rate": self.prefix.hit_rate if self.prefix else 0.0,
                "prefix_hit_tokens": self.prefix.hit_tokens if self.prefix else 0,
                "prefix_query_tokens": self.prefix.query_tokens if self.prefix else 0,
                "prefix_cached_bytes": cached, "cache_bytes": self.pool.nbytes(), **u,
                "preemptions": s.num_preemptions, **self.counters, **self.spec_stats.as_dict()}

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[StepOutput]]:
        """Run requests to completion (offline use); returns every step output per request."""
        from .generate import run_to_completion  # that module builds on this one

        return run_to_completion(self, prompts, params)
