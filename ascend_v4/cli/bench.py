"""`ascend-v4 bench`: benchmarks. `bench serve` measures a running server like `vllm bench serve` does;
`bench offline` compares the engine with transformers' batched generate (logic in `ascend_v4/bench/offline.py`).

The group is open for more subcommands: keep the benchmark itself in `ascend_v4/bench/` (or its own module)
and only the click options here, or write the command in its own module and attach it in
`ascend_v4/cli/__init__.py` with `bench.add_command(cmd)`.

`bench serve` sends `--num-prompts` streamed requests of random token ids (`--input-len` tokens, exact on
/v1/completions) with a fixed output length (`ignore_eos: true`, `max_tokens = --output-len`), at most
`--concurrency` at a time (optionally paced by a Poisson `--request-rate`). Metrics follow serving-notes §7.1:
TTFT (send -> first streamed token, queueing included), TPOT ((E2EL - TTFT) / (output tokens - 1)), ITL
(gaps between streamed chunks, pooled), E2EL, and request / output / total token throughput. Output token
counts come from the server's usage report.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import click

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


@click.group("bench")
def bench() -> None:
    """Benchmarks.

    \b
    Examples:
      ascend-v4 bench serve --url http://127.0.0.1:8000 --concurrency 8 --input-len 512 --output-len 128 \\
          --num-prompts 64
      ascend-v4 bench offline --model small --concurrency 1,4,16 --json bench.json
    """


@bench.command("serve")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Base URL of a running server.")
@click.option("--endpoint", type=click.Choice(["/v1/completions", "/v1/chat/completions"]),
              default="/v1/completions", show_default=True,
              help="completions sends exact token-id prompts; chat sends their text (length approximate).")
@click.option("--model", default=None, help="Model name to request. Default: the server's first model.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(min=1),
              help="Requests in flight at most (vLLM's --max-concurrency).")
@click.option("--input-len", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--output-len", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--num-prompts", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--request-rate", default=float("inf"), show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Poisson arrival rate (requests/s); inf sends all at once (bounded by --concurrency).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--api-key", default=None, help="Sent as Authorization: Bearer.")
@click.option("--no-ignore-eos", is_flag=True, help="Let requests stop at EOS (output length then varies).")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(min=1), help="Per request, s.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def bench_serve(url, endpoint, model, concurrency, input_len, output_len, num_prompts, request_rate, seed, api_key,
                no_ignore_eos, timeout, as_json):
    """Benchmark a running server: TTFT, TPOT, ITL, E2E latency and throughput (vLLM's metric names)."""
    try:
        import httpx2  # noqa: F401
    except ImportError as e:
        raise click.ClickException(f"bench serve needs the `server` extra: pip install 'ascend-v4[server]' ({e})") \
            from None
    cfg = BenchServeConfig(url=url, endpoint=endpoint, model=model, concurrency=concurrency, input_len=input_len,
                           output_len=output_len, num_prompts=num_prompts, request_rate=request_rate, seed=seed,
                           api_key=api_key, timeout_s=timeout, ignore_eos=not no_ignore_eos)
    try:
        m = run_bench_serve(cfg)
    except Exception as e:  # noqa: BLE001 - connection refused, bad URL, ...
        raise click.ClickException(f"benchmark failed: {type(e).__name__}: {e}") from e
    click.echo(json.dumps(m, indent=2) if as_json else format_result(m, cfg.percentiles))
    if m["completed"] == 0:
        raise SystemExit(1)


def _parse_levels(ctx, param, values: tuple[str, ...]) -> tuple[int, ...]:
    """`--concurrency 1,4,16` and `--concurrency 1 --concurrency 4` (the former tool's form) alike."""
    levels = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            try:
                n = int(part)
            except ValueError:
                raise click.BadParameter(f"expected comma-separated integers >= 1, got {v!r}") from None
            if n < 1:
                raise click.BadParameter(f"levels must be >= 1, got {n} in {v!r}")
            levels.append(n)
    return tuple(levels)


@bench.command("offline")
@click.option("--model", default="small", show_default=True,
              help="Preset, checkpoint directory or HF repo id in the local cache. tiny/small have no real "
                   "weights: a dummy checkpoint of the preset is written once into the ascend-v4 cache.")
@click.option("--concurrency", multiple=True, default=("1,4,16",), show_default=True, callback=_parse_levels,
              help="Concurrency levels, comma-separated (or repeat the option). Each level runs every engine "
                   "in a fresh process.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=None,
              help="Requests per level. Default: the level itself (one full batch). More than the level "
                   "shows queueing: ours refills freed slots at once, transformers runs batch after batch.")
@click.option("--input-len", default=128, show_default=True, type=click.IntRange(min=1),
              help="Prompt length in tokens (BOS + random ordinary ids), the same for every request.")
@click.option("--output-len", default=32, show_default=True, type=click.IntRange(min=1),
              help="Generated tokens per request (greedy, EOS ignored): exact, or the mean with a spread.")
@click.option("--output-len-spread", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Mixed output lengths, uniform in [L*(1-S), L*(1+S)] (vllm's --random-range-ratio). "
                   "Continuous batching's advantage shows here: a transformers batch runs every row to its "
                   "longest; only requested tokens count as output.")
@click.option("--shared-prefix", default=0, show_default=True, type=click.IntRange(min=0),
              help="Every prompt starts with the same N tokens (a system prompt). Turns on our prefix cache, "
                   "which the untimed warm-up fills; hits come in whole cache blocks (the JSON's "
                   "cached_prompt_tokens counts them). Must be < --input-len.")
@click.option("--peer", type=click.Choice(["transformers", "none"]), default="transformers", show_default=True,
              help="Compare with transformers' DeepseekV4ForCausalLM.generate on the same checkpoint "
                   "(needs transformers, the `test` extra), or run ours only.")
@click.option("--quant-sim", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Our FP8/FP4 QAT numerics simulation. transformers has none; off compares like with like.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads per engine process. Default: torch's choice (the physical cores).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of prompts and output lengths.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds allowed per engine process (load + warm-up + timed pass). Default: no limit.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Also write machine-readable results to PATH ('-': JSON on stdout, table on stderr).")
def bench_offline(model, concurrency, num_prompts, input_len, output_len, output_len_spread, shared_prefix, peer,
                  quant_sim, threads, seed, timeout, json_path):
    """Offline throughput and latency vs concurrency: ours against transformers on the same checkpoint.

    For each concurrency level C, C requests (or --num-prompts) of --input-len random token ids each
    generate their output length, greedy with EOS ignored. Ours: every request submitted to one engine at
    once, at most C decoded together (continuous batching). transformers: batched generate, C rows per
    call. Each engine runs in its own subprocess per level, so its peak RSS is its own; an untimed warm-up
    pass precedes the timed one.

    \b
    The table has, per level: ours and transformers output tok/s (requested output tokens over the
    wall time, prefill included), their ratio (ours / transformers), mean and p99 request latency
    (all requests submitted -> the request's last token; transformers: the end of its batch) and
    each process's peak RSS. Progress goes to stderr.

    \b
    Examples:
      ascend-v4 bench offline                                     # small, 1,4,16, 128 in / 32 out
      ascend-v4 bench offline --concurrency 16 --output-len-spread 0.9 --threads 2
      ascend-v4 bench offline --concurrency 8 --shared-prefix 512 --input-len 640 --peer none
      ascend-v4 bench offline --model tiny --concurrency 1,2 --output-len 4 --json out.json
    Dummy checkpoints (tiny, small) measure speed only; their text is gibberish by design.
    """
    from ascend_v4.bench.offline import OfflineBenchConfig, OfflineBenchError, format_table, run_offline_bench
    from ascend_v4.checkpoint.errors import CheckpointError
    from ascend_v4.model.args import ConfigError

    cfg = OfflineBenchConfig(model=model, concurrency=concurrency, num_prompts=num_prompts, input_len=input_len,
                             output_len=output_len, output_len_spread=output_len_spread,
                             shared_prefix=shared_prefix, peer=peer, quant_sim=quant_sim == "on",
                             threads=threads, seed=seed, timeout_s=timeout)
    try:
        res = run_offline_bench(cfg, progress=lambda msg: click.echo(f"[bench offline] {msg}", err=True))
    except (CheckpointError, ConfigError) as e:
        raise click.ClickException(f"--model {model!r}: {e}") from e
    except OfflineBenchError as e:
        raise click.ClickException(str(e)) from e
    table = format_table(res)
    if json_path == "-":
        click.echo(table, err=True)
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(table)
    if json_path:
        try:
            with open(json_path, "w") as f:
                json.dump(res, f, indent=2)
        except OSError as e:
            raise click.ClickException(f"--json {json_path}: cannot write: {e}") from e
        click.echo(f"[bench offline] results written to {json_path}", err=True)


__all__ = ["bench", "bench_offline", "BenchServeConfig", "RequestResult", "run_bench_serve", "summarize",
           "format_result"]
