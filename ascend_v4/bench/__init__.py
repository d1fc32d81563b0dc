"""Benchmarks that ship with the package; the `ascend-v4 bench ...` commands are thin wrappers around them.

* `offline`: throughput and latency of offline generation vs the number of concurrent requests, ours against
  transformers' batched `generate` on the same checkpoint (`offline.py`; one subprocess per engine and
  concurrency level runs `offline_worker.py`; prompts and output lengths come from `workload.py`).
* `serve`: a running OpenAI-compatible server measured like `vllm bench serve` does (TTFT, TPOT, ITL, E2EL,
  throughput; `serve.py`, needs httpx2 from the `server` extra when a run starts).

Modules here import torch and the model lazily, inside functions, so `ascend-v4 --help` stays instant.
"""
