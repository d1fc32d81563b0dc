"""Child process of `ascend-v4 bench offline`: loads ONE engine, runs one concurrency level, writes JSON.

    python -m ascend_v4.bench.offline_worker SPEC.json RESULT.json

One engine per process so that the peak RSS it reports (`getrusage(RUSAGE_SELF).ru_maxrss`) is that
engine's alone: model weights, caches and allocator high-water mark, nothing of the other engine. The parent
(`offline.py`) writes SPEC (engine, checkpoint path, prompts, output lengths, ...) and reads RESULT.

Both engines do an untimed warm-up pass first (same prompt shapes, few tokens) so one-off costs (lazy
initialisation, allocator growth, first-call dispatch) stay out of the timed pass.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

# Warm-up output tokens: enough for a prefill and a couple of batched decode steps.
WARMUP_TOKENS = 3
# Token budget of one engine step (chunked prefill), as in the docs/perf.md runs of the former tool.
STEP_TOKENS = 4096


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _check_counts(engine: str, got: list[int], want: list[int]) -> None:
    bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    if bad:
        i, g, w = bad[0]
        raise RuntimeError(f"{engine}: request {i} produced {g} tokens, expected {w} ({len(bad)} requests off)")


def run_ours(spec: dict) -> dict:
    """ascend-v4's engine: every request submitted at once, at most `concurrency` decoded together.

    Loaded through the public `LLM`, then driven with `Engine.add_request` / `step` (as `ascend-v4 serve`
    does) because per-request finish times and the prefix cache are only visible at that level.
    """
    from ascend_v4 import LLM, SamplingParams
    from ascend_v4.runtime.config import EngineConfig

    n = len(spec["prompts"])
    npus = spec.get("npus", 1)
    t_load = time.perf_counter()
    if npus > 1:  # the level is the total: each DP group admits its share
        from ascend_v4.runtime.layout import resolve_tp

        tp = resolve_tp(npus, spec.get("tp"), spec.get("dp")) or 1
        per_group = -(-spec["concurrency"] // (npus // tp))
    else:
        per_group = spec["concurrency"]
    cfg = EngineConfig(max_num_seqs=per_group, max_num_batched_tokens=STEP_TOKENS, max_queue=n,
                       enable_prefix_caching=spec["prefix_caching"],
                       speculative_threshold=spec.get("speculative_threshold", 0.0),
                       speculative_draft_sampling=spec.get("speculative_draft_sampling", "greedy"))
    llm = LLM(spec["model"], quant_sim=spec["quant_sim"], npus=npus, tp=spec.get("tp"), dp=spec.get("dp"),
              engine_config=cfg, speculative=spec.get("speculative", "none"),
              speculative_tokens=spec.get("speculative_tokens", 0))
    load_s = time.perf_counter() - t_load
    # One engine for warm-up and timed pass: with a shared prefix, the warm-up leaves it in the prefix cache
    # like a long-lived system prompt (the warm-up prompts share nothing else with the timed ones).
    engine = llm.engine

    def one_pass(tag: str, prompts: list[list[int]], lens: list[int]) -> dict:
        for i, (p, k) in enumerate(zip(prompts, lens)):
            engine.add_request(f"{tag}{i}", p, SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True))
        counts, ends, cached = [0] * len(prompts), [0.0] * len(prompts), 0
        t0 = time.perf_counter()
        while engine.has_unfinished():
            for o in engine.step():
                i = int(o.request_id[len(tag):])
                counts[i] += len(o.new_token_ids)
                if o.finished:
                    if o.finish_reason not in ("length", "stop"):
                        raise RuntimeError(f"ours: request {i} ended with finish_reason={o.finish_reason!r}")
                    ends[i] = time.perf_counter() - t0
                    cached += o.cached_tokens
        wall = time.perf_counter() - t0
        _check_counts("ours", counts, lens)
        return {"wall_s": wall, "latencies_s": ends, "output_tokens": sum(counts), "computed_tokens": sum(counts),
                "cached_prompt_tokens": cached}

    try:
        from ascend_v4.runtime.speculative import spec_report

        one_pass("warmup-", spec["warmup_prompts"], [min(WARMUP_TOKENS, k) for k in spec["output_lens"]])
        before = engine.stats()
        timed = one_pass("req-", spec["prompts"], spec["output_lens"])
        return {"load_s": load_s, "layout": llm.layout.as_dict(), **timed,
                "speculative": spec_report(llm.speculative,
                                                  _timed_counts(before, engine.stats()))}
    finally:
        llm.shutdown()


def _timed_counts(before: dict, after: dict) -> dict:
    """The speculative counters of the timed pass alone (the warm-up's subtracted), ratios recomputed."""
    from ascend_v4.runtime.speculative import spec_ratios

    out = {k: after.get(k, 0) - before.get(k, 0)
           for k in ("spec_proposed", "spec_accepted", "spec_verify_steps", "spec_draft_seconds")}
    for k in ("spec_position_reached", "spec_position_accepted"):
        a, b = after.get(k, []), before.get(k, [])
        out[k] = [x - (b[j] if j < len(b) else 0) for j, x in enumerate(a)]
    return spec_ratios(out)


def run_transformers(spec: dict) -> dict:
    """transformers' batched `generate`, `concurrency` requests per call (waves run one after another).

    A batched generate runs every row until the longest row is done and returns them all together, so each
    request's latency is the end of its wave, and only the requested tokens count as output.
    """
    import torch

    from ascend_v4.peers.transformers_v4 import load_transformers_model

    t_load = time.perf_counter()
    model = load_transformers_model(spec["model"], torch.float32)
    load_s = time.perf_counter() - t_load
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0  # equal lengths: unused
    c = spec["concurrency"]

    @torch.no_grad()
    def generate(prompts: list[list[int]], new_tokens: int) -> None:
        ids = torch.tensor(prompts, dtype=torch.long)  # equal lengths by construction: no padding
        # eos_token_id=None as a kwarg overrides generation_config (see peers/transformers_v4.py), so every
        # row generates exactly `new_tokens`; sampling knobs set to None silence greedy-mode warnings.
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=pad, use_cache=True,
                             temperature=None, top_p=None, top_k=None)
        if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
            raise RuntimeError(f"transformers: generate returned shape {tuple(out.shape)}, expected "
                               f"{(ids.shape[0], ids.shape[1] + new_tokens)}")

    generate(spec["warmup_prompts"][:c], min(WARMUP_TOKENS, max(spec["output_lens"])))
    prompts, lens = spec["prompts"], spec["output_lens"]
    latencies, computed = [0.0] * len(prompts), 0
    t0 = time.perf_counter()
    for start in range(0, len(prompts), c):
        wave = range(start, min(start + c, len(prompts)))
        longest = max(lens[i] for i in wave)
        generate([prompts[i] for i in wave], longest)
        computed += len(wave) * longest
        done = time.perf_counter() - t0
        for i in wave:
            latencies[i] = done
    wall = time.perf_counter() - t0
    return {"load_s": load_s, "wall_s": wall, "latencies_s": latencies, "output_tokens": sum(lens),
            "computed_tokens": computed, "cached_prompt_tokens": 0}


RUNNERS = {"ours": run_ours, "transformers": run_transformers}


def main(argv: list[str] | None = None) -> int:
    """Entry point: read the spec, run the engine it names, write the result (see module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m ascend_v4.bench.offline_worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    if spec["engine"] not in RUNNERS:
        raise ValueError(f"spec engine {spec['engine']!r} is not one of {sorted(RUNNERS)}")
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    res = RUNNERS[spec["engine"]](spec)
    import torch

    res |= {"engine": spec["engine"], "threads": torch.get_num_threads(), "peak_rss_bytes": peak_rss_bytes()}
    Path(argv[1]).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
