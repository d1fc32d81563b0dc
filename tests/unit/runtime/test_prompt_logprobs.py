"""Prompt log-probs (`SamplingParams.prompt_logprobs`), computed from the prefill's own hidden states: equal to
a plain full forward's log-softmax at every position, whole or chunked, cold or with the prompt's prefix already
in the prefix cache (recomputed, not read), with `max_tokens=0` (scoring only) and with generation after it."""

from __future__ import annotations

import pytest
import torch

from ascend_v4.model.cache import StepBatch, new_seq_cache
from ascend_v4.runtime.config import EngineConfig
from ascend_v4.runtime.engine import Engine
from ascend_v4.runtime.sampling import SamplingParams

K = 3


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(7)
    return [0] + torch.randint(3, 129280, (299,), generator=g).tolist()  # crosses CSA / HCA compression windows


@pytest.fixture(scope="module")
def reference(model, prompt):
    """log-softmax of one full forward over the whole prompt: row p scores token p + 1."""
    b = StepBatch.build([(new_seq_cache(model.args, torch.float32), prompt)])
    return torch.log_softmax(model.logits(model(b)).float(), -1)


def _check(plp, prompt, ref, tol=1e-4):
    assert len(plp) == len(prompt) and plp[0] is None
    for p in range(1, len(prompt)):
        e, row = plp[p], ref[p - 1]
        assert e.token == prompt[p]
        assert abs(e.logprob - float(row[prompt[p]])) < tol, p
        # rank = 1 + tokens more likely; chunked prefill moves logits by ~1e-6, which may reorder near-ties only
        near = int(((row - row[prompt[p]]).abs() < tol).sum()) - 1
        assert abs(e.rank - (int((row > row[prompt[p]]).sum()) + 1)) <= near, p
        want = torch.topk(row, K)
        assert [t for t, _ in e.top] == want.indices.tolist(), p
        assert max(abs(v - w) for (_, v), w in zip(e.top, want.values.tolist())) < tol


def _engine(model, tok, **kw):
    return Engine(model, tok, EngineConfig(**{"max_num_batched_tokens": 4096, **kw}))


@pytest.mark.parametrize("chunk", [4096, 64])
def test_scoring_only_equals_a_full_forward(chunk, model, tok, prompt, reference):
    eng = _engine(model, tok, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    (outs,) = eng.generate([prompt], [SamplingParams(max_tokens=0, prompt_logprobs=K)])
    assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason == "length"
    assert outs[0].new_token_ids == [] and outs[0].completion_tokens == 0
    _check(outs[0].prompt_logprobs, prompt, reference)
    assert eng.blocks.used == 0 or eng.stats()["running"] == 0


def test_prefix_cache_hit_is_recomputed(model, tok, prompt, reference):
    eng = _engine(model, tok, enable_prefix_caching=True, block_size=128)
    eng.generate([prompt], [SamplingParams(max_tokens=1, temperature=0)])  # fills the prefix cache
    (outs,) = eng.generate([prompt], [SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=K)])
    assert outs[0].cached_tokens == 0  # not read from the cache: the prefix's hidden states are needed
    _check(outs[0].prompt_logprobs, prompt, reference)
    (again,) = eng.generate([prompt], [SamplingParams(max_tokens=1, temperature=0)])
    assert again[0].cached_tokens >= 256  # ... and the cache itself still serves later requests
    assert sum(len(o.new_token_ids) for o in outs) == 2
    assert all(o.prompt_logprobs is None for o in outs[1:])  # only in the first output


def test_generation_after_scoring_is_unchanged(model, tok, prompt):
    eng = _engine(model, tok, enable_prefix_caching=False)
    params = dict(max_tokens=4, temperature=0, ignore_eos=True)
    (plain,) = eng.generate([prompt], [SamplingParams(**params)])
    (scored,) = eng.generate([prompt], [SamplingParams(**params, prompt_logprobs=0)])
    assert [t for o in plain for t in o.new_token_ids] == [t for o in scored for t in o.new_token_ids]
    assert scored[0].prompt_logprobs[1].top is None  # 0 alternatives asked


def test_batched_with_other_requests(model, tok, prompt, reference):
    eng = _engine(model, tok, max_num_batched_tokens=128, enable_prefix_caching=False)
    outs = eng.generate([prompt[:50], prompt, prompt[:20]],
                        [SamplingParams(max_tokens=3, temperature=0), SamplingParams(max_tokens=0, prompt_logprobs=K),
                         SamplingParams(max_tokens=0, prompt_logprobs=K)])
    _check(outs[1][0].prompt_logprobs, prompt, reference)
    _check(outs[2][0].prompt_logprobs, prompt[:20], reference)
    assert outs[0][0].prompt_logprobs is None
