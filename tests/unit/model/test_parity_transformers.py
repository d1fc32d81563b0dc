"""Parity with transformers 5.23's DeepseekV4ForCausalLM on the same official-layout dummy checkpoint, float32,
QAT simulation off: logits at every prompt position and the greedy continuation.

The prompt (260 tokens) crosses two HCA windows (128) and 65 CSA windows (4) with a 16-token sliding window
and index_topk 8, so compressed entries, indexer selection and hash routing (layers 0-1) are all exercised.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint  # noqa: E402
from ascend_v4.model.cache import StepBatch, new_seq_cache  # noqa: E402
from ascend_v4.model.layers import ModelOptions  # noqa: E402
from ascend_v4.model.load import load_model  # noqa: E402
from ascend_v4.peers.transformers_v4 import (  # noqa: E402
    load_transformers_model, transformers_greedy, transformers_logits)
from ascend_v4.runtime.generate import generate_ids  # noqa: E402
from ascend_v4.runtime.sampling import SamplingParams  # noqa: E402

N_PROMPT, N_NEW = 260, 12


@pytest.fixture(scope="module")
def setup():
    ckpt = ensure_dummy_checkpoint("tiny")
    ours = load_model(ckpt, ModelOptions(dtype=torch.float32, quant_sim=False, dequantize_weights=True))
    theirs = load_transformers_model(ckpt, torch.float32)
    g = torch.Generator().manual_seed(1234)
    ids = [0] + torch.randint(3, 129280, (N_PROMPT - 1,), generator=g).tolist()
    return ours, theirs, ids


def test_logits_match_at_every_position(setup):
    ours, theirs, ids = setup
    cache = new_seq_cache(ours.args, torch.float32)
    b = StepBatch.build([(cache, ids)])
    mine = ours.logits(ours(b))
    ref = transformers_logits(theirs, ids)
    assert mine.shape == ref.shape == (N_PROMPT, 129280)
    # the compressed paths were really used: HCA and CSA entries exist, indexer selection is a strict subset
    assert b.compress_plan((0,), 128).n_new == N_PROMPT // 128 and b.compress_plan((0,), 4).n_new == N_PROMPT // 4
    assert b.compress_plan((0,), 4).n_new > ours.args.index_topk
    rel = (mine - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"max relative logit difference {rel:.2e}"
    assert torch.equal(mine.argmax(-1), ref.argmax(-1))


def test_greedy_continuation_identical(setup):
    ours, theirs, ids = setup
    mine = generate_ids(ours, [ids], [SamplingParams(max_tokens=N_NEW, temperature=0, ignore_eos=True)])[0]
    ref = transformers_greedy(theirs, ids, N_NEW)
    assert mine.token_ids == ref
