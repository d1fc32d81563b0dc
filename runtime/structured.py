"""Constrained decoding: grammar-driven allowed-token masks (engine: llguidance, see docs/serving.md
"Structured outputs" for why and the measured costs).

A request carries a `GrammarSpec` in `SamplingParams.grammar`: a grammar text llguidance accepts (Lark with
`%json {...}` embeds, or its JSON grammar format) and optionally `start_after`, a token id that switches the
grammar on (thinking mode: `</think>`; until then the output is free). Per sequence the engine keeps a
`SeqMatcher`:

    masks   = compute_masks([(matcher, draft or None), ...])   # CPU bitmasks, can run beside the forward pass
    logits  = apply_mask(logits_row, mask_row)                   # a tensor op on the logits' device
    matcher.accept(token)                                         # for each accepted token
    matcher.valid_prefix(draft)                                   # drafts are cut at the first disallowed token

Compiled grammars are cached (`GrammarCompiler`, LRU keyed by the grammar text): a new sequence gets a
`deep_copy()` of the cached matcher, so n > 1 choices and repeated schemas compile once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


class GrammarError(ValueError):
    """A grammar llguidance cannot compile (the server answers 400)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match.

    Attributes:
        grammar: Lark (llguidance dialect, `%json {schema}` allowed) or llguidance's JSON grammar format.
        start_after: token id after which the grammar applies (None = from the first output token). The
            token itself is not part of the grammar (e.g. `</think>`: reasoning is free, the answer is not).
    """

    grammar: str
    start_after: int | None = None


def _llg():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401 - bitmask helpers
    except ImportError as e:  # pragma: no cover - the server extra installs it
        raise GrammarError("structured outputs need the `llguidance` package (pip install 'ascend-v4[server]')") from e
    return llguidance


class GrammarCompiler:
    """llguidance tokenizer for one vocabulary plus an LRU cache of compiled grammars (thread-safe)."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int, cache_size: int = 128):
        llg = _llg()
        self.vocab_size = vocab_size
        # The V4 tokenizer.json as is; llguidance reads byte-level BPE and flags added special tokens itself.
        self.ll_tokenizer = llg.LLTokenizer(tokenizer._tk.to_str(), n_vocab=vocab_size, eos_token=eos_id)
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self._cache_size = cache_size
        self._executor = None

    def executor(self):
        if self._executor is None:
            self._executor = _llg().LLExecutor()
        return self._executor

    def compile(self, grammar: str):
        """A fresh matcher for `grammar` (raises GrammarError)."""
        with self._lock:
            base = self._cache.get(grammar)
            if base is not None:
                self._cache.move_to_end(grammar)
                return base.deep_copy()
        m = _llg().LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(f"invalid grammar: {m.get_error()}")
        with self._lock:
            self._cache[grammar] = m
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return m.deep_copy()

    def matcher(self, spec: GrammarSpec) -> SeqMatcher:
        return SeqMatcher(self.compile(spec.grammar), spec.start_after)

    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32


class SeqMatcher:
    """One sequence's grammar state. `history` has one entry per accepted output token: CONSUMED (the
    matcher took it), FREE (before `start_after`, after the grammar stopped, or after an error) or TRIGGER
    (the `start_after` token), so `rollback` can undo any number of tokens."""

    FREE, CONSUMED, TRIGGER = 0, 1, 2

    def __init__(self, matcher, start_after: int | None):
        self.m = matcher
        self.start_after = start_after
        self.active = start_after is None
        self.history: list[int] = []
        self.error: str | None = None

    @property
    def constraining(self) -> bool:
        """Whether the next token is masked (grammar switched on and not broken). Once the grammar is
        complete the mask allows only EOS."""
        return self.active and self.error is None

    def allows(self, token: int) -> bool:
        """Whether `token` may come next (a draft check; the state does not change)."""
        return self.valid_prefix([token]) == 1

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens` may come next, in order (a draft check; the state does not change). Before the
        grammar is switched on, a draft may run up to and including the `start_after` token, not past it (its
        mask rows after the trigger would need the matcher started)."""
        if not tokens:
            return 0
        if not self.constraining:
            if self.active or self.start_after not in tokens:
                return len(tokens)
            return tokens.index(self.start_after) + 1
        return self.m.validate_tokens(list(tokens))

    def accept(self, token: int) -> None:
        if not self.constraining:
            trigger = not self.active and token == self.start_after
            if trigger:
                self.active = True
            self.history.append(self.TRIGGER if trigger else self.FREE)
            return
        if self.m.is_stopped():  # EOS already taken (ignore_eos): nothing left to check
            self.history.append(self.FREE)
        elif self.m.consume_token(token):
            self.history.append(self.CONSUMED)
        else:  # cannot happen with masked sampling; go on unconstrained rather than fail the request
            self.error = self.m.get_error() or f"token {token} rejected"
            self.history.append(self.FREE)

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens."""
        if n <= 0:
            return
        undone = self.history[-n:]
        del self.history[-n:]
        consumed = undone.count(self.CONSUMED)
        if consumed:
            self.m.rollback(consumed)
        if self.TRIGGER in undone:
            self.active = False


def mask_rows(rows: list[tuple[SeqMatcher, list[int] | None]]) -> list[int]:
    """First bitmask row of each (matcher, draft) in `compute_masks`' output: 1 + len(draft) rows each."""
    out, r = [], 0
    for _, draft in rows:
        out.append(r)
        r += 1 + len(draft or ())
    return out


def compute_masks(compiler: GrammarCompiler, rows: list[tuple[SeqMatcher, list[int] | None]]) -> torch.Tensor:
    """Bitmasks (int32 [sum of 1 + len(draft), words], bit t of word t // 32 = token t allowed) for each
    (matcher, draft) row: at `mask_rows(rows)[i]` the mask of the next token, then one after each draft token
    (speculative decoding's verify rows). Drafts must be valid prefixes (`SeqMatcher.valid_prefix`).
    Unconstrained matchers get all-ones, except the row right after a draft's `start_after` token, which gets
    the grammar's first mask. Runs llguidance's parallel executor (it releases the GIL, so this can overlap the
    model's forward pass)."""
    llt = _llg().torch
    words = compiler.mask_words()
    first = mask_rows(rows)
    total = first[-1] + 1 + len(rows[-1][1] or ()) if rows else 0
    out = torch.full((max(1, total), words), -1, dtype=torch.int32)
    plain, drafted = [], []
    for (sm, draft), r in zip(rows, first):
        if sm.constraining:
            if not draft:
                plain.append((sm.m, r))
            else:
                drafted.append((sm.m, r, list(draft)))
        elif draft and not sm.active and draft[-1] == sm.start_after:
            plain.append((sm.m, r + len(draft)))  # the draft switches the grammar on: its first mask
    if plain:
        llt.fill_next_token_bitmask_par(compiler.executor(), plain, out)
    if drafted:
        llt.fill_next_token_bitmask_par_with_draft_tokens(compiler.executor(), drafted, out)
    return out


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_mask(bits: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """int32 bitmask rows [R, words] -> bool [R, vocab] on `device` (True = allowed); pure tensor ops."""
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    b = bits.to(device, non_blocking=True)
    return (((b.unsqueeze(-1) >> shifts) & 1).bool().reshape(b.shape[0], -1))[:, :vocab]


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Disallowed tokens' logits -> -inf (a new tensor). `allowed`: bool [..., V'] with V' <= V; ids past
    V' (padding of the logits) are disallowed."""
    v = allowed.shape[-1]
    if v < logits.shape[-1]:
        allowed = torch.cat([allowed, allowed.new_zeros(*allowed.shape[:-1], logits.shape[-1] - v)], -1)
    return logits.masked_fill(~allowed, float("-inf"))
