"""The block-table form of one attention layer's reads, as the model hands it to `ops.sparse_attn_paged`.

`PagedKV` says how the layer's pool rows are paged (window rows in blocks of `window_block`, compressed entries
from row `comp_base` in blocks of `block_size // ratio`) and, through `tables()` / `picks()`, the step's block
tables, query and sequence lengths and the CSA indexer's logical picks (ops/reference/paged.py defines every
field). Both are callables so that the tables are built only where a paged kernel may read them, on an NPU:
the CPU and CUDA paths read the row form (`idx`) alone. Built once per step and shared by every layer
(`StepBatch.paged_tables`), like vLLM's attention metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

RATIOS = (0, 4, 128)  # window only, CSA, HCA


def padded_table(rows: list[list[int]], device: torch.device | str = "cpu") -> Tensor:
    """Block tables of several sequences as one int32 [S, max len] tensor, rows padded with -1."""
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32, device=device)


@dataclass(frozen=True)
class PagedTables:
    """A group of sequences' step description (int32 on the step's device; rows padded with -1)."""

    win_table: Tensor  # [S, nw] window block of positions j*Bw .. j*Bw+Bw-1, -1 = released / none
    comp_table: Tensor  # [S, nc] comp block of positions j*B .. j*B+B-1
    cu_seqlens_q: Tensor  # [S+1] prefix sums of the sequences' new tokens (the rows of q)
    seqused_kv: Tensor  # [S] each sequence's length after the step
    max_seqlen_q: int
    max_seqlen_kv: int


@dataclass(frozen=True)
class PagedKV:
    """How one layer's pool is paged, and the step's tables (see the module docstring)."""

    window: int
    window_block: int
    comp_base: int
    block_size: int
    ratio: int
    tables: Callable[[], PagedTables]
    # CSA: [T, k] logical entry numbers, the -1s (none) after the picks (vllm-ascend's kernel stops at the first)
    picks: Callable[[], Tensor] | None = None

    def flat(self) -> tuple:
        """The op's arguments after (q, kv, idx, sink, scale), in schema order."""
        t = self.tables()
        picks = self.picks() if self.picks is not None else None
        return (t.win_table, t.comp_table, t.cu_seqlens_q, t.seqused_kv, picks, t.max_seqlen_q, t.max_seqlen_kv,
                self.window, self.window_block, self.comp_base, self.block_size, self.ratio)
