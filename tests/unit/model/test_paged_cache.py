"""The paged cache (model/cache.py): block tables, window trimming, the growing private pool, block-end
compressor state, and the FP8 entry format end to end through the model."""

import dataclasses

import pytest
import torch

from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
from ascend_v4.model.args import ModelArgs
from ascend_v4.model.cache import (COMP_KIND, RUN_KIND, STATE_KIND, WINDOW_KIND, CachePool, SeqCache, StepBatch,
                                   check_block_size, mark, new_seq_cache, rollback)
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
    pool = CachePool(args, 128, 1, 1, F32, num_run_slots=1)
    pool.kv[1][:32] = 1.0  # window block 0 (32 rows)
    pool.kv[1][32:64] = 2.0  # comp block 0 of layer 1 (ratio 4: 32 entries per block)
    pool.run[1]["index"][2][0] = 3.0  # run slot 0: the indexer compressor's stored A-half
    pool.resize(3, 2, num_run_slots=2)
    assert pool.comp_base(1) == 3 * 32
    assert (pool.kv[1][:32] == 1).all() and (pool.kv[1][96:128] == 2).all()
    assert (pool.run[1]["index"][2][0] == 3).all() and pool.run[1]["index"][2].shape == (2, 4, args.index_head_dim)
    assert pool.num == {WINDOW_KIND: 3, COMP_KIND: 2, STATE_KIND: 0, RUN_KIND: 2}


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
        for name in ("comp", "index"):
            slot = whole.pool.state[lid][name][whole.state_slots[1]]
            _, _, prev_kv, prev_score = cut.pool.run[lid][name]
            torch.testing.assert_close(slot[0], prev_kv[cut.run_slot], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(slot[1], prev_score[cut.run_slot], rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("length", [125, 127, 255])
def test_rollback_is_exact_across_window_ends(model, length):
    """A rejected 2-token step that closes CSA and HCA windows (127 -> 128 ends an HCA window and a block) and
    opens new ones is undone exactly: the next step's logits equal, bit for bit, those of a cache that never saw
    the rejected tokens (a missed run-slot row or A-half would change the next entries)."""
    ids = _ids(length + 1, seed=5)
    runs = []
    for speculate in (False, True):
        c = new_seq_cache(model.args, F32)
        b = StepBatch.build([(c, ids[:length])])
        model(b)
        b.commit()
        if speculate:
            m = mark(c, 2)
            b = StepBatch.build([(c, [7, 8])])
            model(b)
            b.commit()
            rollback(c, m)
        b = StepBatch.build([(c, ids[length:])])
        runs.append(model.logits(model(b)))
        b.commit()
        # and the step after that, which reads the entries the rolled-back windows produce
        b = StepBatch.build([(c, [9, 10, 11, 12])])
        runs.append(model.logits(model(b)))
    assert torch.equal(runs[0], runs[2]) and torch.equal(runs[1], runs[3])


@pytest.fixture(scope="module")
def model_nosim():
    return load_model(ensure_dummy_checkpoint("tiny"), ModelOptions(dtype=F32, quant_sim=False,
                                                                     dequantize_weights=True))


def test_shared_pool_batch_equals_each_sequence_alone(model_nosim):
    """Sequences on one pool (the engine's case: one run slot each, one compressor plan per step) with mixed
    prefill chunks and decodes give each sequence's logits as when it runs alone. Without the quantisation
    simulation: with it, an ulp of GEMM-shape difference can flip an FP4 rounding and then an indexer pick."""
    model = model_nosim
    prompts = [_ids(n, seed=10 + n) for n in (130, 7, 260)]
    steps = [[(0, 0, 129), (1, 0, 5), (2, 0, 255)], [(0, 129, 130), (1, 5, 7), (2, 255, 260)]]
    first = new_seq_cache(model.args, F32)
    shared = [first] + [SeqCache(first.pool, first.alloc) for _ in prompts[1:]]
    alone = [new_seq_cache(model.args, F32) for _ in prompts]
    for step in steps:
        b = StepBatch.build([(shared[i], prompts[i][a:e]) for i, a, e in step])
        got = model.logits(model(b))
        b.commit()
        for i, a, e in step:
            s = b.seqs[i]
            bi = StepBatch.build([(alone[i], prompts[i][a:e])])
            ref = model.logits(model(bi))
            bi.commit()
            torch.testing.assert_close(got[s.offset:s.offset + s.n], ref, rtol=1e-4, atol=1e-4)
    assert sorted(c.run_slot for c in shared) == [0, 1, 2]


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


def test_plan_refuses_a_cache_without_run_slot_and_gapped_slices(model):
    from ascend_v4.model.step_batch import SeqSlice

    c = new_seq_cache(model.args, F32)
    c.reserve(2)
    slot, c.run_slot = c.run_slot, -1  # blocks but no run slot (a slot index of -1 would hit another sequence's)
    with pytest.raises(RuntimeError, match="no run slot"):
        model(StepBatch(torch.tensor([0, 5]), torch.tensor([0, 1]), [SeqSlice(c, 0, 0, 2)]))
    c.run_slot = slot
    shared = SeqCache(c.pool, c.alloc)
    shared.reserve(1)
    b = StepBatch(torch.tensor([0, 5, 7, 9]), torch.tensor([0, 1, 0, 0]),
                  [SeqSlice(c, 0, 0, 2), SeqSlice(shared, 3, 0, 1)])  # row 2 belongs to nobody
    with pytest.raises(ValueError, match="back to back"):
        model(b)
