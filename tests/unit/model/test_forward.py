"""Forward-pass invariants on the tiny dummy checkpoint: incremental = full, batched = alone, chunked = whole,
the QAT simulation switch, dequantised = packed weights, MTP callable, names mirror the checkpoint."""

from __future__ import annotations

import pytest
import torch

from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
from ascend_v4.checkpoint.spec import expected_tensors
from ascend_v4.model.args import ModelArgs
from ascend_v4.model.cache import StepBatch, new_seq_cache
from ascend_v4.model.layers import ModelOptions
from ascend_v4.model.load import load_model
from ascend_v4.model.transformer import Transformer

F32 = torch.float32


@pytest.fixture(scope="module")
def ckpt():
    return ensure_dummy_checkpoint("tiny")


@pytest.fixture(scope="module")
def model(ckpt):
    # Dequantised weights: identical numerics (test_dequantized_weights_match_packed), much faster on CPU.
    return load_model(ckpt, ModelOptions(dtype=F32, quant_sim=False, dequantize_weights=True))


@pytest.fixture(scope="module")
def model_sim(ckpt):
    return load_model(ckpt, ModelOptions(dtype=F32, quant_sim=True, dequantize_weights=True))


def _ids(n: int, seed: int, vocab: int = 129280) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def run(model, chunks_per_seq: list[list[list[int]]]) -> list[torch.Tensor]:
    """Feed each sequence its chunks, all sequences batched per step; return logits per sequence [n, V]."""
    caches = [new_seq_cache(model.args, model.opts.dtype) for _ in chunks_per_seq]
    outs = [[] for _ in chunks_per_seq]
    for step in range(max(len(c) for c in chunks_per_seq)):
        live = [i for i, c in enumerate(chunks_per_seq) if step < len(c)]
        b = StepBatch.build([(caches[i], chunks_per_seq[i][step]) for i in live])
        x = model(b)
        b.commit()
        lg = model.logits(x)
        for i, s in zip(live, b.seqs):
            outs[i].append(lg[s.offset:s.offset + s.n])
    return [torch.cat(o) for o in outs]


def test_parameter_names_mirror_checkpoint():
    args = ModelArgs.from_preset("tiny")
    with torch.device("meta"):
        m = Transformer(args, ModelOptions(dtype=F32))
    spec = expected_tensors(args)
    params = dict(m.named_parameters())
    assert set(params) == set(spec)
    for name, s in spec.items():
        shape = params[name].shape
        assert tuple(shape) == s.shape, name


@pytest.mark.parametrize("sim", [False, True])
def test_incremental_decode_equals_full_forward(model, model_sim, sim):
    m = model_sim if sim else model
    ids = _ids(200, 1)  # crosses the HCA window (128) and many CSA (4) windows; window 16
    full = run(m, [[ids]])[0]
    steps = [ids[:40]] + [[t] for t in ids[40:]]
    inc = run(m, [steps])[0]
    assert full.shape == inc.shape == (200, m.args.vocab_size)
    if not sim:
        torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)
        assert torch.equal(inc.argmax(-1), full.argmax(-1))
    else:
        # FP8 rounding is discontinuous: fp32 matmuls of 1 row vs 200 rows differ by ~1e-7, which flips an
        # occasional FP8 round-trip step. Equal up to such flips: (measured cos mean 0.998, top-1 0.94).
        cos = torch.nn.functional.cosine_similarity(inc, full, dim=-1)
        assert cos.mean() > 0.99 and (inc.argmax(-1) == full.argmax(-1)).float().mean() > 0.85
        torch.testing.assert_close(inc[:40], full[:40], rtol=1e-4, atol=1e-4)  # the shared prefill


def test_batched_equals_unbatched_and_chunked_equals_whole(model):
    seqs = [_ids(n, 10 + n) for n in (7, 133, 261)]
    alone = [run(model, [[s]])[0] for s in seqs]
    together = run(model, [[s] for s in seqs])
    for a, b in zip(alone, together):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # chunk boundaries inside compression windows (not multiples of 4 or 128), mixed with decode steps
    s = seqs[2]
    chunked = run(model, [[s[:5], s[5:70], s[70:131], s[131:132], s[132:]], [seqs[0]]])[0]
    torch.testing.assert_close(chunked, alone[2], rtol=1e-4, atol=1e-4)


def test_quant_sim_switch_changes_logits_but_stays_close(model, model_sim):
    ids = _ids(200, 3)
    off, on = run(model, [[ids]])[0], run(model_sim, [[ids]])[0]
    assert (off - on).abs().max() > 1e-2  # the switch really does something
    cos = torch.nn.functional.cosine_similarity(off, on, dim=-1)
    assert cos.mean() > 0.9, cos.mean()


def test_dequantized_weights_match_packed(ckpt, model_sim):
    packed = load_model(ckpt, ModelOptions(dtype=F32, quant_sim=True))
    assert all(not getattr(m, "packed", False) for m in model_sim.modules())
    assert packed.layers[1].ffn.experts[0].w1.packed and packed.layers[1].attn.wq_b.packed
    ids = _ids(140, 4)
    torch.testing.assert_close(run(packed, [[ids]])[0], run(model_sim, [[ids]])[0], rtol=1e-5, atol=1e-5)


def test_bf16_tracks_fp32(ckpt, model):
    m16 = load_model(ckpt, ModelOptions(dtype=torch.bfloat16, quant_sim=False, dequantize_weights=True))
    ids = _ids(40, 5)  # bf16 matmuls are very slow on AVX2-only CPUs
    a, b = run(model, [[ids]])[0], run(m16, [[ids]])[0]
    cos = torch.nn.functional.cosine_similarity(a, b.float(), dim=-1)
    assert cos.min() > 0.95, cos.min()


def test_wo_a_is_dense_after_load(model):
    wo_a = model.layers[0].attn.wo_a
    assert not wo_a.packed and wo_a.weight.dtype == F32


def test_mtp_block_callable(model):
    ids = _ids(40, 6)
    cache = new_seq_cache(model.args, F32)
    b = StepBatch.build([(cache, ids[:-1])])
    x = model(b)
    lg = model.mtp_logits(x, torch.tensor(ids[1:]), b)
    b.commit()
    assert lg.shape == (39, model.args.vocab_size) and torch.isfinite(lg).all()
    # the MTP block has its own window-only layer cache, written by that call
    rows = cache.window_rows(torch.arange(39))
    assert cache.pool.kv[model.args.n_layers][rows].abs().sum() > 0


def test_step_batch_rejects_empty_chunk(model):
    with pytest.raises(ValueError, match="no tokens"):
        StepBatch.build([(new_seq_cache(model.args, F32), [])])
