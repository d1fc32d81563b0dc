"""`ascend-v4 bench`: benchmarks. `bench serve` measures a running server like `vllm bench serve` does;
`bench offline` compares the engine with transformers' batched generate (logic in `ascend_v4/bench/offline.py`).

The group is open for more subcommands: keep the benchmark itself in `ascend_v4/bench/` (or its own module)
and only the click options here, or write the command in its own module and attach it in
`ascend_v4/cli/__init__.py` with `bench.add_command(cmd)`.

`bench serve` (logic in `ascend_v4/bench/serve.py`) sends `--num-prompts` streamed requests of random token
ids with a fixed output length, at most `--concurrency` at a time, and reports vLLM's serving metrics (TTFT,
TPOT, ITL, E2EL, throughput; serving-notes §7.1).
"""

from __future__ import annotations

import json

import click

from ascend_v4.cli.generate import speculative_options

# Re-exported: the logic lives in ascend_v4/bench/serve.py (imports nothing heavy: no torch, no httpx2).
from ascend_v4.bench.serve import (
    BenchServeConfig,
    RequestResult,
    format_result,
    random_prompts,
    run_bench_serve,
    summarize,
)


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
@click.option("--npus", default=1, show_default=True, type=click.IntRange(min=1),
              help="Our engine on N ranks (N - 1 worker processes; each DP group admits its share of the level).")
@click.option("--tp", type=click.IntRange(min=1), default=None, help="Attention TP of our engine (with --npus).")
@click.option("--dp", type=click.IntRange(min=1), default=None, help="Attention DP groups (with --npus).")
@speculative_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Also write machine-readable results to PATH ('-': JSON on stdout, table on stderr).")
def bench_offline(model, concurrency, num_prompts, input_len, output_len, output_len_spread, shared_prefix, peer,
                  quant_sim, threads, seed, timeout, npus, tp, dp, speculative, speculative_tokens,
                  speculative_threshold, speculative_draft_sampling, json_path):
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
      ascend-v4 bench offline --concurrency 16 --npus 2 --dp 2 --peer none   # DP 2 (1 thread per rank here)
      ascend-v4 bench offline --model tiny-dspark --concurrency 1,16 --peer none --speculative dspark
    Speculative decoding follows the checkpoint (--speculative auto: MTP for April checkpoints, DSpark for
    0731/0813); random dummy weights accept almost no drafts, so use --speculative none to time the engine
    alone. The table then adds tokens per verify step and the acceptance of each draft position.
    Dummy checkpoints (tiny, small) measure speed only; their text is gibberish by design.
    """
    from ascend_v4.bench.offline import OfflineBenchConfig, OfflineBenchError, format_table, run_offline_bench
    from ascend_v4.checkpoint.errors import CheckpointError
    from ascend_v4.model.args import ConfigError

    cfg = OfflineBenchConfig(model=model, concurrency=concurrency, num_prompts=num_prompts, input_len=input_len,
                             output_len=output_len, output_len_spread=output_len_spread,
                             shared_prefix=shared_prefix, peer=peer, quant_sim=quant_sim == "on",
                             threads=threads, seed=seed, timeout_s=timeout, npus=npus, tp=tp, dp=dp,
                             speculative=speculative, speculative_tokens=speculative_tokens,
                             speculative_threshold=speculative_threshold,
                             speculative_draft_sampling=speculative_draft_sampling)
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


__all__ = ["bench", "bench_offline", "bench_serve", "BenchServeConfig", "RequestResult", "random_prompts",
           "run_bench_serve", "summarize", "format_result"]
