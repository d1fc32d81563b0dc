"""DSpark speculative decoding in the engine (issue 15) on the `tiny-dspark` dummy checkpoint (official 0731
layout, random weights): drafting never changes the output (greedy, and seeded sampling under the per-position
generator coupling), oracle drafts are all accepted (K+1 tokens a step), a rejection at any draft position keeps
exactly the accepted prefix, and the partial rollback leaves the cache as a run that never saw the rejected tokens.
"""

from __future__ import annotations

import pytest
import torch

from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
from ascend_v4.model.cache import StepBatch, mark, new_seq_cache
from ascend_v4.model.layers import ModelOptions
from ascend_v4.model.load import load_model
from ascend_v4.runtime import engine as engine_mod
from ascend_v4.runtime import speculative
from ascend_v4.runtime.config import EngineConfig
from ascend_v4.runtime.engine import Engine
from ascend_v4.runtime.sampling import SamplingParams

K = 5  # tiny-dspark's dspark_block_size: the default draft length


def prompts(*lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(3, 129280, (n - 1,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def ckpt():
    return ensure_dummy_checkpoint("tiny-dspark")


@pytest.fixture(scope="module", params=[True, False], ids=["sim-on", "sim-off"])
def ds_both(request, ckpt):
    return load_model(ckpt, ModelOptions(dtype=torch.float32, quant_sim=request.param, dequantize_weights=True))


@pytest.fixture(scope="module")
def ds(ckpt):
    """Quantisation simulation off: a verify chunk's rows then match one-token decodes to fp32 rounding. With it
    on, the FP8 activation round-trips turn that rounding into logit changes of up to ~0.3 (measured: the same
    position decoded in a 6-token chunk alone vs beside another sequence), so a random-weight near-tie can
    break differently, with or without drafts; the sim-on comparisons below use prompts without such ties."""
    return load_model(ckpt, ModelOptions(dtype=torch.float32, quant_sim=False, dequantize_weights=True))


def run(model, tok, cfg, phases, params):
    """Run each phase's prompts to completion on one engine (later phases can hit the prefix cache)."""
    e = Engine(model, tok, cfg)
    toks = []
    for ps in phases:
        outs = e.generate(ps, [params] * len(ps))
        toks += [[t for o in os for t in o.new_token_ids] for os in outs]
    return toks, e


def mixed_phases():
    """A mixed batch (short, chunked long prompts), then prompts sharing 2 cache blocks of an earlier one."""
    first = prompts(3, 45, 140, 300, seed=1)
    tails = prompts(20, 7, seed=2)
    return [first, [first[3][:256] + tails[0], first[3][:260] + tails[1]]]


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_greedy_output_is_the_same_with_dspark(ds_both, tok, kv):
    ds = ds_both
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    cfg = dict(max_num_batched_tokens=64, kv_cache_dtype=kv, cache_gib=0.05)
    ref, _ = run(ds, tok, EngineConfig(**cfg), mixed_phases(), greedy)
    got, e = run(ds, tok, EngineConfig(speculative="dspark", **cfg), mixed_phases(), greedy)
    assert got == ref
    st = e.stats()
    assert st["spec_proposed"] > 0 and st["prefix_hit_tokens"] >= 256 and st["blocks_used"] == 0
    assert len(st["spec_acceptance_per_position"]) == K


def test_seeded_sampling_is_the_same_with_dspark(ds_both, tok):
    """Each output position draws from its own generator (seed, position): the draws of rows that verification
    discards do not move later ones, so the sampled tokens equal those of decoding without drafts."""
    sp = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    ds = ds_both
    ref, _ = run(ds, tok, EngineConfig(max_num_batched_tokens=64), mixed_phases()[:1], sp)
    got, e = run(ds, tok, EngineConfig(max_num_batched_tokens=64, speculative="dspark"), mixed_phases()[:1], sp)
    assert got == ref and e.stats()["spec_verify_steps"] > 0


def _oracle(monkeypatch, refs: dict, wrong_at: int | None = None):
    """Replace every DSpark draft by the target's own greedy continuation (from `refs`: prompt tuple -> tokens),
    optionally with a wrong token at position `wrong_at`."""

    def propose(eng, seqs):
        speculative.dspark_propose(eng, seqs)  # the real draft forward runs (and is timed) as usual
        for seq in seqs:
            if seq.draft:
                n = len(seq.output_ids)
                d = list(refs[tuple(seq.prompt_ids)][n:n + len(seq.draft)])
                if wrong_at is not None and wrong_at < len(d):
                    d[wrong_at] = (d[wrong_at] + 1) % 129280
                seq.draft = d or None
    monkeypatch.setattr(engine_mod, "dspark_propose", propose)


def test_oracle_drafts_are_all_accepted(ds, tok, monkeypatch):
    ps = prompts(40, 130, seed=3)
    greedy = SamplingParams(max_tokens=1 + 2 * (K + 1), temperature=0, ignore_eos=True)
    ref, _ = run(ds, tok, EngineConfig(), [ps], greedy)
    _oracle(monkeypatch, {tuple(p): r for p, r in zip(ps, ref)})
    e = Engine(ds, tok, EngineConfig(speculative="dspark"))
    outs = e.generate(ps, [greedy] * len(ps))
    assert [[t for o in os for t in o.new_token_ids] for os in outs] == ref
    assert [[len(o.new_token_ids) for o in os] for os in outs] == [[1, K + 1, K + 1]] * 2
    st = e.stats()
    assert st["spec_accepted"] == st["spec_proposed"] == 2 * 2 * K
    assert st["spec_tokens_per_step"] == K + 1 and st["spec_acceptance_per_position"] == [1.0] * K


@pytest.mark.parametrize("j", range(K))
def test_rejection_at_each_position_keeps_the_accepted_prefix(ds, tok, monkeypatch, j):
    ps = prompts(61, 126, seed=4)  # decode steps cross ratio-4 and ratio-128 window ends inside the chains
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ref, _ = run(ds, tok, EngineConfig(), [ps], greedy)
    _oracle(monkeypatch, {tuple(p): r for p, r in zip(ps, ref)}, wrong_at=j)
    e = Engine(ds, tok, EngineConfig(speculative="dspark"))
    outs = e.generate(ps, [greedy] * len(ps))
    assert [[t for o in os for t in o.new_token_ids] for os in outs] == ref
    per_step = [len(o.new_token_ids) for o in outs[0]]
    assert set(per_step[1:-1]) == {j + 1}  # j accepted drafts plus the target's own token, every step
    acc = e.stats()["spec_acceptance_per_position"]
    assert acc[:j] == [1.0] * j and acc[j] == 0.0


def _state(c):
    """Everything a cache holds for its next step: length, run-slot rows of the open windows, stored A-halves,
    visible compressed entries and indexer keys."""
    pool, out = c.pool, {"len": c.length}
    for lid, run_ in enumerate(pool.run):
        m = pool.ratios[lid]
        if run_ is None:
            continue
        k = c.length % m
        rows = [(c.length - k + j) % m for j in range(k)]
        for name, (kv, sc, pkv, psc) in run_.items():
            out[(lid, name)] = [kv[c.run_slot, rows], sc[c.run_slot, rows]] + \
                ([pkv[c.run_slot], psc[c.run_slot]] if pkv is not None else [])
        epb = pool.block_size // m
        er = torch.tensor([c.comp_blocks[w // epb] * epb + w % epb for w in range(c.length // m)], dtype=torch.long)
        out[(lid, "entries")] = [pool.kv[lid][pool.comp_base(lid) + er]] + \
            ([pool.ikeys[lid][er]] if pool.ikeys[lid] is not None else [])
    return out


@pytest.mark.parametrize("start", [125, 127, 253])
def test_truncate_step_equals_a_cache_that_never_saw_the_rejected_tokens(ds, start):
    """A 6-token step (anchor + 5 drafts) crossing ratio-4 and ratio-128 window ends, cut to each kept length: the
    cache equals one fed only the kept tokens (to fp32 rounding of the projections, which a different number of
    rows can change), and both continue identically."""
    ids = prompts(start + 12, seed=5)[0]
    for keep in range(7):
        a, b = (new_seq_cache(ds.args, torch.float32) for _ in range(2))
        for c in (a, b):
            sb = StepBatch.build([(c, ids[:start])])
            ds(sb)
            sb.commit()
        m = mark(a, 6)
        sb = StepBatch.build([(a, ids[start:start + 6])])
        sb.memo["record_rows"] = torch.arange(6)
        ds(sb)
        sb.commit()
        ds.truncate_step(sb, {0: (m, keep)})
        if keep:
            sb = StepBatch.build([(b, ids[start:start + keep])])
            ds(sb)
            sb.commit()
        sa, sb_ = _state(a), _state(b)
        assert sa.keys() == sb_.keys() and sa["len"] == sb_["len"] == start + keep
        for key in sa:
            if key != "len":
                for x, y in zip(sa[key], sb_[key], strict=True):
                    torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=1e-5, msg=f"keep {keep}: {key}")
        nxt = ids[start + keep:start + keep + 3]
        la, lb = (ds.logits(ds(StepBatch.build([(c, nxt)]))) for c in (a, b))
        torch.testing.assert_close(la, lb, rtol=0, atol=1e-4)


def test_adaptive_draft_length_cuts_at_low_confidence(ds, tok):
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ps = mixed_phases()[0][:2]
    ref, _ = run(ds, tok, EngineConfig(), [ps], greedy)
    fixed, ef = run(ds, tok, EngineConfig(speculative="dspark"), [ps], greedy)
    cut, ec = run(ds, tok, EngineConfig(speculative="dspark", speculative_threshold=0.5), [ps], greedy)
    assert fixed == cut == ref
    assert ec.stats()["spec_proposed"] < ef.stats()["spec_proposed"]


def test_speculative_settings_are_checked(model, ds, tok):
    with pytest.raises(ValueError, match="carries no DSPARK weights.*it has: mtp"):
        Engine(model, tok, EngineConfig(speculative="dspark"))
    with pytest.raises(ValueError, match="carries no MTP weights.*it has: dspark"):
        Engine(ds, tok, EngineConfig(speculative="mtp"))
    with pytest.raises(ValueError, match="speculative must be one of none, mtp, dspark"):
        EngineConfig(speculative="eagle")
    with pytest.raises(ValueError, match="speculative_threshold"):
        EngineConfig(speculative="dspark", speculative_threshold=1.5)
    e = Engine(ds, tok, EngineConfig(speculative="dspark", speculative_tokens=7))
    assert e.spec_tokens == 7


# -- requests that end, are penalised, constrained or scored inside a chain ------------------------------------
def _same_with_oracle(ds, tok, monkeypatch, ps, params, cfg=None):
    """Output without drafts, then with DSpark whose drafts are that output (all accepted): equal."""
    cfg = dict(cfg or {})
    plain = Engine(ds, tok, EngineConfig(**cfg)).generate(ps, [params] * len(ps))
    ref = [[t for o in os for t in o.new_token_ids] for os in plain]
    _oracle(monkeypatch, {tuple(p): r for p, r in zip(ps, ref)})
    e = Engine(ds, tok, EngineConfig(speculative="dspark", **cfg))
    outs = e.generate(ps, [params] * len(ps))
    assert [[t for o in os for t in o.new_token_ids] for os in outs] == ref
    return plain, outs, e


def test_a_stop_token_inside_an_accepted_chain_ends_the_request_there(ds, tok, monkeypatch):
    ps = prompts(30, seed=7)
    free = Engine(ds, tok, EngineConfig()).generate(ps, [SamplingParams(max_tokens=14, temperature=0,
                                                                        ignore_eos=True)])
    ref = [t for o in free[0] for t in o.new_token_ids]
    stop = next(t for i, t in enumerate(ref) if i >= 3 and t not in ref[:i])  # first occurs mid-chain
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    plain, outs, e = _same_with_oracle(ds, tok, monkeypatch, ps, params)
    assert outs[0][-1].finish_reason == "stop" and outs[0][-1].stop_reason == stop
    assert [t for o in outs[0] for t in o.new_token_ids][-1] == stop and e.blocks.used == 0


def test_penalties_and_min_tokens_see_the_draft_tokens_before_each_row(ds, tok, monkeypatch):
    params = SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3, presence_penalty=0.5,
                            frequency_penalty=0.3, min_tokens=6, logprobs=1)
    plain, outs, _ = _same_with_oracle(ds, tok, monkeypatch, prompts(20, 50, seed=8), params)
    lp = [[round(s.logprob, 4) for o in os for s in o.logprobs] for os in outs]
    assert lp == [[round(s.logprob, 4) for o in os for s in o.logprobs] for os in plain]


def test_prompt_logprobs_and_a_small_step_budget(ds, tok, monkeypatch):
    """Prompt log-probs are the same with drafts; a step budget smaller than the chains cuts them (drafts count
    against max_num_batched_tokens)."""
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=1)
    plain, outs, e = _same_with_oracle(ds, tok, monkeypatch, prompts(20, 33, seed=9), params,
                                       cfg=dict(max_num_batched_tokens=8))
    assert [[None if x is None else round(x.logprob, 4) for x in os[0].prompt_logprobs] for os in outs] == \
        [[None if x is None else round(x.logprob, 4) for x in os[0].prompt_logprobs] for os in plain]
    reached = e.stats()["spec_position_reached"]  # 2 x (1 + K) > 8 tokens: the second chain of a step is cut
    assert reached[K - 1] < reached[0]


def test_structured_output_with_dspark(ds, tok, monkeypatch):
    """Under a grammar a chain is cut before its first disallowed token and every verify row gets its own mask:
    the output is valid JSON and the same as without drafts. Random drafts are nearly always outside the grammar
    (cut to nothing); to verify chains, a draft is replaced by the grammar's forced tokens when there are some
    (`{"a": "` is forced by this schema)."""
    import json

    from ascend_v4.runtime.structured import GrammarSpec
    from ascend_v4.server.structured import json_grammar

    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"],
              "additionalProperties": False}
    params = SamplingParams(max_tokens=64, temperature=0, grammar=GrammarSpec(json_grammar(schema)))
    ps = prompts(12, seed=10)
    plain = Engine(ds, tok, EngineConfig()).generate(ps, [params])

    def propose(eng, seqs):
        speculative.dspark_propose(eng, seqs)
        for seq in seqs:
            ff = seq.matcher.m.compute_ff_tokens() if seq.matcher is not None and not seq.finished else []
            if ff and len(seq.output_ids) + len(ff) < params.max_tokens:
                seq.draft = ff[:K]
    monkeypatch.setattr(engine_mod, "dspark_propose", propose)
    e = Engine(ds, tok, EngineConfig(speculative="dspark"))
    outs = e.generate(ps, [params])
    got = [t for o in outs[0] for t in o.new_token_ids]
    assert got == [t for o in plain[0] for t in o.new_token_ids]
    assert outs[0][-1].finish_reason == "stop" and "a" in json.loads(tok.decode(got[:-1]))
    st = e.stats()
    assert st["spec_accepted"] >= 2 and len(st["spec_acceptance_per_position"]) >= 2  # chains of 2+ verified


def test_two_sequences_cut_to_different_lengths_in_one_step(ds):
    """truncate_step over a batch of two sequences on one pool, cut to 2 and 5 of 6 tokens: each cache equals
    one fed only its kept tokens."""
    from ascend_v4.model.cache import CachePool, SeqCache
    from ascend_v4.runtime.block_manager import BlockManager

    ids = prompts(140, 140, seed=11)
    starts, keeps = (125, 62), (2, 5)

    def caches():
        pool = CachePool(ds.args, 128, 64, 16, torch.float32, num_run_slots=4)
        bm = BlockManager.for_pool(pool)
        return [SeqCache(pool, bm) for _ in ids]

    a, b = caches(), caches()
    for cs in (a, b):
        sb = StepBatch.build([(c, i[:s]) for c, i, s in zip(cs, ids, starts)])
        ds(sb)
        sb.commit()
    marks = [mark(c, 6) for c in a]
    sb = StepBatch.build([(c, i[s:s + 6]) for c, i, s in zip(a, ids, starts)])
    sb.memo["record_rows"] = torch.arange(12)
    ds(sb)
    sb.commit()
    ds.truncate_step(sb, {0: (marks[0], keeps[0]), 1: (marks[1], keeps[1])})
    sb = StepBatch.build([(c, i[s:s + k]) for c, i, s, k in zip(b, ids, starts, keeps)])
    ds(sb)
    sb.commit()
    for ca, cb in zip(a, b):
        sa, sb_ = _state(ca), _state(cb)
        assert sa.keys() == sb_.keys() and sa["len"] == sb_["len"]
        for key in sa:
            if key != "len":
                for x, y in zip(sa[key], sb_[key], strict=True):
                    torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=1e-5, msg=str(key))
    with pytest.raises(ValueError, match="were not recorded"):
        c = new_seq_cache(ds.args, torch.float32)
        m = mark(c, 3)
        sb = StepBatch.build([(c, ids[0][:3])])
        ds(sb)
        sb.commit()
        ds.truncate_step(sb, {0: (m, 1)})


# -- sampled drafts: speculative sampling against the draft's own distribution ----------------------------------
def test_speculative_sampling_keeps_the_target_distribution():
    """verify_sampled on a 5-token vocabulary, 10,000 chains with sampled 2-token drafts: the first emitted token
    is distributed as the target's p_0 (std of each frequency at most 0.005; bound 0.025), and a chain that
    accepts d_0 continues as p_1 (about 3,000 such chains: std at most 0.009; bound 0.045)."""
    from ascend_v4.runtime.sampling import SampleRow, position_generator
    from ascend_v4.runtime.speculative import verify_sampled

    params = SamplingParams(temperature=1.0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.0, 1.5, -0.5, 1.0, 0.2], [1.0, 0.0, 0.0, 0.0, 2.0]])
    q = torch.tensor([[0.1, 0.2, 0.5, 0.1, 0.1], [0.3, 0.1, 0.1, 0.4, 0.1]])
    p = torch.softmax(logits, -1)
    n, first, second = 10000, torch.zeros(5), torch.zeros(5)
    for t in range(n):
        base = torch.Generator().manual_seed(t)
        g = torch.Generator().manual_seed(10 ** 6 + t)
        d = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        rows = [SampleRow(params, position_generator(base, j), [], [], None, None, None) for j in range(3)]
        out = verify_sampled(logits, rows, d, q)
        first[out[0].token] += 1
        if out[0].token == d[0] and out[1].token >= 0:
            second[out[1].token] += 1
        assert all(o.token == -1 for o in out[[o.token for o in out].index(-1):]) if -1 in [o.token for o in out] \
            else len(out) == 3
    assert (first / n - p[0]).abs().max() < 0.025
    # given d_0 was accepted, the next token is a sample of p_1 whatever d_0 was (the rows here ignore the prefix)
    assert (second / second.sum() - p[1]).abs().max() < 0.045


def test_sampled_drafts_in_the_engine(ds, tok, monkeypatch):
    """speculative_draft_sampling='sample': sampled requests' chains go through verify_sampled (counted), greedy
    requests keep greedy drafts (same tokens as without drafts), every request ends with its max_tokens."""
    calls = []
    real = speculative.verify_sampled

    def counting(*a):
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(speculative, "verify_sampled", counting)
    ps = prompts(30, 70, seed=12)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    hot = SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True)
    ref = Engine(ds, tok, EngineConfig()).generate([ps[0]], [greedy])
    e = Engine(ds, tok, EngineConfig(speculative="dspark", speculative_draft_sampling="sample"))
    outs = e.generate(ps, [greedy, hot])
    assert [t for o in outs[0] for t in o.new_token_ids] == [t for o in ref[0] for t in o.new_token_ids]
    assert [sum(len(o.new_token_ids) for o in os) for os in outs] == [10, 10]
    assert calls and e.stats()["spec_verify_steps"] > len(calls) and e.blocks.used == 0
    with pytest.raises(ValueError, match="speculative_draft_sampling"):
        EngineConfig(speculative_draft_sampling="typical")
