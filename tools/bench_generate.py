#!/usr/bin/env python3
"""Prefill and decode throughput of ascend-v4 vs transformers' DeepseekV4ForCausalLM on the same checkpoint,
in the same process and run, printed as ratios (issue: decode >= 3x transformers at batch 1).

    python tools/bench_generate.py                       # small preset dummy, batch 1 and 8
    python tools/bench_generate.py --model DIR --prompt-len 512 --new-tokens 32 --batch 1 --batch 8

Method: both engines get identical prompts (random ids, equal lengths so no padding), greedy decoding,
EOS ignored, the same torch thread count. Prefill = one forward over the prompts (caches filled, logits of
the last position); decode = time of the remaining new tokens after the first, tokens/s summed over the
batch. Each figure is the median of --repeat runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_ours(ckpt, prompts, new_tokens, repeat, quant_sim):
    from ascend_v4.model.cache import StepBatch, new_seq_cache
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model
    from ascend_v4.runtime.generate import generate_ids
    from ascend_v4.runtime.sampling import SamplingParams

    model = load_model(ckpt, ModelOptions(dtype=torch.float32, quant_sim=quant_sim, dequantize_weights=True))

    def prefill():
        caches = [new_seq_cache(model.args, torch.float32) for _ in prompts]
        b = StepBatch.build(list(zip(caches, prompts)))
        x = model(b)
        last = torch.tensor([s.offset + s.n - 1 for s in b.seqs])
        model.logits(x[last])

    sp = [SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)] * len(prompts)
    decode_runs = []

    def gen():
        decode_runs.append(generate_ids(model, prompts, sp)[0].decode_s)

    t_prefill = _median_time(prefill, repeat)
    _median_time(gen, repeat)
    return t_prefill, statistics.median(decode_runs[1:])


def bench_transformers(ckpt, prompts, new_tokens, repeat):
    from ascend_v4.peers.transformers_v4 import load_transformers_model

    model = load_transformers_model(ckpt, torch.float32)
    ids = torch.tensor(prompts)

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    def gen(n):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=0)

    t_prefill = _median_time(prefill, repeat)
    # decode time = generate(n) - generate(1): the same prefill + first token is inside both
    t_n = _median_time(lambda: gen(new_tokens), repeat)
    t_1 = _median_time(lambda: gen(1), repeat)
    return t_prefill, max(t_n - t_1, 1e-9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="preset (dummy made on the fly) or checkpoint directory")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    ap.add_argument("--no-quant-sim", action="store_true", help="run ours without the FP8/FP4 simulation")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from ascend_v4.checkpoint.resolve import resolve_model

    ckpt = resolve_model(a.model, progress=True).path
    g = torch.Generator().manual_seed(0)
    rows = []
    for bsz in a.batch or [1, 8]:
        prompts = [[0] + torch.randint(3, 129280, (a.prompt_len - 1,), generator=g).tolist() for _ in range(bsz)]
        op, od = bench_ours(ckpt, prompts, a.new_tokens, a.repeat, not a.no_quant_sim)
        tp, td = bench_transformers(ckpt, prompts, a.new_tokens, a.repeat)
        ntok_p, ntok_d = bsz * a.prompt_len, bsz * (a.new_tokens - 1)
        rows.append({"batch": bsz, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                     "ours_prefill_tok_s": ntok_p / op, "hf_prefill_tok_s": ntok_p / tp,
                     "prefill_ratio": tp / op, "ours_decode_tok_s": ntok_d / od,
                     "hf_decode_tok_s": ntok_d / td, "decode_ratio": td / od})
    if a.json:
        print(json.dumps({"model": str(ckpt), "threads": torch.get_num_threads(),
                          "quant_sim": not a.no_quant_sim, "rows": rows}))
        return 0
    print(f"model {ckpt}  threads {torch.get_num_threads()}  ours quant_sim={not a.no_quant_sim}  "
          f"prompt {a.prompt_len}  new {a.new_tokens}")
    print(f"{'batch':>5} {'prefill ours':>13} {'prefill hf':>11} {'ratio':>6} {'decode ours':>12} "
          f"{'decode hf':>10} {'ratio':>6}   (tok/s)")
    for r in rows:
        print(f"{r['batch']:>5} {r['ours_prefill_tok_s']:>13.1f} {r['hf_prefill_tok_s']:>11.1f} "
              f"{r['prefill_ratio']:>5.2f}x {r['ours_decode_tok_s']:>12.1f} {r['hf_decode_tok_s']:>10.1f} "
              f"{r['decode_ratio']:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
