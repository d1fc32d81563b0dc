"""Engine behaviour on the tiny dummy: continuous batching, chunked prefill, preemption, prefix caching, abort,
sampling options and the async front. The greedy reference never touches the engine or a reused cache: it
runs a full forward over the whole sequence for every new token."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ascend_v4.model.cache import StepBatch, new_seq_cache
from ascend_v4.runtime.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from ascend_v4.runtime.config import EngineConfig
from ascend_v4.runtime import speculative
from ascend_v4.runtime.engine import Engine, RequestError
from ascend_v4.runtime.sampling import SamplingParams, apply_penalties, sample

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def prompts(*lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(3, 129280, (n - 1,), generator=g).tolist() for n in lens]


def naive_greedy(model, ids, n):
    ids, out = list(ids), []
    for _ in range(n):
        b = StepBatch.build([(new_seq_cache(model.args, torch.float32), ids)])
        t = int(model.logits(model(b)[-1:])[0].argmax())
        out.append(t)
        ids.append(t)
    return out


@pytest.fixture(scope="module")
def ps_ref(model):
    ps = prompts(3, 45, 140, 201)
    return ps, [naive_greedy(model, p, GREEDY.max_tokens) for p in ps]


def run(engine, ps, params=GREEDY):
    outs = engine.generate(ps, [params] * len(ps))
    return [[t for o in os for t in o.new_token_ids] for os in outs], outs


def test_batched_chunked_prefill_equals_naive_greedy(model, tok, ps_ref):
    ps, ref = ps_ref
    e = Engine(model, tok, EngineConfig(max_num_batched_tokens=48, max_num_seqs=3))
    got, _ = run(e, ps)
    assert got == ref
    assert e.stats()["steps"] > 10 and e.stats()["blocks_used"] == 0


def test_preempted_and_resumed_equals_uninterrupted(model, tok):
    # The prompts fill all 1+1+1+2 = 5 compressed-cache blocks (128 tokens each) at admission; the 128-token
    # prompt's first generated token then needs a sixth, so the scheduler must preempt (and later recompute).
    ps = prompts(16, 48, 128, 160, seed=9)
    e = Engine(model, tok, EngineConfig(max_num_batched_tokens=4096, num_blocks=5, enable_prefix_caching=False))
    got, _ = run(e, ps)
    assert e.stats()["preemptions"] > 0 and e.blocks.used == 0
    assert got == [naive_greedy(model, p, GREEDY.max_tokens) for p in ps]


def test_prefix_cache_hit_equals_cold_and_counts_cached_tokens(model, tok):
    base = prompts(300, seed=3)[0]
    e = Engine(model, tok, EngineConfig())
    run(e, [base])
    # base's two whole prompt blocks are cached with their block-end compressor state; no slot stays held
    st = e.stats()
    assert st["state_blocks_cached"] == 2 and st["state_blocks_used"] == 0 and st["comp_blocks_cached"] >= 2
    short = base[:140] + [5, 6, 7]  # a short prompt sharing one whole block (128 tokens) with base
    longer = base[:290] + [9, 9]  # shares base's two blocks
    got, outs = run(e, [short])
    assert outs[0][-1].cached_tokens == 128
    assert got[0] == naive_greedy(model, short, GREEDY.max_tokens)
    got, outs = run(e, [longer])
    assert outs[0][-1].cached_tokens == 256
    assert got[0] == naive_greedy(model, longer, GREEDY.max_tokens)
    assert e.stats()["prefix_hit_rate"] > 0
    # a request that finishes in its prefill step (max_tokens=1) still leaves its blocks cached
    one = prompts(200, seed=8)[0]
    run(e, [one], SamplingParams(max_tokens=1, temperature=0))
    assert run(e, [one], SamplingParams(max_tokens=1, temperature=0))[1][0][-1].cached_tokens == 128
    cold = Engine(model, tok, EngineConfig(enable_prefix_caching=False))
    assert run(cold, [longer])[1][0][-1].cached_tokens == 0


def test_prefix_hit_shares_blocks_without_copies(model, tok):
    """Two live requests with a common prefix hold the same physical comp blocks (reference count 2)."""
    base = prompts(260, seed=4)[0]
    e = Engine(model, tok, EngineConfig())
    run(e, [base])
    a, b = base[:200] + [7], base[:210] + [8, 8]
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    e.add_request("a", a, p)
    e.add_request("b", b, p)
    e.step()
    ca, cb = e.seqs["a"].cache, e.seqs["b"].cache
    assert ca.comp_blocks[0] == cb.comp_blocks[0] and ca.comp_blocks[1] != cb.comp_blocks[1]
    assert e.blocks.pools["comp"].ref[ca.comp_blocks[0]] == 2
    while e.has_unfinished():
        e.step()
    assert e.blocks.used == 0  # everything released; base's blocks stay cached (parked), not held
    assert e.stats()["comp_blocks_cached"] >= 2


def test_prefix_hit_after_window_blocks_were_evicted_falls_back_to_shallower_block(model, tok):
    """A hit needs the window rows before the boundary; when those were evicted the lookup resumes at the
    deepest boundary whose window rows are still cached (or computes from scratch), never wrong."""
    base = prompts(400, seed=5)[0]
    e = Engine(model, tok, EngineConfig(prefix_cache_gib=0.0, max_num_seqs=1, max_num_batched_tokens=512))
    run(e, [base])
    # An unrelated 900-token prompt goes through the small window pool (7 blocks: no prefix-cache reserve)
    # and evicts base's parked window blocks; base's comp blocks stay cached (the comp pool is large).
    other = prompts(900, seed=6)[0]
    run(e, [other])
    assert e.stats()["comp_blocks_cached"] >= 3 + 7
    q = base[:300] + [3]
    got, outs = run(e, [q])
    assert outs[0][-1].cached_tokens == 0  # comp blocks alone are not enough to resume
    assert got[0] == naive_greedy(model, q, GREEDY.max_tokens)
    q2 = other[:800]  # other's last window blocks are still parked: resumes at 768
    got, outs = run(e, [q2])
    assert outs[0][-1].cached_tokens == 768
    assert got[0] == naive_greedy(model, q2, GREEDY.max_tokens)


def test_abort_frees_blocks_at_once(model, tok):
    e = Engine(model, tok, EngineConfig())
    e.add_request("a", prompts(100)[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    e.add_request("b", prompts(30)[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    e.step()
    e.step()
    assert e.blocks.used > 0
    out = e.abort("a")
    assert out.finished and out.finish_reason == "abort"
    e.abort("b")
    assert e.blocks.used == 0 and not e.has_unfinished()
    assert e.abort("missing") is None


def test_seeded_sampling_reproducible_regardless_of_batch(model, tok):
    sp = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    p = prompts(20, seed=5)[0]
    alone, _ = run(Engine(model, tok), [p], sp)
    mixed, _ = run(Engine(model, tok), [prompts(60, seed=6)[0], p], sp)
    assert alone[0] == mixed[1]


def test_stop_string_cuts_text_exactly(model, tok):
    p = prompts(25, seed=7)[0]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    toks, outs = run(Engine(model, tok), [p], sp)
    full = "".join(o.new_text for o in outs[0])
    piece = tok.decode(toks[0][3:5])
    assert piece and piece in full
    stop = piece.strip() or piece
    cut = full.find(stop)
    _, outs = run(Engine(model, tok), [p], SamplingParams(max_tokens=8, temperature=0, stop=[stop]))
    last = outs[0][-1]
    assert last.finish_reason == "stop" and last.stop_reason == stop
    assert "".join(o.new_text for o in outs[0]) == full[:cut]


def test_penalty_semantics():
    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])
    g = torch.Generator()
    assert sample(logits, SamplingParams(temperature=0), g).token == 0
    # presence: -p once per generated token; frequency: -f per occurrence (token 0 generated twice)
    x = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [], [0, 0, 3])
    assert torch.allclose(x, torch.tensor([2.0 - 0.5 - 0.5, 1.9, -1.0, 0.5 - 0.5 - 0.25]))
    assert sample(logits, SamplingParams(temperature=0, presence_penalty=0.5), g, output=[0]).token == 1
    # repetition: positive logits divided, negative multiplied, for tokens of prompt or output
    x = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), [2], [0])
    assert torch.allclose(x, torch.tensor([1.0, 1.9, -2.0, 0.5]))
    # banned ids (EOS before min_tokens) are never picked
    assert sample(logits, SamplingParams(temperature=0), g, banned=[0]).token == 1


def test_logprobs(model, tok):
    p = prompts(30, seed=8)[0]
    _, outs = run(Engine(model, tok), [p], SamplingParams(max_tokens=3, temperature=0, logprobs=4))
    for o in outs[0]:
        lp = o.logprobs[0]
        assert lp.logprob <= 0 and len(lp.top) == 4
        assert lp.top[0][0] == lp.token  # greedy: the chosen token is the most likely one
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_request_validation(model, tok):
    e = Engine(model, tok, EngineConfig(max_model_len=64))
    with pytest.raises(RequestError, match="maximum context length is 64"):
        e.add_request("x", [1] * 80, GREEDY)
    with pytest.raises(RequestError, match="empty"):
        e.add_request("y", [], GREEDY)
    e.add_request("z", [1, 2], GREEDY)
    with pytest.raises(RequestError, match="already in use"):
        e.add_request("z", [1, 2], GREEDY)


def test_async_engine_streams_abort_backpressure_and_failure(model, tok, ps_ref):
    ps, ref = ps_ref

    async def main():
        ae = AsyncEngine(Engine(model, tok, EngineConfig(max_num_seqs=2, max_queue=2)))

        async def collect_with(p, sp):
            return [t async for o in ae.generate(p, sp) for t in o.new_token_ids]

        async def collect(p):
            return await collect_with(p, GREEDY)
        assert await asyncio.gather(*(collect(p) for p in ps)) == ref
        # a consumer leaving early aborts its request; its blocks are free right after
        agen = ae.generate(ps[2], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
        async for _ in agen:
            break
        await agen.aclose()
        for _ in range(50):
            if ae.stats()["blocks_used"] == 0 and ae.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert ae.stats()["blocks_used"] == 0 and ae.stats()["aborted"] == 1
        # backpressure: max_num_seqs + max_queue = 4 in flight at most
        slow = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        tasks = [asyncio.create_task(collect_with(p, slow)) for p in [ps[0]] * 4]
        for _ in range(100):
            if ae.in_flight == 4:
                break
            await asyncio.sleep(0.02)
        assert ae.in_flight == 4 and ae.stats()["running"] <= 2
        with pytest.raises(QueueFullError):
            await ae.generate(ps[0], slow).__anext__()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # a failing step kills the engine: open streams and new requests get EngineDeadError, health says so
        orig = model.forward
        model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))
        try:
            with pytest.raises(EngineDeadError, match="device lost"):
                async for _ in ae.generate(ps[1], GREEDY):
                    pass
        finally:
            model.forward = orig
        h = ae.health()
        assert not h["healthy"] and "device lost" in h["reason"]
        with pytest.raises(EngineDeadError):
            ae.check_ready()
        await ae.shutdown(drain=False)

    asyncio.run(main())


def test_mtp_speculative_decoding_keeps_greedy_output(model, tok, ps_ref):
    """Random MTP weights: drafts are (almost) always rejected, exercising the cache rollback."""
    ps, ref = ps_ref
    e = Engine(model, tok, EngineConfig(max_num_batched_tokens=48, speculative_mtp=True))
    got, _ = run(e, ps)
    assert got == ref
    st = e.stats()
    assert st["spec_proposed"] > 0 and 0 <= st["spec_accepted"] <= st["spec_proposed"]
    assert st["blocks_used"] == 0


def test_mtp_accepted_drafts_emit_two_tokens_per_step(model, tok, monkeypatch):
    """Oracle drafts (the true greedy next token): every draft is accepted, 2 tokens per decode step."""
    p = prompts(40, seed=12)[0]
    ref = naive_greedy(model, p, 9)
    e = Engine(model, tok, EngineConfig(speculative_mtp=True))
    from ascend_v4.runtime import engine as engine_mod

    def oracle(eng, x, kept):
        speculative.mtp_propose(eng, x, kept)  # keeps the MTP cache filled as usual
        for c, _ in kept:
            if c.seq.draft is not None:
                c.seq.draft = [ref[len(c.seq.output_ids)]]
    monkeypatch.setattr(engine_mod, "mtp_propose", oracle)
    toks, outs = run(e, [p], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))
    assert toks[0] == ref
    st = e.stats()
    assert st["spec_proposed"] == st["spec_accepted"] == 4
    assert [len(o.new_token_ids) for o in outs[0]] == [1, 2, 2, 2, 2]


def test_fp8_cache_engine_prefix_hit_equals_cold_and_uses_fewer_bytes(model, tok):
    base = prompts(280, seed=12)[0]
    q = base[:200] + [4, 4]
    e8 = Engine(model, tok, EngineConfig(kv_cache_dtype="fp8", cache_gib=0.05))
    assert e8.pool.kv[0].dtype == torch.uint8
    run(e8, [base])
    got, outs = run(e8, [q])
    assert outs[0][-1].cached_tokens == 128
    cold = Engine(model, tok, EngineConfig(kv_cache_dtype="fp8", cache_gib=0.05, enable_prefix_caching=False))
    assert run(cold, [q])[0] == got
    native = Engine(model, tok, EngineConfig(cache_gib=0.05))
    assert e8.pool.block_bytes("comp") < native.pool.block_bytes("comp")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4")
