#!/usr/bin/env python3
"""Cost of constrained decoding (structured outputs) per decode step (issue 14: the grammar mask must stay
under 10% of a CPU decode step, or overlap with the forward pass).

    python tools/bench_structured.py                        # small preset dummy, 16 sequences, 24 steps
    python tools/bench_structured.py --preset tiny --seqs 16 --steps 16
    python tools/bench_structured.py --engines-only          # llguidance vs xgrammar mask cost, no model

Engine runs: the same 16 prompts decoded greedily with and without a JSON-schema grammar whose strings are
unbounded (so every step is masked; EOS ignored when unconstrained), interleaved `rounds` times. Reported:
median decode step time of both, the mask computation per step (`Engine.mask_seconds`, on a thread
beside the forward pass), and the mask application (bitmask unpack + masked_fill, in the sampling path).

Engine comparison: per-token mask time of llguidance and (if importable) xgrammar for 16 matchers walking
the same JSON text with the V4 tokenizer, plus grammar compile time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"},
                                           "tags": {"type": "array", "items": {"type": "string"}},
                                           "score": {"type": "number"}}, "required": ["title", "tags", "score"]}
SAMPLE = ('{"title": "A fairly long title with several words in it, 42 and more", '
          '"tags": ["alpha", "beta", "gamma"], "score": 3.25}')


def bench_engines(seqs: int) -> dict:
    import llguidance as llg
    import llguidance.torch as llt

    from ascend_v4.tokenizer import Tokenizer
    tok = Tokenizer.default()
    ids = tok.encode(SAMPLE)
    out = {"tokens_walked": len(ids)}
    t = time.perf_counter()
    lt = llg.LLTokenizer(tok._tk.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_id)
    out["llg_tokenizer_s"] = time.perf_counter() - t
    grammar = "start: %json " + json.dumps(SCHEMA)
    t = time.perf_counter()
    base = llg.LLMatcher(lt, grammar)
    out["llg_compile_ms"] = (time.perf_counter() - t) * 1e3
    ms = [base.deep_copy() for _ in range(seqs)]
    ex = llg.LLExecutor()
    mask = llt.allocate_token_bitmask(seqs, tok.vocab_size)
    per, ser = [], []
    for tid in ids:
        t = time.perf_counter()
        llt.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(ms)], mask)
        per.append(time.perf_counter() - t)
        t = time.perf_counter()
        llt.fill_next_token_bitmask(ms[0], mask, 0)
        ser.append(time.perf_counter() - t)
        assert (int(mask[0, tid // 32]) >> (tid % 32)) & 1, "llguidance rejected a valid token"
        for m in ms:
            m.consume_token(tid)
    out["llg_batch_mask_ms_mean"] = statistics.mean(per) * 1e3
    out["llg_batch_mask_ms_max"] = max(per) * 1e3
    out["llg_one_mask_ms_mean"] = statistics.mean(ser) * 1e3
    try:
        import xgrammar as xgr
    except ImportError as e:
        out["xgrammar"] = f"not importable: {e}"
        return out
    t = time.perf_counter()
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok._tk)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size, stop_token_ids=[tok.eos_id])
    comp = xgr.GrammarCompiler(info)
    out["xgr_tokenizer_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cg = comp.compile_json_schema(json.dumps(SCHEMA))
    out["xgr_compile_ms"] = (time.perf_counter() - t) * 1e3
    xms = [xgr.GrammarMatcher(cg) for _ in range(seqs)]
    bm = xgr.allocate_token_bitmask(seqs, info.vocab_size)
    per, bad = [], 0
    for tid in ids:
        t = time.perf_counter()
        for i, m in enumerate(xms):
            m.fill_next_token_bitmask(bm, i)
        per.append(time.perf_counter() - t)
        bad += not (int(bm[0, tid // 32]) >> (tid % 32)) & 1
        for m in xms:
            m.accept_token(tid)
    out["xgr_batch_mask_ms_mean"] = statistics.mean(per) * 1e3
    out["xgr_batch_mask_ms_max"] = max(per) * 1e3
    out["xgr_rejected_valid_tokens"] = bad
    return out


def bench_engine(preset: str, seqs: int, steps: int, prompt_len: int, rounds: int = 2) -> dict:
    from ascend_v4.runtime.config import EngineConfig
    from ascend_v4.runtime.engine import Engine
    from ascend_v4.runtime.sampling import SamplingParams
    from ascend_v4.runtime.structured import GrammarSpec, apply_mask, unpack_mask

    from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model
    from ascend_v4.tokenizer import Tokenizer

    tok = Tokenizer.default()
    model = load_model(ensure_dummy_checkpoint(preset), ModelOptions(dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(0)
    prompts = [[0] + torch.randint(3, 120000, (prompt_len - 1,), generator=g).tolist() for _ in range(seqs)]
    grammar = GrammarSpec("start: %json " + json.dumps(SCHEMA))

    def run(spec):
        e = Engine(model, tok, EngineConfig(max_num_seqs=seqs, enable_prefix_caching=False))
        for i, p in enumerate(prompts):
            e.add_request(f"r{i}", p, SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=spec is None,
                                                     grammar=spec))
        e.step()  # prefill (all prompts fit one step)
        times = []
        while e.has_unfinished():
            live.append(len(e.scheduler.running))
            t = time.perf_counter()
            e.step()
            times.append(time.perf_counter() - t)
        return times, e
    live: list[int] = []
    run(None)  # warm-up
    plain, masked = [], []
    for _ in range(rounds):  # interleaved, so that load changes on a shared host hit both alike
        live.clear()
        plain += run(None)[0]
        live_plain = statistics.mean(live)
        live.clear()
        t, e = run(grammar)
        masked += t
        live_masked = statistics.mean(live)
    words = e.grammar_compiler().mask_words()
    bits = torch.full((seqs, words), -1, dtype=torch.int32)  # one row per sequence (no drafts)
    logits = torch.randn(seqs, model.args.vocab_size)
    t = time.perf_counter()
    for _ in range(10):
        a = unpack_mask(bits, model.args.vocab_size, logits.device)
        for i in range(seqs):
            apply_mask(logits[i], a[i])
    apply_s = (time.perf_counter() - t) / 10
    step_plain, step_masked = statistics.median(plain), statistics.median(masked)
    mask_s = e.mask_seconds / max(1, len(masked) // rounds)  # the last grammar run's engine
    wait_s = e.mask_wait_seconds / max(1, len(masked) // rounds)
    return {"preset": preset, "seqs": seqs, "decode_steps": len(masked), "threads": torch.get_num_threads(),
            "live_seqs_plain": live_plain, "live_seqs_grammar": live_masked,
            "step_ms_plain": step_plain * 1e3, "step_ms_grammar": step_masked * 1e3,
            "mask_compute_ms_per_step": mask_s * 1e3, "mask_wait_ms_per_step": wait_s * 1e3,
            "mask_apply_ms_per_step": apply_s * 1e3,
            "mask_compute_pct_of_plain_step": 100 * mask_s / step_plain,
            "mask_apply_pct_of_plain_step": 100 * apply_s / step_plain,
            "overhead_pct": 100 * (step_masked - step_plain) / step_plain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--engines-only", action="store_true")
    a = ap.parse_args()
    print(json.dumps({"engines": bench_engines(a.seqs)}, indent=1), flush=True)
    if not a.engines_only:
        print(json.dumps({"engine": bench_engine(a.preset, a.seqs, a.steps, a.prompt_len)}, indent=1))


if __name__ == "__main__":
    main()
