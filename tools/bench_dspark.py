"""DSpark speculative decoding against decoding without drafts, measured in one run (issue 15's benchmark).

For each concurrency level C: C requests of --input-len random ids, greedy, --output-len tokens each, through one
engine per mode, the model loaded once:

* ``none``: no drafts (the peer the ratios are against);
* ``dspark``: the checkpoint's DSpark module (a dummy's random weights: the acceptance is what it is, ~0);
* ``oracle``: DSpark with every draft replaced by the target's own greedy continuation (from the ``none`` run):
  every draft token is accepted, the ceiling of the verify path (K+1 tokens per verify step).

Printed per level and mode: output tok/s (output tokens over the wall time, prefill included), the ratio to
``none``, engine steps, tokens per verify step, the share of the wall time spent drafting, the per-position
acceptance and the share of requests whose output
equals ``none``'s (100% with the quant simulation off; with it on, an FP8 round-trip can flip on the fp32 rounding
of a verify chunk and change a random-weight near-tie, docs/dspark.md). Progress goes to stderr.

    python tools/bench_dspark.py --model small-dspark --concurrency 1,16 --output-len 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small-dspark", help="a DSpark preset or checkpoint (default small-dspark)")
    ap.add_argument("--concurrency", default="1,16", help="levels, comma-separated")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--speculative-tokens", type=int, default=0, help="K (0: the checkpoint's block size)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--quant-sim", choices=["on", "off"], default="on")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from ascend_v4 import LLM
    from ascend_v4.runtime import engine as engine_mod
    from ascend_v4.runtime import speculative
    from ascend_v4.runtime.config import EngineConfig
    from ascend_v4.runtime.engine import Engine
    from ascend_v4.runtime.sampling import SamplingParams

    llm = LLM(a.model, quant_sim=a.quant_sim == "on")
    if not llm.args.has_dspark:
        sys.exit(f"--model {a.model}: no DSpark stages in this checkpoint")
    model, tok = llm.model, llm.tokenizer
    sp = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
    refs: dict[tuple, list[int]] = {}

    def oracle(eng, seqs):
        speculative.dspark_propose(eng, seqs)  # the real draft forward runs (and costs) as usual
        for seq in seqs:
            if seq.draft:
                n = len(seq.output_ids)
                seq.draft = list(refs[tuple(seq.prompt_ids)][n:n + len(seq.draft)]) or None

    def run(mode: str, prompts: list[list[int]]) -> dict:
        cfg = EngineConfig(max_num_seqs=len(prompts), max_num_batched_tokens=4096, enable_prefix_caching=False,
                           speculative="none" if mode == "none" else "dspark",
                           speculative_tokens=a.speculative_tokens)
        real = engine_mod.dspark_propose
        engine_mod.dspark_propose = oracle if mode == "oracle" else real
        try:
            e = Engine(model, tok, cfg)
            t0 = time.perf_counter()
            outs = e.generate(prompts, [sp] * len(prompts))
            wall = time.perf_counter() - t0
        finally:
            engine_mod.dspark_propose = real
        toks = [[t for o in os for t in o.new_token_ids] for os in outs]
        st = e.stats()
        return {"tokens": toks, "wall_s": wall, "tok_s": sum(map(len, toks)) / wall, "steps": st["steps"],
                "tokens_per_step": st["spec_tokens_per_step"], "acceptance": st["spec_acceptance_per_position"],
                "draft_s": st["spec_draft_seconds"]}

    g = torch.Generator().manual_seed(0)
    warm = [[0] + torch.randint(3, llm.args.vocab_size, (a.input_len - 1,), generator=g).tolist()]
    for mode in ("none", "dspark"):
        run(mode, warm)
    levels = []
    for c in (int(x) for x in a.concurrency.split(",")):
        prompts = [[0] + torch.randint(3, llm.args.vocab_size, (a.input_len - 1,), generator=g).tolist()
                   for _ in range(c)]
        row = {"concurrency": c}
        for mode in ("none", "dspark", "oracle"):
            print(f"[bench dspark] concurrency {c}: {mode} ...", file=sys.stderr, flush=True)
            r = run(mode, prompts)
            if mode == "none":
                refs.update({tuple(p): t for p, t in zip(prompts, r["tokens"])})
            else:  # equal unless an FP8 round-trip of the quant simulation flips on fp32 rounding (docs/dspark.md)
                r["same_output"] = sum(a == b for a, b in zip(r["tokens"], row["none"]["tokens"])) / c
            row[mode] = r
        levels.append(row)

    k = a.speculative_tokens or llm.args.dspark_block_size
    print(f"bench dspark: {a.model}, {a.input_len} in / {a.output_len} out, greedy, K = {k}, quant-sim {a.quant_sim}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'conc':>4} {'mode':>7} {'tok/s':>8} {'vs none':>8} {'steps':>6} {'tok/verify':>10} {'draft %':>8} "
          f"{'same out':>8}  acceptance per position")
    for row in levels:
        base = row["none"]["tok_s"]
        for mode in ("none", "dspark", "oracle"):
            r = row[mode]
            acc = " ".join(f"{x:.2f}" for x in r["acceptance"]) or "-"
            share, same = r["draft_s"] / r["wall_s"], r.get("same_output", 1.0)
            print(f"{row['concurrency']:>4} {mode:>7} {r['tok_s']:>8.1f} {r['tok_s'] / base:>7.2f}x {r['steps']:>6} "
                  f"{r['tokens_per_step']:>10.2f} {share:>8.0%} {same:>8.0%}  {acc}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "k": k, "levels": [{**row, **{m: {kk: v for kk, v in row[m].items()
                                                                        if kk != "tokens"}
                                                                    for m in ("none", "dspark", "oracle")}}
                                                         for row in levels]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
