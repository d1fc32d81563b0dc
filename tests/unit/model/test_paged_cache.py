"""The paged cache (model/cache.py): block tables, window trimming, the growing private pool, block-end
compressor state, and the FP8 entry format end to end through the model."""

import dataclasses

import pytest
import torch

from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
from ascend_v4.model.args import ModelArgs
from ascend_v4.model.cache import (COMP_KIND, STATE_KIND, WINDOW_KIND, CachePool, StepBatch, check_block_size, mark,
                                   new_seq_cache, rollback)
from ascend_v4.model.layers import ModelOptions
from ascend_v4.model.load import load_model

F32 = torch.float32


@pytest.fixture(scope="module")
def args():
    return ModelArgs.from_preset("tiny")


@pytest.fixture(scope="module")
def model():
    return load_model(ensure_dummy_checkpoint("tiny"), ModelOptions(dtype=F32, quant_sim=True,
                                                                     dequantize_weights=True))


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(3, 129280, (n - 1,), generator=g).tolist()


def test_block_size_must_be_a_multiple_of_every_ratio(args):
    with pytest.raises(ValueError, match="multiple of every compression ratio"):
        check_block_size(args, 64)
    check_block_size(args, 256)


def test_reserve_trim_free_and_row_addressing(args):
    c = new_seq_cache(args, F32)
    B, Bw = c.block_size, c.pool.window_block
    assert (B, Bw) == (128, 32)
    c.reserve(300)  # 3 comp blocks of 128, 10 window blocks of 32
    assert len(c.comp_blocks) == 3 and len(c.win_blocks) == 10
    c.reserve(200)
    assert len(c.comp_blocks) == 3 and len(c.win_blocks) == 10  # already there: no-op
    rows = c.window_rows(torch.tensor([-1, 0, 31, 32, 299]))
    assert rows[0] == -1 and rows[1] == c.win_blocks[0] * Bw and rows[3] == c.win_blocks[1] * Bw
    assert rows[4] == c.win_blocks[9] * Bw + 299 - 288
    c.length = 300
    c.trim()  # window 16: positions >= 300-2-16+1 = 283 stay visible -> window blocks 0..7 released
    assert c.win_blocks[:8] == [-1] * 8 and min(c.win_blocks[8:]) >= 0
    assert (c.window_rows(torch.tensor([100, 255])) == -1).all()
    c.free()
    assert c.comp_blocks == [] and c.win_blocks == []


def test_private_pool_growth_keeps_rows(args):
    pool = CachePool(args, 128, 1, 1, F32)
    pool.kv[1][:32] = 1.0  # window block 0 (32 rows)
    pool.kv[1][32:64] = 2.0  # comp block 0 of layer 1 (ratio 4: 32 entries per block)
    pool.resize(3, 2)
    assert pool.comp_base(1) == 3 * 32
    assert (pool.kv[1][:32] == 1).all() and (pool.kv[1][96:128] == 2).all()
    assert pool.num == {WINDOW_KIND: 3, COMP_KIND: 2, STATE_KIND: 0}


def test_long_prefill_holds_only_the_window_blocks(model):
    c = new_seq_cache(model.args, F32)
    b = StepBatch.build([(c, _ids(700))])
    model(b)
    b.commit()
    live = [w for w in c.win_blocks if w >= 0]
    assert len(c.comp_blocks) == 6 and len(live) == 1  # window 16 < one block of 128


def test_block_end_state_is_the_running_state_there(model):
    """The A-half stored with a comp block equals the running compressor state of a sequence stopped exactly
    at that block's end: what a prefix hit restores is what the sequence had."""
    ids = _ids(300, seed=2)
    whole = new_seq_cache(model.args, F32)
    b = StepBatch.build([(whole, ids)])
    model(b)
    b.commit()
    cut = new_seq_cache(model.args, F32)
    b = StepBatch.build([(cut, ids[:256])])
    model(b)
    b.commit()
    for lid in (1, 3):  # CSA layers of tiny
        for k, name in ((0, "comp"), (1, "index")):
            slot = whole.pool.state[lid][name][whole.state_slots[1]]
            st = cut.states[lid][k]
            torch.testing.assert_close(slot[0], st.prev_kv, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(slot[1], st.prev_score, rtol=1e-5, atol=1e-5)


def test_mark_rollback_restores_decode(model):
    ids = _ids(140, seed=3)
    c = new_seq_cache(model.args, F32)
    b = StepBatch.build([(c, ids[:-1])])
    model(b)
    b.commit()
    m = mark(c)
    b = StepBatch.build([(c, [5, 6])])  # speculative tokens, then rejected
    model(b)
    b.commit()
    rollback(c, m)
    b = StepBatch.build([(c, ids[-1:])])
    got = model.logits(model(b))
    ref_c = new_seq_cache(model.args, F32)
    ref = model.logits(model(StepBatch.build([(ref_c, ids)]))[-1:])
    assert torch.nn.functional.cosine_similarity(got, ref).item() > 0.99


def test_fp8_cache_incremental_matches_full_and_stays_close_to_native(model):
    ids = _ids(200, seed=4)
    outs = {}
    for fmt in ("auto", "fp8"):
        full = new_seq_cache(model.args, F32, kv_format=fmt)
        outs[fmt, "full"] = model.logits(model(StepBatch.build([(full, ids)]))[-1:])
        inc = new_seq_cache(model.args, F32, kv_format=fmt)
        b = StepBatch.build([(inc, ids[:150])])
        model(b)
        b.commit()
        for t in ids[150:-1]:
            b = StepBatch.build([(inc, [t])])
            model(b)
            b.commit()
        outs[fmt, "inc"] = model.logits(model(StepBatch.build([(inc, ids[-1:])])))
    full8 = new_seq_cache(model.args, F32, kv_format="fp8")
    assert full8.pool.kv[0].dtype == torch.uint8 and full8.pool.entry_bytes == 64 + 128 + 8
    cos = torch.nn.functional.cosine_similarity
    assert cos(outs["fp8", "full"], outs["fp8", "inc"]).item() > 0.99
    # QAT simulation on: nope dims were already FP8-rounded, so the FP8 entry only rounds rope dims to bf16
    assert cos(outs["fp8", "full"], outs["auto", "full"]).item() > 0.99


def test_fp8_format_rejects_unsupported_head_dim():
    a = dataclasses.replace(ModelArgs.from_preset("tiny"), head_dim=96)  # nope 32: not a multiple of 64
    with pytest.raises(ValueError, match="kv_format='fp8'"):
        CachePool(a, 128, 0, 0, F32, kv_format="fp8")
