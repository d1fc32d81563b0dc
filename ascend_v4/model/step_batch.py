"""The flat batch of one forward step: the tokens of several sequences back to back, each sequence's slice of it,
and the step's addressing (window rows, the compressor plans of compress_plan.py), computed once per step and
shared by every layer (block tables do not change during a forward pass). Built by the engine's
model runner (or `StepBatch.build` for standalone caches); read by `Attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ascend_v4.ops import PagedTables
from ascend_v4.ops.paged import padded_table

from .compress_plan import CompressPlan, build_compress_plan

if TYPE_CHECKING:
    from .cache import SeqCache


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
    # Per-step addressing shared by every layer (window rows, compressor plans), computed on first use:
    # block tables do not change during a forward pass (blocks are reserved before it, trimmed after).
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def window_rows(self, i: int, window: int) -> torch.Tensor:
        """Pool rows [n, window] of the window each query of sequence i sees (positions t-window+1 .. t; -1 for
        positions before 0), the same in every layer's window region."""
        key = ("win", i, window)
        if key not in self.memo:
            s = self.seqs[i]
            pos = torch.arange(s.start, s.start + s.n, device=self.positions.device)
            rel = torch.arange(1 - window, 1, device=pos.device)
            self.memo[key] = s.cache.window_rows(pos[:, None] + rel[None, :])
        return self.memo[key]

    def group_offsets(self, which: tuple[int, ...]) -> list[int]:
        """First row of each of sequences `which` in the group's step rows (back to back, in this order). For the
        whole batch those are the slices' own offsets, which must then lie back to back (as `build` makes them)."""
        key = ("goff", which)
        if key not in self.memo:
            seqs = [self.seqs[i] for i in which]
            offsets = [sum(s.n for s in seqs[:k]) for k in range(len(seqs))]
            if len(which) == len(self.seqs) and (any(s.offset != o for s, o in zip(seqs, offsets))
                                                 or sum(s.n for s in seqs) != self.tokens.shape[0]):
                raise ValueError(f"StepBatch: the sequences' slices (offsets {[s.offset for s in seqs]}, lengths "
                                 f"{[s.n for s in seqs]}) must lie back to back over the {self.tokens.shape[0]} "
                                 "tokens; build batches with StepBatch.build")
            self.memo[key] = offsets
        return self.memo[key]

    def pool_groups(self) -> list[tuple[tuple[int, ...], torch.Tensor | None]]:
        """The sequences by cache pool (the engine has one; standalone caches own one each): (indices into seqs,
        their step rows back to back, or None when the group is the whole batch)."""
        if "pools" not in self.memo:
            groups: dict[int, list[int]] = {}
            for i, s in enumerate(self.seqs):
                groups.setdefault(id(s.cache.pool), []).append(i)
            out = []
            for which in groups.values():
                rows = None if len(which) == len(self.seqs) else torch.cat(
                    [torch.arange(self.seqs[i].offset, self.seqs[i].offset + self.seqs[i].n,
                                  device=self.positions.device) for i in which])
                out.append((tuple(which), rows))
            self.memo["pools"] = out
        return self.memo["pools"]

    def group_window_rows(self, which: tuple[int, ...], window: int) -> torch.Tensor:
        """Window rows [Tg, window] of sequences `which` (indices into seqs), back to back."""
        key = ("gwin", which, window)
        if key not in self.memo:
            self.group_offsets(which)  # checks the layout once per step
            rows = [self.window_rows(i, window) for i in which]
            self.memo[key] = rows[0] if len(rows) == 1 else torch.cat(rows)
        return self.memo[key]

    def compress_plan(self, which: tuple[int, ...], m: int) -> CompressPlan:
        """The step's compressor and entry indices for ratio m over sequences `which` (all on one pool, their
        rows back to back), shared by every layer with that ratio (compress_plan.py)."""
        key = ("plan", which, m)
        if key not in self.memo:
            seqs = [self.seqs[i] for i in which]
            offsets = self.group_offsets(which)
            positions = self.positions if len(which) == len(self.seqs) else \
                torch.cat([self.positions[s.offset:s.offset + s.n] for s in seqs])
            self.memo[key] = build_compress_plan(seqs, offsets, positions, m, m == 4)
        return self.memo[key]

    def paged_tables(self, which: tuple[int, ...]) -> PagedTables:
        """The block-table form of sequences `which` (one pool, rows back to back) for paged attention kernels
        (ops/paged.py): window and comp block tables padded with -1, query prefix sums and lengths after the
        step, int32. Built on first use only (the CPU path never asks)."""
        key = ("paged", which)
        if key not in self.memo:
            seqs = [self.seqs[i] for i in which]
            dev = self.positions.device
            n = [s.n for s in seqs]
            used = [s.start + s.n for s in seqs]
            cu = [*self.group_offsets(which), sum(n)]
            self.memo[key] = PagedTables(padded_table([s.cache.win_blocks for s in seqs], dev),
                                         padded_table([s.cache.comp_blocks for s in seqs], dev),
                                         torch.tensor(cu, dtype=torch.int32, device=dev),
                                         torch.tensor(used, dtype=torch.int32, device=dev), max(n), max(used))
        return self.memo[key]

    @classmethod
    def build(cls, chunks: list[tuple[SeqCache, list[int]]], device: torch.device | str = "cpu") -> "StepBatch":
        """chunks: (cache, new token ids) per sequence; positions continue from each cache's length. Makes
        room in each cache (a no-op when the scheduler already reserved the blocks)."""
        toks, poss, seqs, off = [], [], [], 0
        for cache, ids in chunks:
            n = len(ids)
            if n == 0:
                raise ValueError("StepBatch.build: a sequence chunk has no tokens")
            cache.reserve(cache.length + n)
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
            if s.cache.auto_trim:
                s.cache.trim()
