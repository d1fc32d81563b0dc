"""Batched sampling (`sample_batch`) gives every row what the one-row sampler (`sample`) gives it."""

from __future__ import annotations

import torch

from ascend_v4.runtime.sampling import SampleRow, SamplingParams, sample, sample_batch


def test_batched_rows_equal_one_row_sampling():
    g = torch.Generator().manual_seed(0)
    V = 1000
    logits = torch.randn(8, V, generator=g) * 3
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1  # a tie: both samplers take the lower id
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0, logprobs=5),
              SamplingParams(temperature=0.8, seed=11, logprobs=2), SamplingParams(temperature=0, repetition_penalty=1.3),
              SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5]), SamplingParams(top_k=1, logprobs=3)]
    prompts, outputs = [[1, 2, 3]] * 8, [[4, 5]] * 8
    banned = [None] * 6 + [[5], None]

    def rows():
        return [SampleRow(p, p.make_generator(), pr, o, b) for p, pr, o, b in zip(params, prompts, outputs, banned)]
    got = sample_batch(logits, rows())
    want = [sample(logits[i], r.params, r.gen, prompt=r.prompt, output=r.output, banned=r.banned)
            for i, r in enumerate(rows())]
    assert got == want
    assert got[3].token == 7 and got[0].logprob is None and got[1].top is None and len(got[3].top) == 5
    assert [r.plain_greedy for r in rows()] == [True, True, True, True, False, False, False, True]


def _list_rebuild(logits, p, prompt, output):
    """The penalties written out from the id lists (the engine's former per-step rebuild), as the golden."""
    x = logits.clone()
    if output and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(output).unique(return_counts=True)
        x[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(x.dtype)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        v = x[seen]
        x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    return x


def test_incremental_penalty_state_equals_the_list_rebuild():
    """PenaltyState (synced token by token, plus a draft's extra token) and apply_penalties give the very logits
    the list rebuild computes from the prompt and output lists."""
    from ascend_v4.runtime.sampling import PenaltyState, apply_penalties

    g = torch.Generator().manual_seed(1)
    V = 500
    prompt = torch.randint(0, V, (40,), generator=g).tolist()
    output = torch.randint(0, V, (30,), generator=g).tolist() + [prompt[3], prompt[3]]
    p = SamplingParams(presence_penalty=0.7, frequency_penalty=0.3, repetition_penalty=1.4)
    st = PenaltyState(prompt, V, "cpu")
    for n in (0, 5, 6, 32):  # output grows between steps
        st.sync(output[:n])
        logits = torch.randn(V, generator=g) * 4
        want = _list_rebuild(logits, p, prompt, output[:n])
        assert torch.equal(st.apply(logits, p), want)
        assert torch.equal(apply_penalties(logits, p, prompt, output[:n]), want)
        assert torch.equal(st.apply(logits, p, [7]), _list_rebuild(logits, p, prompt, output[:n] + [7]))
