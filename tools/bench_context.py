#!/usr/bin/env python3
"""How decode cost and cache size grow with context on a V4 model (default: the `small` preset dummy).

One sequence is prefilled in chunks up to each context length in turn (1K, 2K, ... --max-context); at
each length the script times single-token decode steps (median of --steps, the cache restored after each
so the context stays fixed) and measures the sequence's cache bytes, next to:
  * the V4 formula (model-spec.md §10): window ring (fixed) + compressed KV + indexer keys per token,
  * a plain KV cache of the same layers keeping every token's 512-d latent (what V4's compression avoids).

    python tools/bench_context.py --max-context 32768 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--max-context", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens per forward)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                    help="window rows and compressed entries in fp32 (auto, on CPU) or 584-byte FP8 entries")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from ascend_v4.checkpoint.resolve import resolve_model
    from ascend_v4.model.cache import StepBatch, mark, new_seq_cache, rollback
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model import kv_layout
    from ascend_v4.model.load import load_model

    ckpt = resolve_model(a.model, progress=True).path
    model = load_model(ckpt, ModelOptions(dtype=torch.float32, quant_sim=True, dequantize_weights=True))
    args = model.args
    esize = 4  # fp32 cache entries on CPU
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab_size, (a.max_context + a.steps,), generator=g).tolist()
    cache = new_seq_cache(args, torch.float32, kv_format=a.kv_cache_dtype)
    cache.state_upto = 0  # as in the engine, where block-end state slots are prefix-cache entries, not per sequence
    main_layers = args.n_layers
    rows, done, ctx = [], 0, 1024
    t_prefill = 0.0
    while ctx <= a.max_context:
        while done < ctx:  # extend the prefill to `ctx`
            n = min(a.chunk, ctx - done)
            t = time.perf_counter()
            b = StepBatch.build([(cache, ids[done:done + n])])
            model.logits(model(b)[-1:])
            b.commit()
            t_prefill += time.perf_counter() - t
            done += n
        times = []
        for i in range(a.steps):
            m = mark(cache)  # decode at a fixed context: undo the step afterwards
            t = time.perf_counter()
            b = StepBatch.build([(cache, [ids[ctx + i]])])
            model.logits(model(b))
            times.append(time.perf_counter() - t)
            rollback(cache, m)
        measured = cache.nbytes(range(main_layers))
        fmt = cache.pool.format  # the pool's own entry sizes (kv_layout: the memory model plan uses)
        formula = (kv_layout.window_ring_bytes(args, fmt) * main_layers // (main_layers + args.n_draft_layers)
                   + kv_layout.kv_bytes_per_token(args, fmt) * ctx)
        plain = main_layers * ctx * args.head_dim * esize
        rows.append({"context": ctx, "decode_ms": 1e3 * statistics.median(times), "cache_bytes": measured,
                     "formula_bytes": formula, "plain_kv_bytes": plain, "prefill_tok_s": done / t_prefill})
        print(f"[bench_context] context {ctx}: decode {rows[-1]['decode_ms']:.1f} ms, cache "
              f"{measured / (1 << 20):.2f} MiB, prefill {rows[-1]['prefill_tok_s']:.0f} tok/s", file=sys.stderr,
              flush=True)
        ctx *= 2
    if a.json:
        print(json.dumps({"model": str(ckpt), "threads": torch.get_num_threads(), "kv_cache_dtype": a.kv_cache_dtype,
                          "entry_bytes": cache.pool.entry_bytes, "rows": rows}))
        return 0
    print(f"model {ckpt}  threads {torch.get_num_threads()}  cache entries: {a.kv_cache_dtype} "
          f"({cache.pool.entry_bytes} B per window row / compressed entry)")
    print(f"{'context':>8} {'decode ms':>10} {'cache MiB':>10} {'formula MiB':>12} {'plain KV MiB':>13} "
          f"{'plain/V4':>9}")
    for r in rows:
        mib = 1 << 20
        print(f"{r['context']:>8} {r['decode_ms']:>10.1f} {r['cache_bytes'] / mib:>10.2f} "
              f"{r['formula_bytes'] / mib:>12.2f} {r['plain_kv_bytes'] / mib:>13.2f} "
              f"{r['plain_kv_bytes'] / r['cache_bytes']:>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
