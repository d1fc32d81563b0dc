#!/usr/bin/env python3
"""Offline throughput and latency vs concurrency: ascend-v4's engine (continuous batching) against
transformers' batched `generate` on the same checkpoint, same prompts, same run.

    python tools/bench_offline.py --concurrency 1 --concurrency 4 --concurrency 16

For each concurrency C: C requests of --input-len random tokens each generate exactly --output-len tokens
(EOS ignored, greedy). Ours: all C submitted to one `Engine`; transformers: one `generate` call on the batch
(equal lengths, so no padding). Reported: output tokens/s, mean request latency, and the process's peak RSS
(each engine runs in its own subprocess so its memory is its own).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _prompts(c, n, vocab=129280, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for _ in range(c)]


def run_ours(ckpt, c, inp, out):
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model
    from ascend_v4.runtime.config import EngineConfig
    from ascend_v4.runtime.engine import Engine
    from ascend_v4.runtime.sampling import SamplingParams
    from ascend_v4.tokenizer import Tokenizer

    model = load_model(ckpt, ModelOptions(dtype=torch.float32, quant_sim=True, dequantize_weights=True))
    tok = Tokenizer.default()
    sp = SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)

    def once():
        e = Engine(model, tok, EngineConfig(max_num_seqs=max(c, 1), max_num_batched_tokens=4096,
                                            enable_prefix_caching=False))
        t0 = time.perf_counter()
        ends = {}
        for i, p in enumerate(_prompts(c, inp)):
            e.add_request(str(i), p, sp)
        while e.has_unfinished():
            for o in e.step():
                if o.finished:
                    ends[o.request_id] = time.perf_counter() - t0
        return time.perf_counter() - t0, sum(ends.values()) / len(ends)

    once()  # warm-up
    return once()


def run_hf(ckpt, c, inp, out):
    from ascend_v4.peers.transformers_v4 import load_transformers_model

    model = load_transformers_model(ckpt, torch.float32)
    ids = torch.tensor(_prompts(c, inp))

    def once():
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=out,
                           min_new_tokens=out, do_sample=False, eos_token_id=None, pad_token_id=0)
        t = time.perf_counter() - t0
        return t, t  # a batched generate returns every request at the end

    once()
    return once()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--concurrency", type=int, action="append")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from ascend_v4.checkpoint.resolve import resolve_model

    ckpt = resolve_model(a.model, progress=not a.worker).path
    if a.worker:  # child: one engine, one concurrency
        wall, lat = (run_ours if a.worker == "ours" else run_hf)(ckpt, a.concurrency[0], a.input_len,
                                                                a.output_len)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"wall_s": wall, "mean_latency_s": lat, "peak_rss": rss}))
        return 0
    rows = []
    for c in a.concurrency or [1, 4, 16]:
        res = {}
        for w in ("ours", "hf"):
            cmd = [sys.executable, __file__, "--worker", w, "--model", str(ckpt), "--concurrency", str(c),
                   "--input-len", str(a.input_len), "--output-len", str(a.output_len)]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            p = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res[w] = json.loads(p.stdout.strip().splitlines()[-1])
        toks = c * a.output_len
        rows.append({"concurrency": c, "ours_tok_s": toks / res["ours"]["wall_s"],
                     "hf_tok_s": toks / res["hf"]["wall_s"], "ratio": res["hf"]["wall_s"] / res["ours"]["wall_s"],
                     "ours_latency_s": res["ours"]["mean_latency_s"], "hf_latency_s": res["hf"]["mean_latency_s"],
                     "ours_peak_rss_mib": res["ours"]["peak_rss"] / 2**20,
                     "hf_peak_rss_mib": res["hf"]["peak_rss"] / 2**20})
    if a.json:
        print(json.dumps({"model": str(ckpt), "input_len": a.input_len, "output_len": a.output_len, "rows": rows}))
        return 0
    print(f"model {ckpt}  input {a.input_len}  output {a.output_len}  (output tok/s incl. prefill)")
    print(f"{'conc':>4} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'ours lat s':>11} {'hf lat s':>9} "
          f"{'ours RSS MiB':>13} {'hf RSS MiB':>11}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['ours_tok_s']:>11.1f} {r['hf_tok_s']:>9.1f} {r['ratio']:>5.2f}x "
              f"{r['ours_latency_s']:>11.2f} {r['hf_latency_s']:>9.2f} {r['ours_peak_rss_mib']:>13.0f} "
              f"{r['hf_peak_rss_mib']:>11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
