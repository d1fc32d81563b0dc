"""Paged V4 cache (model-spec §10): the physical block pool of every cache kind, and each sequence's view of
it (block tables plus the compressors' running state).

Three kinds of block. The block size B (a multiple of every compression ratio, so a block boundary is also a
window boundary of every compressor) is the unit of allocation for compressed data and of prefix hits:

* **window** blocks hold Bw = B/4 raw KV rows (positions jBw .. jBw+Bw-1) of every attention layer. A sequence
  keeps only the blocks that still overlap its sliding window (about W + Bw rows per layer); older ones go back
  to the allocator (or stay in the prefix cache, evictable). Smaller than B so that the rows held beyond the
  window stay few.
* **comp** blocks hold, per compressed layer, the B/m compressed KV entries of those tokens and, for CSA layers,
  the B/4 indexer keys.
* **state** slots hold the compressor state *at a block's end* (the A-half of the last CSA window, which the
  next entry pools with), fp32: what a later sequence needs, besides the blocks, to resume after a shared
  prefix. Only prompt blocks that may become prefix-cache entries get one, and a sequence gives each back as
  soon as it is registered (it stays cached, evictable), so state memory does not grow with context.

Per layer, window rows and compressed entries live in one tensor `CachePool.kv[layer]` (window region first,
then the compressed region), so one index list addresses both and `sparse_attn` reads the pool in place, the
shape a paged device kernel takes. Storage is the activation dtype, or the 584-byte FP8 entry
(`kv_format="fp8"`, vLLM's fp8_ds_mla layout) where the backend supports it.

Who owns blocks: an allocator (`allocate(kind, n)`, `release(kind, ids)`). The runtime's `BlockManager` is one
(with reference counts and prefix-cache hashes); a standalone `SeqCache` from `new_seq_cache` gets a private,
growing pool, which is what tests, tools and single-sequence use need.

* **run** slots hold a running sequence's compressor state (`CachePool.run`): the projections of the tokens of
  its current, incomplete window (fewer than m) and, CSA, the A-half of its last complete window. One slot per
  sequence for its whole life, so one step updates every sequence's state with a few indexed tensor ops
  (`compress_plan.py`) instead of a loop over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ascend_v4 import ops
from ascend_v4.model.kv_layout import (KVFormat, comp_block_bytes, compressor_state_bytes, running_state_shapes,
                                       runtime_format, state_slot_bytes)

WINDOW_KIND, COMP_KIND, STATE_KIND, RUN_KIND = "window", "comp", "state", "run"
KINDS = (WINDOW_KIND, COMP_KIND)  # allocated for every block of a sequence; state slots only on request


class NoFreeBlocks(RuntimeError):
    """The allocator has no block of the requested kind left (the scheduler preempts)."""


class Allocator(Protocol):
    def allocate(self, kind: str, n: int) -> list[int]: ...

    def release(self, kind: str, blocks: list[int]) -> None: ...

    def can_allocate(self, kind: str, n: int) -> bool: ...


def pool_format(args, kv_format: str, dtype: torch.dtype) -> KVFormat:
    """What one window row / compressed entry and one indexer key of the pool take (`kv_layout`)."""
    return runtime_format(args, kv_format, torch.finfo(dtype).bits // 8)


def check_block_size(args, block_size: int) -> None:
    ratios = {args.ratio(i) for i in range(args.n_layers + args.n_draft_layers)} - {0}
    bad = [m for m in sorted(ratios) if block_size % m]
    if bad or block_size < 1:
        need = max(ratios, default=1)
        raise ValueError(f"cache block_size {block_size} must be a multiple of every compression ratio "
                         f"{sorted(ratios)} (a block must end where a compressor window ends); try {need}")


class CachePool:
    """Physical storage of every cache kind, for all attention layers (main layers, then MTP blocks).

    kv[l]: [NW*Bw + NC*B/m_l, E] rows: window block w at rows [wBw, (w+1)Bw), comp block c's entries at rows
    NW*Bw + [c*B/m_l, (c+1)*B/m_l). E = head_dim (activation dtype) or the FP8 entry width (uint8).
    ikeys[l]: [NC*B/4, index_head_dim] indexer keys (CSA layers). state[l]: {"comp"|"index": [NS, 2, 4, dc]}
    fp32, the (kv, score) A-half at a block's end, per state slot (CSA layers; HCA needs none at a boundary).
    run[l]: {"comp"|"index": (kv, score [NR, m, c*dc], prev_kv, prev_score [NR, m, dc] or None)} fp32, per run
    slot (`kv_layout.running_state_shapes`; compressed layers).
    """

    def __init__(self, args, block_size: int, num_window_blocks: int, num_comp_blocks: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", kv_format: str = "auto",
                 num_state_slots: int = 0, num_run_slots: int = 0):
        check_block_size(args, block_size)
        if kv_format not in ("auto", "fp8"):
            raise ValueError(f"cache kv_format must be 'auto' (activation dtype) or 'fp8', got {kv_format!r}")
        if kv_format == "fp8" and (args.head_dim - args.rope_head_dim) % 64:
            raise ValueError(f"kv_format='fp8' needs head_dim - rope_head_dim to be a multiple of 64, got "
                             f"{args.head_dim} - {args.rope_head_dim}")
        self.args, self.block_size, self.dtype, self.device = args, block_size, dtype, torch.device(device)
        self.window_block = block_size // 4 if block_size % 4 == 0 else block_size  # Bw
        self.kv_format = kv_format
        self.n_layers = args.n_layers + args.n_draft_layers
        self.ratios = [args.ratio(i) for i in range(self.n_layers)]
        self.format = pool_format(args, kv_format, dtype)
        self.entry_bytes = self.format.main_entry
        self.num = {WINDOW_KIND: 0, COMP_KIND: 0, STATE_KIND: 0, RUN_KIND: 0}
        self.kv: list[torch.Tensor] = [self._kv_rows(0) for _ in self.ratios]
        self.ikeys: list[torch.Tensor | None] = [None] * self.n_layers
        self.state: list[dict[str, torch.Tensor] | None] = [None] * self.n_layers
        self.run: list[dict[str, tuple] | None] = [None] * self.n_layers
        self.resize(num_window_blocks, num_comp_blocks, num_state_slots, num_run_slots)

    # -- layout --------------------------------------------------------------------------------------------
    def _kv_rows(self, n: int) -> torch.Tensor:
        if self.kv_format == "fp8":
            return torch.empty(n, self.entry_bytes, dtype=torch.uint8, device=self.device)
        return torch.empty(n, self.args.head_dim, dtype=self.dtype, device=self.device)

    @property
    def has_compressor(self) -> bool:
        """Whether any layer compresses (then every sequence needs a run slot)."""
        return any(self.ratios)

    @property
    def has_state(self) -> bool:
        """Whether a block boundary carries compressor state (CSA layers keep an A-half across windows)."""
        return 4 in self.ratios

    def entries_per_block(self, layer: int) -> int:
        m = self.ratios[layer]
        return self.block_size // m if m else 0

    def comp_base(self, layer: int) -> int:
        """First row of the compressed region of layer's kv tensor."""
        return self.num[WINDOW_KIND] * self.window_block

    def resize(self, num_window_blocks: int, num_comp_blocks: int, num_state_slots: int | None = None,
               num_run_slots: int | None = None) -> None:
        """(Re)allocate for the given block counts, keeping the rows of blocks that exist in both layouts
        (a private pool grows this way; the engine sizes its pool once)."""
        Bw, old = self.window_block, dict(self.num)
        ns = old[STATE_KIND] if num_state_slots is None else num_state_slots
        nr = old[RUN_KIND] if num_run_slots is None else num_run_slots
        keep_run = min(old[RUN_KIND], nr)
        a = self.args
        for l, m in enumerate(self.ratios):
            epb = self.entries_per_block(l)
            kv = self._kv_rows(num_window_blocks * Bw + num_comp_blocks * epb)
            kw, kc = min(old[WINDOW_KIND], num_window_blocks) * Bw, min(old[COMP_KIND], num_comp_blocks) * epb
            if kw:
                kv[:kw] = self.kv[l][:kw]
            if kc:
                ob, nb = old[WINDOW_KIND] * Bw, num_window_blocks * Bw
                kv[nb:nb + kc] = self.kv[l][ob:ob + kc]
            self.kv[l] = kv
            if m == 4:
                ik = torch.empty(num_comp_blocks * epb, a.index_head_dim, dtype=self.dtype, device=self.device)
                st = {"comp": torch.empty(ns, 2, m, a.head_dim, device=self.device),
                      "index": torch.empty(ns, 2, m, a.index_head_dim, device=self.device)}
                if kc:
                    ik[:kc] = self.ikeys[l][:kc]
                keep = min(old[STATE_KIND], ns)
                if keep:
                    for k in st:
                        st[k][:keep] = self.state[l][k][:keep]
                self.ikeys[l], self.state[l] = ik, st
            run = {}
            for name, (buf, prev) in running_state_shapes(a, l).items():
                new = tuple(torch.zeros(nr, *shape, device=self.device) if shape else None
                            for shape in (buf, buf, prev, prev))
                if keep_run:
                    for t_new, t_old in zip(new, self.run[l][name]):
                        if t_new is not None:
                            t_new[:keep_run] = t_old[:keep_run]
                run[name] = new
            self.run[l] = run or None
        self.num = {WINDOW_KIND: num_window_blocks, COMP_KIND: num_comp_blocks, STATE_KIND: ns, RUN_KIND: nr}

    def seed_run(self, run_slot: int, state_slot: int) -> None:
        """Start run slot `run_slot` at a block boundary (a prefix-cache hit): no buffered tokens, and CSA layers
        pool their next entry with the A-half stored in block-end state slot `state_slot`."""
        for run, st in zip(self.run, self.state):
            if run is not None and st is not None:
                for name, (_, _, pkv, psc) in run.items():
                    pkv[run_slot], psc[run_slot] = st[name][state_slot, 0], st[name][state_slot, 1]

    def block_bytes(self, kind: str) -> int:
        """Bytes one block of `kind` occupies across all layers (the memory model of `kv_layout`)."""
        if kind == WINDOW_KIND:
            return self.n_layers * self.window_block * self.entry_bytes
        if kind == STATE_KIND:
            return state_slot_bytes(self.args)
        if kind == RUN_KIND:
            return compressor_state_bytes(self.args, range(self.n_layers))
        return comp_block_bytes(self.args, self.format, self.block_size)

    def nbytes(self) -> int:
        return sum(self.block_bytes(k) * self.num[k] for k in (*KINDS, STATE_KIND, RUN_KIND))

    # -- writes / reads ----------------------------------------------------------------------------------------
    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """values [n, head_dim] in the pool's row format (FP8 entries when configured, else the pool dtype)."""
        if self.kv_format == "fp8":
            return ops.kv_pack_fp8(values, self.args.rope_head_dim)
        return values.to(self.dtype)

    def write_kv(self, layer: int, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Store values [n, head_dim] at pool rows [n] of layer (packing to FP8 entries when configured)."""
        if values.shape[0] == 0:
            return
        self.kv[layer][rows] = self.pack(values)

    def attend(self, layer: int, q: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
               scale: float, kv: torch.Tensor | None = None, paged: ops.PagedKV | None = None) -> torch.Tensor:
        """Sparse attention of q [T, H, hd] over layer's pool rows idx [T, K] (-1 = none); with `kv`, over those
        rows instead (in the pool's row format: `pack`, or rows gathered from `kv[layer]`); with `paged` (the
        block-table form of the same reads, over the layer's pool), through `ops.sparse_attn_paged`, which paged
        device kernels take (the FP8 entry pool has none mapped: it keeps `sparse_attn_fp8`)."""
        kv = self.kv[layer] if kv is None else kv
        if self.kv_format == "fp8":
            return ops.sparse_attn_fp8(q, kv, idx, sink, scale, self.args.rope_head_dim)
        if paged is not None:
            return ops.sparse_attn_paged(q, kv, idx, sink, scale, paged)
        return ops.sparse_attn(q, kv, idx, sink, scale)


class _PrivateAllocator:
    """Block allocator of a standalone SeqCache: free lists per kind, and the pool doubles when one runs dry."""

    def __init__(self, pool: CachePool):
        self.pool = pool
        self.free = {k: list(range(pool.num[k] - 1, -1, -1)) for k in (*KINDS, STATE_KIND, RUN_KIND)}

    def can_allocate(self, kind: str, n: int) -> bool:
        return True

    def allocate(self, kind: str, n: int) -> list[int]:
        if n > len(self.free[kind]):
            num = dict(self.pool.num)
            grow = max(num[kind], n - len(self.free[kind]), 4)
            num[kind] += grow
            self.pool.resize(num[WINDOW_KIND], num[COMP_KIND], num[STATE_KIND], num[RUN_KIND])
            self.free[kind] = list(range(num[kind] - 1, num[kind] - grow - 1, -1)) + self.free[kind]
        return [self.free[kind].pop() for _ in range(n)]

    def release(self, kind: str, blocks: list[int]) -> None:
        self.free[kind].extend(b for b in blocks if b >= 0)


@dataclass
class SeqCache:
    """One sequence's cache: block tables into a `CachePool` and its run slot (the compressors' running state).

    comp_blocks[j]: the block holding tokens [jB, (j+1)B); win_blocks[j]: the window block of tokens
    [jBw, (j+1)Bw), -1 once the window has moved past it. `length` = tokens already processed; the compressors
    have emitted length // m entries of a ratio-m layer and buffer the length % m tokens after them.
    """

    pool: CachePool
    alloc: Allocator
    run_slot: int = -1  # the pool's run slot (allocated by the first reserve; -1: none yet, or no compressor)
    comp_blocks: list[int] = field(default_factory=list)
    win_blocks: list[int] = field(default_factory=list)
    state_slots: list[int] = field(default_factory=list)  # per block: its block-end state slot, -1 = none
    state_upto: int | None = None  # blocks that get a state slot (None = all: standalone caches)
    length: int = 0
    auto_trim: bool = True  # StepBatch.commit drops out-of-window blocks (the engine trims itself, later)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def blocks_needed(self, tokens: int) -> dict[str, int]:
        """Blocks of each kind still to allocate so that `tokens` positions fit."""
        return {COMP_KIND: max(0, -(-tokens // self.block_size) - len(self.comp_blocks)),
                WINDOW_KIND: max(0, -(-tokens // self.pool.window_block) - len(self.win_blocks))}

    def reserve(self, tokens: int) -> None:
        """Make room for positions [0, tokens): allocates both kinds or nothing (raises NoFreeBlocks)."""
        need = self.blocks_needed(tokens)
        if self.run_slot < 0 and self.pool.has_compressor:
            need[RUN_KIND] = 1
        if not any(need.values()):
            return
        for kind, n in need.items():
            if n and not self.alloc.can_allocate(kind, n):
                raise NoFreeBlocks(f"need {n} free {kind} cache blocks")
        if need.get(RUN_KIND):
            self.run_slot = self.alloc.allocate(RUN_KIND, 1)[0]
        self.comp_blocks += self.alloc.allocate(COMP_KIND, need[COMP_KIND]) if need[COMP_KIND] else []
        self.win_blocks += self.alloc.allocate(WINDOW_KIND, need[WINDOW_KIND]) if need[WINDOW_KIND] else []
        # State slots for the blocks that may be resumed from; none left is not an error (no resume there).
        n = len(self.comp_blocks)
        want = n if self.state_upto is None else min(n, self.state_upto)
        while len(self.state_slots) < n:
            ok = len(self.state_slots) < want and self.alloc.can_allocate(STATE_KIND, 1)
            self.state_slots += self.alloc.allocate(STATE_KIND, 1) if ok else [-1]

    def trim(self, margin: int = 2) -> None:
        """Release window blocks no future query can see. `margin` positions of slack below the window; the
        engine trims after a step's rollbacks (speculative decoding), so the next step never rolls back below
        the length trimmed at."""
        first_needed = max(0, self.length - margin - self.pool.args.window_size + 1) // self.pool.window_block
        dead = [b for b in self.win_blocks[:first_needed] if b >= 0]
        if dead:
            self.alloc.release(WINDOW_KIND, dead)
            for j in range(first_needed):
                self.win_blocks[j] = -1

    def free(self) -> None:
        """Give every block back (finish, abort, preemption)."""
        self.alloc.release(COMP_KIND, [b for b in self.comp_blocks if b >= 0])
        self.alloc.release(WINDOW_KIND, [b for b in self.win_blocks if b >= 0])
        self.alloc.release(STATE_KIND, [b for b in self.state_slots if b >= 0])
        self.alloc.release(RUN_KIND, [self.run_slot] if self.run_slot >= 0 else [])
        self.comp_blocks, self.win_blocks, self.state_slots, self.run_slot = [], [], [], -1

    # -- addressing ----------------------------------------------------------------------------------------
    def window_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Pool rows of token positions (same in every layer's window region); -1 for negative positions."""
        Bw = self.pool.window_block
        table = torch.tensor(self.win_blocks, dtype=torch.long, device=positions.device)
        p = positions.clamp_min(0)
        blk = table[p // Bw]
        return torch.where((positions >= 0) & (blk >= 0), blk * Bw + p % Bw, torch.full_like(p, -1))

    def nbytes(self, layers: range | None = None) -> int:
        """Bytes this sequence holds: its live window rows, compressed entries, indexer keys and compressor
        state (block granularity for the paged parts), over `layers` (default all)."""
        pool, B, a = self.pool, self.block_size, self.pool.args
        layers = range(pool.n_layers) if layers is None else layers
        n_win = sum(b >= 0 for b in self.win_blocks)
        n_comp = len(self.comp_blocks)
        n_state = sum(b >= 0 for b in self.state_slots)
        total = (compressor_state_bytes(a, layers) if self.run_slot >= 0 else 0) + n_state * state_slot_bytes(a, layers)
        for l in layers:
            m = pool.ratios[l]
            total += n_win * pool.window_block * pool.entry_bytes
            if m:
                total += n_comp * (B // m) * pool.entry_bytes
            if m == 4:
                total += n_comp * (B // 4) * a.index_head_dim * torch.finfo(pool.dtype).bits // 8
        return total


def new_seq_cache(args, dtype: torch.dtype, device: torch.device | str = "cpu", block_size: int | None = None,
                  kv_format: str = "auto") -> SeqCache:
    """Empty standalone cache for `args` (a ModelArgs) with its own growing pool (tests, tools, one-off
    forwards). The engine instead builds SeqCaches over its shared pool and BlockManager."""
    ratios = {args.ratio(i) for i in range(args.n_layers + args.n_draft_layers)} - {0}
    B = block_size or max([128, *ratios])
    pool = CachePool(args, B, 0, 0, dtype, device, kv_format)
    return SeqCache(pool, _PrivateAllocator(pool))


@dataclass
class CacheMark:
    """What `mark` saved: enough to undo one step's writes to a SeqCache (speculative decoding). Rows past
    `length` are dead once length is restored (the next step rewrites them); of the run slot, the buffer rows
    the step may overwrite and the stored A-halves are kept: (layer, compressor, buffer rows, tensors)."""

    length: int
    saved: list[tuple[int, str, torch.Tensor, tuple]]


def mark(cache: SeqCache, tokens: int | None = None) -> CacheMark:
    """Remember the state before a step of `tokens` new tokens (None: any number) that may be rolled back."""
    pool, saved, rows_of = cache.pool, [], {}
    if cache.run_slot >= 0:
        for l, run in enumerate(pool.run):
            if run is None:
                continue
            m = pool.ratios[l]
            if m not in rows_of:  # the buffer rows positions length .. length+tokens-1 land on (one per ratio)
                span = m if tokens is None else min(tokens, m)
                rows_of[m] = torch.tensor([(cache.length + j) % m for j in range(span)], device=pool.device)
            rows = rows_of[m]
            for name, (kv, score, pkv, psc) in run.items():
                keep = (kv[cache.run_slot, rows].clone(), score[cache.run_slot, rows].clone(),
                        *(t[cache.run_slot].clone() if t is not None else None for t in (pkv, psc)))
                saved.append((l, name, rows, keep))
    return CacheMark(cache.length, saved)


def rollback(cache: SeqCache, m: CacheMark) -> None:
    """Undo everything a step wrote since `mark` (rejected draft tokens)."""
    cache.length = m.length
    for l, name, rows, keep in m.saved:
        kv, score, pkv, psc = cache.pool.run[l][name]
        kv[cache.run_slot, rows], score[cache.run_slot, rows] = keep[0], keep[1]
        if pkv is not None:
            pkv[cache.run_slot], psc[cache.run_slot] = keep[2], keep[3]


# The per-step batch lives in its own module (step_batch.py); importing it from here keeps working.
from .step_batch import SeqSlice, StepBatch  # noqa: E402,F401

