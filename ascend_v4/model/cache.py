"""Per-sequence V4 cache state (model-spec §10): sliding-window ring, compressed entries, indexer keys and
the compressors' running state, per attention layer (main layers, then MTP blocks).

One `SeqCache` per sequence keeps the forward pass free of padding: a step processes a flat batch of
tokens from several sequences (`StepBatch`), each at its own position, with prefill chunks of any length
and one-token decode steps mixed. Every store here is a growable row array addressed by entry number,
which is what a paged block table will later address instead (runtime/ owns paging).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch


class RowStore:
    """Append-only [n, d] rows with amortised growth (capacity doubles)."""

    def __init__(self, d: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.buf = torch.empty(0, d, dtype=dtype, device=device)
        self.n = 0

    def append(self, rows: torch.Tensor) -> None:
        k = rows.shape[0]
        if k == 0:
            return
        if self.n + k > self.buf.shape[0]:
            cap = max(16, 2 * self.buf.shape[0], self.n + k)
            new = torch.empty(cap, self.buf.shape[1], dtype=self.buf.dtype, device=self.buf.device)
            new[:self.n] = self.buf[:self.n]
            self.buf = new
        self.buf[self.n:self.n + k] = rows.to(self.buf.dtype)
        self.n += k

    def view(self) -> torch.Tensor:
        return self.buf[:self.n]

    def nbytes(self) -> int:
        return self.n * self.buf.shape[1] * self.buf.element_size()


@dataclass
class CompressorState:
    """Tokens of the current, incomplete window (projections and gate logits incl. the slot bias, fp32),
    and for CSA the A-half of the last complete window, which the next entry pools with its own B-half."""

    buf_kv: torch.Tensor | None = None  # [b, c*dc] fp32, b < ratio
    buf_score: torch.Tensor | None = None
    prev_kv: torch.Tensor | None = None  # [ratio, dc] fp32 (CSA only)
    prev_score: torch.Tensor | None = None
    n_entries: int = 0  # entries emitted so far

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.buf_kv, self.buf_score, self.prev_kv,
                                                           self.prev_score) if t is not None)


@dataclass
class LayerCache:
    window: torch.Tensor  # [W, head_dim] ring, slot = pos % W
    comp: RowStore | None = None  # compressed KV entries [n, head_dim]
    index_keys: RowStore | None = None  # indexer keys [n, index_head_dim] (CSA)
    comp_state: CompressorState | None = None
    index_state: CompressorState | None = None

    def nbytes(self) -> int:
        n = self.window.numel() * self.window.element_size()
        for s in (self.comp, self.index_keys, self.comp_state, self.index_state):
            n += s.nbytes() if s is not None else 0
        return n


@dataclass
class SeqCache:
    """Everything a sequence needs to continue decoding. `length` = tokens already processed."""

    layers: list[LayerCache]
    length: int = 0

    def nbytes(self) -> int:
        return sum(l.nbytes() for l in self.layers)


def new_seq_cache(args, dtype: torch.dtype, device: torch.device | str = "cpu") -> SeqCache:
    """Empty cache for `args` (a ModelArgs): one LayerCache per main layer and per MTP block."""
    layers = []
    for lid in range(args.n_layers + args.n_mtp_layers):
        ratio = args.ratio(lid)
        lc = LayerCache(window=torch.zeros(args.window_size, args.head_dim, dtype=dtype, device=device))
        if ratio:
            lc.comp = RowStore(args.head_dim, dtype, device)
            lc.comp_state = CompressorState()
        if ratio == 4:
            lc.index_keys = RowStore(args.index_head_dim, dtype, device)
            lc.index_state = CompressorState()
        layers.append(lc)
    return SeqCache(layers)


@dataclass
class SeqSlice:
    """One sequence's part of a step: rows [offset, offset+n) of the flat batch, positions start..start+n-1."""

    cache: SeqCache
    offset: int
    start: int
    n: int


@dataclass
class StepBatch:
    """Flat batch for one forward step: tokens of several sequences back to back."""

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    seqs: list[SeqSlice] = field(default_factory=list)

    @classmethod
    def build(cls, chunks: list[tuple[SeqCache, list[int]]], device: torch.device | str = "cpu") -> "StepBatch":
        """chunks: (cache, new token ids) per sequence; positions continue from each cache's length."""
        toks, poss, seqs, off = [], [], [], 0
        for cache, ids in chunks:
            n = len(ids)
            if n == 0:
                raise ValueError("StepBatch.build: a sequence chunk has no tokens")
            toks.extend(ids)
            poss.extend(range(cache.length, cache.length + n))
            seqs.append(SeqSlice(cache, off, cache.length, n))
            off += n
        return cls(torch.tensor(toks, dtype=torch.long, device=device),
                   torch.tensor(poss, dtype=torch.long, device=device), seqs)

    def commit(self) -> None:
        """Advance every sequence's length after the forward pass wrote its cache."""
        for s in self.seqs:
            s.cache.length = s.start + s.n


@dataclass
class CacheMark:
    """What `mark` saved: enough to undo one step's writes to a SeqCache (speculative decoding)."""

    length: int
    rows: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (ring slots, their old rows)
    counts: list[tuple[int | None, int | None]]  # per layer: comp.n, index_keys.n
    states: list[tuple[CompressorState | None, CompressorState | None]]


def mark(cache: SeqCache, positions: range) -> CacheMark:
    """Remember the state a step feeding `positions` will change. Compressor states are replaced, not
    mutated, by the forward pass, so shallow copies suffice; ring rows are copied."""
    rows, counts, states = [], [], []
    for lc in cache.layers:
        w = lc.window.shape[0]
        slots = torch.tensor(sorted({p % w for p in positions}), dtype=torch.long, device=lc.window.device)
        rows.append((slots, lc.window[slots].clone()))
        counts.append((lc.comp.n if lc.comp else None, lc.index_keys.n if lc.index_keys else None))
        states.append(tuple(copy.copy(s) if s is not None else None for s in (lc.comp_state, lc.index_state)))
    return CacheMark(cache.length, rows, counts, states)


def rollback(cache: SeqCache, m: CacheMark) -> None:
    """Undo everything written since `mark` (rejected draft tokens)."""
    cache.length = m.length
    for lc, (slots, old), (nc, ni), (cs, ix) in zip(cache.layers, m.rows, m.counts, m.states):
        lc.window[slots] = old
        if lc.comp is not None:
            lc.comp.n = nc
        if lc.index_keys is not None:
            lc.index_keys.n = ni
        lc.comp_state, lc.index_state = cs, ix
