"""`bench serve`: measure a running OpenAI-compatible server like `vllm bench serve` does (the logic of
`ascend-v4 bench serve`; the click options live in `ascend_v4/cli/bench.py`).

`--num-prompts` streamed requests of random token ids (`input_len` tokens, exact on /v1/completions) with a
fixed output length (`ignore_eos: true`, `max_tokens = output_len`), at most `concurrency` at a time
(optionally paced by a Poisson `request_rate`). Metrics follow serving-notes §7.1: TTFT (send -> first
streamed token, queueing included), TPOT ((E2EL - TTFT) / (output tokens - 1)), ITL (gaps between streamed
chunks, pooled), E2EL, and request / output / total token throughput. Output token counts come from the
server's usage report. httpx2 (the `server` extra) is imported when a run starts.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

# Random prompt ids avoid the special / reserved range (model-spec §11: 0-2 and >= 128000).
_FIRST_ID, _LAST_ID = 100, 128000


@dataclass
class BenchServeConfig:
    url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first model of GET /v1/models
    concurrency: int = 1
    input_len: int = 128
    output_len: int = 128
    num_prompts: int = 32
    request_rate: float = float("inf")
    seed: int = 0
    api_key: str | None = None
    percentiles: tuple[int, ...] = (50, 90, 99)
    timeout_s: float = 600.0
    ignore_eos: bool = True


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(_FIRST_ID, _LAST_ID) for _ in range(length)] for _ in range(n)]


def _headers(cfg: BenchServeConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def _payload(cfg: BenchServeConfig, model: str, prompt_ids: list[int], prompt_text: str) -> dict:
    body: dict = {"model": model, "max_tokens": cfg.output_len, "stream": True, "temperature": 0.0,
                  "stream_options": {"include_usage": True}, "ignore_eos": cfg.ignore_eos}
    if cfg.endpoint.endswith("/chat/completions"):
        # Raw text in a user turn: thinking off so the whole output is content; length is approximate.
        body |= {"messages": [{"role": "user", "content": prompt_text}], "thinking": {"type": "disabled"}}
    else:
        body["prompt"] = prompt_ids
    return body


async def _one(client, cfg: BenchServeConfig, body: dict, prompt_len: int) -> RequestResult:
    res = RequestResult(prompt_len=prompt_len)
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", cfg.url.rstrip("/") + cfg.endpoint, json=body, headers=_headers(cfg)) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"].get("message", msg["error"]))
                    return res
                if msg.get("usage"):
                    res.output_tokens = msg["usage"].get("completion_tokens", 0)
                    res.prompt_len = msg["usage"].get("prompt_tokens", prompt_len)
                got = any(c.get("text") or (c.get("delta") or {}).get("content")
                          or (c.get("delta") or {}).get("reasoning_content") for c in msg.get("choices", []))
                if got:
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last, chunks = now, chunks + 1
        res.latency = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.success = chunks > 0
        if not res.success:
            res.error = "no tokens streamed"
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"
    return res


def _stats(name: str, values_s: list[float], percentiles: tuple[int, ...]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values_s) or [0.0]
    out = {f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms),
           f"std_{name}_ms": statistics.pstdev(ms)}
    for p in percentiles:
        # linear interpolation between closest ranks (numpy's default percentile method)
        k = (len(ms) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(ms) - 1)
        out[f"p{p}_{name}_ms"] = ms[lo] + (ms[hi] - ms[lo]) * (k - lo)
    return out


def summarize(cfg: BenchServeConfig, model: str, results: list[RequestResult], duration: float) -> dict:
    """vLLM-named metrics of a finished run (serving-notes §7.1)."""
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "endpoint": cfg.endpoint, "model_id": model, "url": cfg.url,
        "num_prompts": cfg.num_prompts, "request_rate": cfg.request_rate if cfg.request_rate != float("inf") else "inf",
        "max_concurrency": cfg.concurrency, "input_len": cfg.input_len, "output_len": cfg.output_len,
        "ignore_eos": cfg.ignore_eos,
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
    }
    out |= _stats("ttft", [r.ttft for r in ok], cfg.percentiles)
    out |= _stats("tpot", tpots, cfg.percentiles)
    out |= _stats("itl", [g for r in ok for g in r.itl], cfg.percentiles)
    out |= _stats("e2el", [r.latency for r in ok], cfg.percentiles)
    out["errors"] = [r.error for r in results if not r.success][:10]
    return out


async def _run(cfg: BenchServeConfig) -> dict:
    import httpx2

    timeout = httpx2.Timeout(cfg.timeout_s, connect=30.0)
    limits = httpx2.Limits(max_connections=cfg.concurrency + 4, max_keepalive_connections=cfg.concurrency + 4)
    async with httpx2.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        model = cfg.model
        if model is None:
            r = await client.get(cfg.url.rstrip("/") + "/v1/models", headers=_headers(cfg))
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        prompts = random_prompts(cfg.num_prompts, cfg.input_len, cfg.seed)
        texts = [""] * len(prompts)
        if cfg.endpoint.endswith("/chat/completions"):
            texts = [(await client.post(cfg.url.rstrip("/") + "/detokenize", json={"tokens": p},
                                        headers=_headers(cfg))).json()["prompt"] for p in prompts]
        sem = asyncio.Semaphore(cfg.concurrency)
        rng = random.Random(cfg.seed + 1)

        async def limited(i: int) -> RequestResult:
            async with sem:
                return await _one(client, cfg, _payload(cfg, model, prompts[i], texts[i]), cfg.input_len)

        start = time.perf_counter()
        tasks = []
        for i in range(len(prompts)):
            tasks.append(asyncio.create_task(limited(i)))
            if cfg.request_rate != float("inf") and i + 1 < len(prompts):
                await asyncio.sleep(rng.expovariate(cfg.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(cfg, model, results, duration)


def run_bench_serve(cfg: BenchServeConfig) -> dict:
    """Run the benchmark against a live server and return its metrics (vLLM names, milliseconds)."""
    if cfg.concurrency < 1 or cfg.num_prompts < 1 or cfg.input_len < 1 or cfg.output_len < 1:
        raise ValueError("concurrency, num-prompts, input-len and output-len must be >= 1")
    return asyncio.run(_run(cfg))


def format_result(m: dict, percentiles: tuple[int, ...] = (50, 90, 99)) -> str:
    """Human-readable table in the layout of `vllm bench serve`."""
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]

    def row(label: str, value) -> None:
        lines.append(f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value:<10}")

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Maximum request concurrency:", m["max_concurrency"])
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    for key, title, short in (("ttft", "Time to First Token", "TTFT"),
                              ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL")):
        lines.append("{s:{c}^{n}}".format(s=title, n=w, c="-"))
        row(f"Mean {short} (ms):", m[f"mean_{key}_ms"])
        row(f"Median {short} (ms):", m[f"median_{key}_ms"])
        for p in percentiles:
            row(f"P{p} {short} (ms):", m[f"p{p}_{key}_ms"])
    lines.append("=" * w)
    if m.get("errors"):
        lines.append("first errors: " + "; ".join(m["errors"][:3]))
    return "\n".join(lines)


__all__ = ["BenchServeConfig", "RequestResult", "format_result", "random_prompts", "run_bench_serve", "summarize"]
