"""Index plan of one step's compressor work for a group of sequences on one cache pool and one compression ratio m:
built once per step (memoised in `StepBatch`), shared by every layer with that ratio, so the compressors and the
attention indices of the whole batch are a fixed number of tensor ops per layer, not a loop over sequences.

Each sequence i of the group has a run slot r_i (its running compressor state in `CachePool.run`: the rows of its
incomplete window at [r_i, p mod m], and for CSA the A-half of its last complete window), L_i tokens already in
the cache and n_i new tokens at rows o_i .. o_i+n_i-1 of the group's step rows. The windows that close this step
are w in [L_i // m, (L_i + n_i) // m); window w's m token rows come from the run buffer (positions < L_i) or from
the step (the rest). New entries are numbered e = 0 .. E-1, sequence after sequence, windows ascending.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _t(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


@dataclass
class CompressPlan:
    """What `Compressor.forward` and `Attention._attend` index with; every tensor int64 on the step's device."""

    m: int
    n_new: int  # E: entries the step completes (all sequences of the group)
    # Gather of the closing windows' token rows into [E*m]: destination positions and their sources.
    dst_step: torch.Tensor
    src_step: torch.Tensor  # group step rows
    dst_buf: torch.Tensor
    src_buf: torch.Tensor  # flat run-buffer rows r*m + (p mod m)
    # CSA: the A-half each new entry pools with: index into cat(this step's A-halves [E], the empty one [1],
    # the run slots' stored A-halves at prev_slots [k]).
    prev_from: torch.Tensor
    prev_slots: torch.Tensor
    wpos: torch.Tensor  # [E] first position of each new window (RoPE position of its entry)
    entry_rows: torch.Tensor  # [E] rows (relative to the compressed region) the new entries go to
    buf_dst: torch.Tensor  # flat run-buffer rows written with the step's tokens of still-open windows
    buf_src: torch.Tensor  # their group step rows
    last_slots: torch.Tensor  # CSA: run slots whose stored A-half becomes that of their last new window
    last_entries: torch.Tensor
    keep_entries: torch.Tensor  # new entries that end a comp block with a state slot (prefix-cache resume)
    keep_slots: torch.Tensor
    # Attention side, after the step: sequence i has N_i = (L_i + n_i) // m entries.
    table: torch.Tensor  # [S, Nmax] entry rows (relative) of each sequence's entries, padded
    counts: torch.Tensor  # [S] N_i
    tok_seq: torch.Tensor  # [Tg] sequence of each step row
    visible: torch.Tensor  # [Tg] entries complete at each query position: (p + 1) // m
    memo: dict = field(default_factory=dict, repr=False)

    def hca_index(self, base: int) -> torch.Tensor:
        """[Tg, Nmax] pool rows of the entries each query sees (all complete ones), -1 for none."""
        key = ("hca", base)
        if key not in self.memo:
            e = torch.arange(self.table.shape[1], device=self.table.device)[None, :]
            self.memo[key] = torch.where(e < self.visible[:, None], base + self.table[self.tok_seq],
                                         torch.full_like(e, -1))
        return self.memo[key]

    def indexer_runs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat entry rows of every sequence back to back [sum N_i], each query's run start [Tg] and length
        [Tg] in that flat list): the keys `ops.indexer_topk` reads, one contiguous run per sequence."""
        if "runs" not in self.memo:
            n = self.table.shape[1]
            valid = torch.arange(n, device=self.table.device)[None, :] < self.counts[:, None]
            starts = torch.cumsum(self.counts, 0) - self.counts
            self.memo["runs"] = (self.table[valid], starts[self.tok_seq],
                                 torch.minimum(self.visible, self.counts[self.tok_seq]))
        return self.memo["runs"]

    def selected_rows(self, sel: torch.Tensor, base: int) -> torch.Tensor:
        """Indexer picks (indices into the flat key list, -1 none) [Tg, k] -> pool rows, -1 for none."""
        key = ("map", base)
        if key not in self.memo:
            flat = self.indexer_runs()[0]
            self.memo[key] = torch.cat((base + flat, flat.new_full((1,), -1)))
        rows = self.memo[key]
        return rows[torch.where(sel >= 0, sel, rows.shape[0] - 1)]


def build_compress_plan(seqs, offsets: list[int], positions: torch.Tensor, m: int, overlap: bool) -> CompressPlan:
    """seqs: the group's SeqSlices (one pool), offsets: each one's first row in the group's step rows,
    positions: the group's step positions [Tg]."""
    device = positions.device
    pool = seqs[0].cache.pool
    epb = pool.block_size // m
    dst_step, src_step, dst_buf, src_buf, prev_from, prev_slots = [], [], [], [], [], []
    wpos, entry_rows, buf_dst, buf_src, last_slots, last_entries, keep_entries, keep_slots = ([] for _ in range(8))
    tok_seq, counts, tables = [], [], []
    e = 0
    for i, (s, o) in enumerate(zip(seqs, offsets)):
        c = s.cache
        r, L, n = c.run_slot, s.start, s.n
        if r < 0:  # a -1 would index (and corrupt) another sequence's slot
            raise RuntimeError("a sequence in the step has no run slot: reserve its cache first (SeqCache.reserve)")
        end = L + n
        w0, w1 = L // m, end // m
        for w in range(w0, w1):
            p0 = w * m
            k = min(max(L - p0, 0), m)  # the window's first k tokens were buffered by earlier steps
            dst_buf.extend(range(e * m, e * m + k))
            src_buf.extend(range(r * m, r * m + k))
            dst_step.extend(range(e * m + k, e * m + m))
            src_step.extend(range(o + p0 + k - L, o + p0 + m - L))
            if overlap:
                if w > w0:
                    prev_from.append(e - 1)
                elif w == 0:
                    prev_from.append(-1)  # no window before the first: the empty A-half (fixed up below)
                else:
                    prev_from.append(-2 - len(prev_slots))  # the slot's stored A-half (fixed up below)
                    prev_slots.append(r)
            wpos.append(p0)
            entry_rows.append(c.comp_blocks[w // epb] * epb + w % epb)
            if (w + 1) % epb == 0 and c.state_slots[w // epb] >= 0:
                keep_entries.append(e)
                keep_slots.append(c.state_slots[w // epb])
            e += 1
        if overlap and w1 > w0:
            last_slots.append(r)
            last_entries.append(e - 1)
        for p in range(max(L, w1 * m), end):  # tokens of the window still open after the step
            buf_dst.append(r * m + p % m)
            buf_src.append(o + p - L)
        tok_seq += [i] * n
        counts.append(w1)
        tables.append(c.comp_blocks)
    E = e
    # -1 -> the empty A-half at E; -2-k -> stored A-half k at E+1+k
    prev_from = [E if f == -1 else (E + 1 + (-2 - f) if f < -1 else f) for f in prev_from]
    nb = max(len(t) for t in tables)
    blocks = _t([t + [0] * (nb - len(t)) for t in tables], device)  # [S, nb] comp block tables, padded
    # [S, Nmax]: as wide as the longest sequence's entries (the attention index width does not depend on blocks)
    table = (blocks[:, :, None] * epb + torch.arange(epb, device=device)).reshape(len(seqs), nb * epb)
    table = table[:, :max(counts)]
    return CompressPlan(m, E, _t(dst_step, device), _t(src_step, device), _t(dst_buf, device), _t(src_buf, device),
                        _t(prev_from, device), _t(prev_slots, device), _t(wpos, device), _t(entry_rows, device),
                        _t(buf_dst, device), _t(buf_src, device), _t(last_slots, device), _t(last_entries, device),
                        _t(keep_entries, device), _t(keep_slots, device), table, _t(counts, device),
                        _t(tok_seq, device), (positions + 1) // m)
