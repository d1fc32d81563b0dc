"""Per-request sampling settings and the sampler.

`SamplingParams` is the per-request knob set (engine settings live in `EngineConfig`). Sampling draws from a
per-request, per-position `torch.Generator` (`position_generator`), so a seeded request is reproducible whatever
else shares its batch, and whether or not speculative decoding drafts for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .structured import GrammarSpec, apply_mask


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
        presence_penalty: subtracted once from the logit of every token already generated (OpenAI semantics).
        frequency_penalty: subtracted per occurrence of a token already generated.
        repetition_penalty: >1 discourages tokens seen in prompt or output (divides positive logits,
            multiplies negative ones; 1.0 = off).
        stop: strings that end generation; the output text is cut before the match.
        stop_token_ids: extra token ids that end generation (EOS always does unless ignore_eos).
        ignore_eos: keep generating past EOS (benchmarks).
        min_tokens: EOS / stop tokens are suppressed until this many tokens were generated.
        logprobs: None, or the number of top alternatives to return with each token's log-probability.
        skip_special_tokens: leave tokens the tokenizer flags special (BOS / EOS / pad, V4's
            `<｜place▁holder▁no▁N｜>`) out of the text; V4's structural tokens (`</think>`, `｜DSML｜`, roles)
            are not flagged special and always stay. False here (offline API: text == decode(ids)); the HTTP
            server passes its request field, default true as in vLLM.
        prompt_logprobs: None, or the number of top alternatives to return with the log-probability of every
            prompt token after the first (computed from the prefill's own hidden states; such a request does not
            read the prefix cache, so a cached prefix is recomputed). With `max_tokens=0` the request only scores
            its prompt (evaluation harnesses' log-likelihood).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = False
    prompt_logprobs: int | None = None
    # Structured outputs: the output must match this grammar; the engine masks disallowed tokens before
    # sampling (runtime/structured.py).
    grammar: GrammarSpec | None = None

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"SamplingParams.{msg}")

        need(self.max_tokens >= 1 or (self.max_tokens == 0 and self.prompt_logprobs is not None),
             f"max_tokens must be >= 1 (or 0 with prompt_logprobs: score the prompt only), got {self.max_tokens}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.top_k >= -1, f"top_k must be -1, 0 or positive, got {self.top_k}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(0 <= self.min_tokens <= self.max_tokens, f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        need(self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}")
        need(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings")

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


def position_generator(request: torch.Generator, index: int) -> torch.Generator:
    """The generator that draws output token `index` of a request: seeded from the request generator's seed and
    the index, so the token drawn at a position is a function of (seed, position, logits) alone. Speculative
    decoding samples rows that verification then throws away; with per-position generators those draws do not
    shift the later ones, so a seeded request gives the same tokens with drafts as without (the coupling the
    DSpark/MTP equality tests use)."""
    digest = hashlib.blake2b(f"{request.initial_seed()}/{index}".encode(), digest_size=8).digest()
    return torch.Generator(device=request.device).manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclass
class Sampled:
    token: int
    logprob: float | None = None  # log-probability of `token` under the model (raw logits)
    top: list[tuple[int, float]] | None = None  # top alternatives (id, logprob), best first
    rank: int | None = None  # 1 + how many tokens are more likely (prompt log-probs, as vLLM reports them)


def score_tokens(logits: torch.Tensor, targets: list[int], k: int) -> list[Sampled]:
    """Log-probability (and rank, and the top `k` alternatives) of each target token under its row of logits
    [n, V]: the prompt log-probs of n positions."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    tgt = torch.tensor(targets, device=lp.device, dtype=torch.long)
    own = lp.gather(1, tgt[:, None])  # [n, 1]
    ranks = (lp > own).sum(-1) + 1
    tops = torch.topk(lp, k, dim=-1) if k > 0 else None
    out = []
    for j, t in enumerate(targets):
        top = list(zip(tops.indices[j].tolist(), tops.values[j].tolist())) if tops is not None else None
        out.append(Sampled(t, float(own[j, 0]), top, int(ranks[j])))
    return out


def has_penalties(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0)


class PenaltyState:
    """One request's penalty bookkeeping on the logits' device, kept up to date token by token instead of
    rebuilt from the prompt and output lists every step: `seen` [V] bool (prompt or output: repetition penalty)
    and `counts` [V] fp32 (output occurrences: presence / frequency)."""

    def __init__(self, prompt: list[int], vocab: int, device):
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.seen[torch.tensor(prompt, dtype=torch.long, device=device)] = True
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.n_output = 0

    def sync(self, output: list[int]) -> None:
        """Take in the output tokens appended since the last call (output only grows)."""
        new = output[self.n_output:]
        if new:
            t = torch.tensor(new, dtype=torch.long, device=self.seen.device)
            self.seen[t] = True
            self.counts.index_add_(0, t, torch.ones(len(new), device=t.device))
        self.n_output = len(output)

    def apply(self, logits: torch.Tensor, params: SamplingParams, extra: list[int] = ()) -> torch.Tensor:
        """`apply_penalties` with these counts (plus `extra`: a draft being verified), same values."""
        seen, counts = self.seen, self.counts
        if extra:
            t = torch.tensor(list(extra), dtype=torch.long, device=seen.device)
            seen, counts = seen.clone(), counts.clone()
            seen[t] = True
            counts.index_add_(0, t, torch.ones(len(extra), device=t.device))
        x = logits
        if params.presence_penalty or params.frequency_penalty:
            pen = params.presence_penalty + params.frequency_penalty * counts.to(x.dtype)
            x = torch.where(counts > 0, x - pen, x)
        if params.repetition_penalty != 1.0:
            rp = params.repetition_penalty
            x = torch.where(seen, torch.where(x > 0, x / rp, x * rp), x)
        return x


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int],
                    output: list[int]) -> torch.Tensor:
    """Presence / frequency / repetition penalties on one sequence's logits [V] (returns a new tensor)."""
    if not has_penalties(params):
        return logits
    state = PenaltyState(prompt, logits.shape[-1], logits.device)
    state.sync(output)
    return state.apply(logits, params)


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator, *, prompt: list[int] | None = None,
           output: list[int] | None = None, banned: list[int] | None = None,
           allowed: torch.Tensor | None = None, penalties: tuple[PenaltyState, list[int]] | None = None) -> Sampled:
    """Pick the next token from fp32 logits [V] of one sequence. `banned`: ids that must not be picked
    (EOS / stop tokens before min_tokens). `allowed`: bool [V] grammar mask (structured outputs); it wins
    over `banned` when the grammar allows nothing else (e.g. only EOS once a JSON value is complete).
    `penalties`: (the request's PenaltyState, extra draft tokens) used instead of `prompt` / `output`."""
    raw = logits.float()
    x = processed_logits(raw, params, prompt=prompt, output=output, banned=banned, allowed=allowed,
                         penalties=penalties)
    if params.greedy:
        tok = int(torch.max(x, -1).indices)
    else:
        tok = int(torch.multinomial(probabilities(x, params), 1, generator=gen))
    return with_logprobs(raw, params, tok)


def processed_logits(raw: torch.Tensor, params: SamplingParams, *, prompt: list[int] | None = None,
                     output: list[int] | None = None, banned: list[int] | None = None,
                     allowed: torch.Tensor | None = None,
                     penalties: tuple[PenaltyState, list[int]] | None = None) -> torch.Tensor:
    """fp32 logits [V] after penalties, the grammar mask and banned ids (see `sample`)."""
    if penalties is not None and has_penalties(params):
        x = penalties[0].apply(raw, params, penalties[1])
    else:
        x = apply_penalties(raw, params, prompt or [], output or [])
    if allowed is not None:
        y = apply_mask(x, allowed)
        x = y if bool(torch.isfinite(y).any()) else x  # an empty mask (grammar engine error): leave it free
    if banned:
        y = x.clone()
        y[banned] = float("-inf")
        x = y if allowed is None or bool(torch.isfinite(y).any()) else x
    return x


def probabilities(x: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a non-greedy request samples from, given its logits x [V] after penalties and masks:
    temperature, top-k, softmax, min-p, top-p, normalised."""
    x = x / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        drop = sp.cumsum(-1) - sp > params.top_p  # keep the smallest prefix reaching top_p mass
        probs = torch.zeros_like(probs).scatter_(-1, si, sp.masked_fill(drop, 0.0))
    return probs / probs.sum()


def with_logprobs(raw: torch.Tensor, params: SamplingParams, tok: int) -> Sampled:
    """`tok` with its log-probability and the top alternatives under the raw logits [V], when asked for."""
    if params.logprobs is None:
        return Sampled(tok)
    lp = torch.log_softmax(raw, dim=-1)
    top = None
    if params.logprobs > 0:
        v, i = torch.topk(lp, params.logprobs)
        top = list(zip(i.tolist(), v.tolist()))
    return Sampled(tok, float(lp[tok]), top)


@dataclass
class SampleRow:
    """One row of a step's logits to sample: the request's settings and generator, its tokens so far (for
    penalties; a draft being verified is already appended to `output`), ids to ban and the grammar mask."""

    params: SamplingParams
    gen: torch.Generator
    prompt: list[int]
    output: list[int]
    banned: list[int] | None = None
    allowed: torch.Tensor | None = None
    penalties: tuple[PenaltyState, list[int]] | None = None  # (state synced to output minus extra, extra)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to apply first: one batched argmax serves it."""
        p = self.params
        return (p.greedy and self.banned is None and self.allowed is None and not p.presence_penalty
                and not p.frequency_penalty and p.repetition_penalty == 1.0)


def sample_batch(logits: torch.Tensor, rows: list[SampleRow]) -> list[Sampled]:
    """Sample every row of fp32 logits [n, V]: the plain greedy rows with one argmax, the log-probs of all rows
    that ask for them with one log-softmax (one device sync each instead of one per row); rows with penalties,
    masks or temperature go through `sample` one by one (their generators are per request)."""
    n = len(rows)
    toks: list[int | None] = [None] * n
    fast = [i for i, r in enumerate(rows) if r.plain_greedy]
    if fast:
        # max(dim).indices: the first maximal index, as argmax, in a third of the time on CPU
        picked = torch.max(logits[fast] if len(fast) < n else logits, dim=-1).indices.tolist()
        for i, t in zip(fast, picked):
            toks[i] = t
    out: list[Sampled | None] = [None] * n
    for i, r in enumerate(rows):
        if toks[i] is None:  # the slow path also computes its own log-probs
            out[i] = sample(logits[i], r.params, r.gen, prompt=r.prompt, output=r.output, banned=r.banned,
                            allowed=r.allowed, penalties=r.penalties)
    want = [i for i in fast if rows[i].params.logprobs is not None]
    if want:
        lp = torch.log_softmax(logits[want].float(), dim=-1)
        own = lp.gather(1, torch.tensor([toks[i] for i in want], device=lp.device)[:, None]).squeeze(1).tolist()
        tops: dict[int, tuple[list, list]] = {}  # per distinct k (a prefix of a larger top-k may order ties apart)
        for k in {rows[i].params.logprobs for i in want} - {0}:
            sel = [j for j, i in enumerate(want) if rows[i].params.logprobs == k]
            t = torch.topk(lp[sel], k, dim=-1)
            for j, ids, vals in zip(sel, t.indices.tolist(), t.values.tolist()):
                tops[j] = list(zip(ids, vals))
        for j, i in enumerate(want):
            out[i] = Sampled(toks[i], own[j], tops.get(j))
    for i in fast:
        if out[i] is None:
            out[i] = Sampled(toks[i])
    return out  # type: ignore[return-value]


def target_probabilities(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    """The distribution row `row` (a non-greedy request) samples from, given its fp32 logits [V]: what speculative
    sampling compares a sampled draft token against."""
    x = processed_logits(logits.float(), row.params, prompt=row.prompt, output=row.output, banned=row.banned,
                         allowed=row.allowed, penalties=row.penalties)
    return probabilities(x, row.params)

