"""The paged seam op `ascend_v4::sparse_attn_paged`: the block-table form (ops/reference/paged.py) on a hand-worked
example, the op equal to `sparse_attn` on its row form through the dispatcher and under opcheck, the tables
built only when a kernel reads them, and bad inputs named."""

from __future__ import annotations

import pytest
import torch

from ascend_v4 import ops
from ascend_v4.ops.reference.attention import sparse_attn
from ascend_v4.ops.reference.paged import paged_rows, query_positions

I32 = torch.int32


def test_paged_rows_hand_worked():
    # window 4, window blocks of 2 rows, B = 8 (ratio 4: 2 entries per comp block), comp region from row 20.
    # Sequence 0: 7 positions after the step, 2 new (positions 5, 6); sequence 1: 3 new from 0.
    win = torch.tensor([[-1, 4, 7, 2], [6, 3, -1, -1]], dtype=I32)  # seq 0's block 0 released
    comp = torch.tensor([[1], [0]], dtype=I32)
    cu, used = torch.tensor([0, 2, 5], dtype=I32), torch.tensor([7, 3], dtype=I32)
    seq, pos = query_positions(cu, used)
    assert seq.tolist() == [0, 0, 1, 1, 1] and pos.tolist() == [5, 6, 0, 1, 2]
    rows = paged_rows(win, comp, cu, used, None, 4, 2, 20, 8, 0)
    # position p lives at row win[s, p // 2] * 2 + p % 2: seq 0: 2->8, 3->9, 4->14, 5->15, 6->4; seq 1: 0->12,
    # 1->13, 2->6; a query at p reads p-3 .. p
    assert rows.tolist() == [[8, 9, 14, 15], [9, 14, 15, 4], [-1, -1, -1, 12], [-1, -1, 12, 13], [-1, 12, 13, 6]]
    picks = torch.tensor([[0, -1], [0, 1], [-1, -1], [-1, -1], [-1, -1]], dtype=I32)
    csa = paged_rows(win, comp, cu, used, picks, 4, 2, 20, 8, 4)
    # entry j sits at row 20 + comp block 1 * 2 + j; entry 1 completes at position 7, so the pick of it at
    # position 6 names nothing (vllm-ascend's kernel skips it the same way)
    assert csa[:, 4:].tolist() == [[22, -1], [22, -1], [-1, -1], [-1, -1], [-1, -1]]
    hca = paged_rows(win, torch.tensor([[1], [0]], dtype=I32), cu, used, None, 4, 2, 20, 128, 128)
    assert hca.shape == (5, 4) and torch.equal(hca, rows)  # nobody has a complete 128-token entry yet
    with pytest.raises(ValueError, match="picks"):
        paged_rows(win, comp, cu, used, None, 4, 2, 20, 8, 4)


def _inputs(ratio=4):
    g = torch.Generator().manual_seed(0)
    win = torch.tensor([[-1, 4, 7, 2], [6, 3, -1, -1]], dtype=I32)
    comp = torch.tensor([[1], [0]], dtype=I32)
    cu, used = torch.tensor([0, 2, 5], dtype=I32), torch.tensor([7, 3], dtype=I32)
    picks = torch.tensor([[0, -1], [0, -1], [-1, -1], [-1, -1], [-1, -1]], dtype=I32) if ratio == 4 else None
    idx = paged_rows(win, comp, cu, used, picks, 4, 2, 20, 8, ratio)
    q, kv, sink = torch.randn(5, 3, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(3, generator=g)
    tables = ops.PagedTables(win, comp, cu, used, 3, 7)
    return q, kv, idx, sink, 0.25, ops.PagedKV(4, 2, 20, 8, ratio, lambda: tables, (lambda: picks) if picks is not None else None)


def test_the_op_equals_sparse_attn_on_its_rows_and_passes_opcheck():
    q, kv, idx, sink, scale, paged = _inputs()
    want = sparse_attn(q, kv, idx, sink, scale)
    torch.testing.assert_close(ops.sparse_attn_paged(q, kv, idx, sink, scale, paged), want)
    flat = (q, kv, idx, sink, scale, *paged.flat())
    torch.testing.assert_close(torch.ops.ascend_v4.sparse_attn_paged(*flat), want)  # the dispatcher's default
    torch.library.opcheck(torch.ops.ascend_v4.sparse_attn_paged.default, flat)


def test_the_cpu_path_never_builds_the_tables():
    q, kv, idx, sink, scale, paged = _inputs(0)

    def boom():
        raise AssertionError("tables built on the CPU path")

    lazy = ops.PagedKV(paged.window, paged.window_block, paged.comp_base, paged.block_size, 0, boom)
    torch.testing.assert_close(ops.sparse_attn_paged(q, kv, idx, sink, scale, lazy), sparse_attn(q, kv, idx, sink, scale))


@pytest.mark.parametrize("field,value,match", [("ratio", 8, "ratio must be one of"),
                                               ("comp_base", 21, "comp_base 21 must be a whole number"),
                                               ("comp_base", 40, "within kv's 24 rows")])
def test_bad_paged_description_is_named(field, value, match):
    q, kv, idx, sink, scale, paged = _inputs()
    bad = ops.PagedKV(**{**paged.__dict__, field: value})
    with pytest.raises(ops.OpInputError, match=f"sparse_attn_paged: .*{match}"):
        ops.sparse_attn_paged(q, kv, idx, sink, scale, bad)
