"""Offline throughput and latency vs concurrency: ascend-v4's engine against transformers' batched `generate`
on the same checkpoint, the same prompts and in the same run (`ascend-v4 bench offline`).

For each concurrency level C, `num_prompts` requests (default C) of `input_len` random token ids generate
exactly their output length each (greedy, EOS ignored):

* ours: all requests submitted to one engine at once, at most C decoded together (continuous batching:
  a finished request leaves the batch at once and the next waiting one takes its place);
* transformers: `generate` on batches of C requests, one batch after another; each batch runs every row
  to its longest output length (mixed lengths waste the rest) and returns all rows at the end.

Each engine runs in its own subprocess (`offline_worker.py`) per level, so its peak RSS is its own. Reported
per level and engine: output tokens/s (requested tokens over the wall time of the timed pass, prefill
included), mean and p99 request latency (from submitting everything to a request's last token), peak RSS.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ascend_v4.bench.workload import Workload, make_workload, output_len_range

PEERS = ("transformers", "none")
_STDERR_TAIL = 3000  # characters of a failed worker's stderr shown in the error


class OfflineBenchError(RuntimeError):
    """Bad benchmark settings or a failed engine run; the message names the option or the engine."""


@dataclass
class OfflineBenchConfig:
    """Settings of one `bench offline` run (CLI option names in brackets).

    Attributes:
        model: preset, checkpoint directory or HF repo id (--model); `tiny` / `small` use dummy weights.
        concurrency: levels to measure, each in fresh processes (--concurrency).
        num_prompts: requests per level; None = the level itself, i.e. one full batch (--num-prompts).
        input_len: prompt ids per request, BOS included (--input-len).
        output_len: generated tokens per request, or their mean with a spread (--output-len).
        output_len_spread: output lengths uniform in [L(1-s), L(1+s)] (--output-len-spread).
        shared_prefix: prompt ids shared by every request, BOS included (--shared-prefix); turns on our prefix
            cache. Hits come in whole cache blocks (EngineConfig.block_size tokens), so a prefix shorter than
            a block is never reused.
        peer: "transformers" or "none" (--peer).
        quant_sim: our FP8/FP4 QAT numerics simulation (--quant-sim); transformers has none.
        threads: torch threads per engine process; None = torch's default (--threads).
        seed: prompts and output lengths (--seed).
        timeout_s: limit per engine process; None = none (--timeout).
        npus / tp / dp: our engine's layout (--npus, --tp, --dp; runtime/layout.py): N ranks (N - 1 worker
            processes), each DP group admitting ceil(level / DP) requests at once, so the level stays the total.
        speculative / speculative_tokens / speculative_threshold / speculative_draft_sampling: our speculative
            decoding (--speculative, ...; auto = what the checkpoint carries).
    """

    model: str = "small"
    concurrency: tuple[int, ...] = (1, 4, 16)
    num_prompts: int | None = None
    input_len: int = 128
    output_len: int = 32
    output_len_spread: float = 0.0
    shared_prefix: int = 0
    peer: str = "transformers"
    quant_sim: bool = True
    threads: int | None = None
    seed: int = 0
    timeout_s: float | None = None
    npus: int = 1
    tp: int | None = None
    dp: int | None = None
    speculative: str = "auto"
    speculative_tokens: int = 0
    speculative_threshold: float = 0.0
    speculative_draft_sampling: str = "greedy"

    def validate(self) -> None:
        """Raise OfflineBenchError naming the first bad setting."""
        def bad(opt: str, msg: str) -> None:
            raise OfflineBenchError(f"{opt}: {msg}")

        if not self.concurrency:
            bad("--concurrency", "give at least one level")
        if any(not isinstance(c, int) or c < 1 for c in self.concurrency):
            bad("--concurrency", f"levels must be integers >= 1, got {list(self.concurrency)}")
        if self.num_prompts is not None and self.num_prompts < 1:
            bad("--num-prompts", f"must be >= 1, got {self.num_prompts}")
        if self.input_len < 1:
            bad("--input-len", f"must be >= 1, got {self.input_len}")
        if self.output_len < 1:
            bad("--output-len", f"must be >= 1, got {self.output_len}")
        if not 0 <= self.output_len_spread < 1:
            bad("--output-len-spread", f"must be in [0, 1), got {self.output_len_spread}")
        if not 0 <= self.shared_prefix < self.input_len:
            bad("--shared-prefix", f"must be in [0, --input-len) = [0, {self.input_len}) so that every prompt "
                                   f"keeps a token of its own, got {self.shared_prefix}")
        if self.peer not in PEERS:
            bad("--peer", f"must be one of {PEERS}, got {self.peer!r}")
        if self.threads is not None and self.threads < 1:
            bad("--threads", f"must be >= 1, got {self.threads}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            bad("--timeout", f"must be > 0, got {self.timeout_s}")
        if self.npus < 1:
            bad("--npus", f"must be >= 1, got {self.npus}")
        from ascend_v4.runtime.layout import resolve_tp

        try:
            resolve_tp(self.npus, self.tp, self.dp)
        except ValueError as e:
            bad("--tp/--dp", str(e))


# ---------------------------------------------------------------------------------------------- running
def _worker_env(cfg: OfflineBenchConfig) -> dict[str, str]:
    env = dict(os.environ)
    if cfg.threads:
        # torch.set_num_threads in the worker covers torch's pool; these cover OpenMP / MKL set up before it.
        env |= {"OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)}
    return env


def _run_worker(engine: str, spec: dict, workdir: Path, cfg: OfflineBenchConfig) -> dict:
    """Run one engine in a fresh interpreter and return its result dict."""
    tag = f"{engine}-c{spec['concurrency']}"
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json"
    spec_path.write_text(json.dumps({**spec, "engine": engine}))
    # cwd = the temp dir: `python -m` puts the cwd first on sys.path, and a repo checkout there would shadow
    # the installed package's ops/quant/runtime mapping (code-style.md §7.1 trap 2).
    cmd = [sys.executable, "-m", "ascend_v4.bench.offline_worker", str(spec_path), str(out_path)]
    try:
        p = subprocess.run(cmd, cwd=workdir, env=_worker_env(cfg), capture_output=True, text=True,
                           timeout=cfg.timeout_s, check=False)  # a failure is reported with its stderr below
    except subprocess.TimeoutExpired:
        raise OfflineBenchError(f"{engine} at concurrency {spec['concurrency']}: no result within --timeout "
                                f"{cfg.timeout_s:g} s") from None
    if p.returncode != 0 or not out_path.is_file():
        raise OfflineBenchError(f"{engine} at concurrency {spec['concurrency']} failed (exit {p.returncode}); "
                                f"its stderr ends with:\n{p.stderr[-_STDERR_TAIL:]}")
    return json.loads(out_path.read_text())


def percentile(values: list[float], p: float) -> float:
    """p-th percentile with linear interpolation between closest ranks (numpy's default method)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def engine_summary(raw: dict, workload: Workload) -> dict:
    """Per-engine numbers of one level from a worker's raw result."""
    lat = raw["latencies_s"]
    return {
        "tok_s": workload.output_tokens / raw["wall_s"],
        "wall_s": raw["wall_s"],
        "output_tokens": raw["output_tokens"],
        "computed_tokens": raw["computed_tokens"],  # transformers: rows run to the longest in their batch
        "cached_prompt_tokens": raw["cached_prompt_tokens"],
        "mean_latency_s": statistics.fmean(lat),
        "p99_latency_s": percentile(lat, 99),
        "peak_rss_mib": raw["peak_rss_bytes"] / 2**20,
        "load_s": raw["load_s"],
        "threads": raw["threads"],
        **({"speculative": raw["speculative"]} if "speculative" in raw else {}),
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_offline_bench(cfg: OfflineBenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run every concurrency level for ours (and the peer) and return a JSON-able result.

    `progress` receives one line per engine run (the CLI prints them on stderr). Raises OfflineBenchError for
    bad settings or a failed engine, and the checkpoint errors of `resolve_model` for a bad --model.
    """
    from ascend_v4.checkpoint.resolve import resolve_model
    from ascend_v4.model.args import ModelArgs

    say = progress or (lambda _msg: None)
    cfg.validate()
    if cfg.peer == "transformers" and importlib.util.find_spec("transformers") is None:
        raise OfflineBenchError("--peer transformers: the transformers package is not installed "
                                "(pip install 'ascend-v4[test]'), or pass --peer none")
    resolved = resolve_model(cfg.model, progress=sys.stderr.isatty())
    args = ModelArgs.from_dir(resolved.path)
    longest = output_len_range(cfg.output_len, cfg.output_len_spread)[1]
    if cfg.input_len + longest > args.max_seq_len:
        raise OfflineBenchError(f"--input-len {cfg.input_len} + longest output {longest} exceeds the model's "
                                f"context of {args.max_seq_len} tokens")
    engines = ["ours"] + (["transformers"] if cfg.peer == "transformers" else [])
    levels = []
    with tempfile.TemporaryDirectory(prefix="ascend-v4-bench-offline-") as tmp:
        for c in cfg.concurrency:
            n = cfg.num_prompts or c
            mk = dict(num_requests=n, input_len=cfg.input_len, output_len=cfg.output_len,
                      spread=cfg.output_len_spread, shared_prefix=cfg.shared_prefix, bos_id=args.bos_token_id,
                      vocab_size=args.vocab_size)
            work, warm = make_workload(**mk, seed=cfg.seed), make_workload(**mk, seed=cfg.seed + 1)
            # absolute: the workers run in the temp dir, where a relative --model path would not resolve
            spec = {"model": str(Path(resolved.path).resolve()), "concurrency": c, "prompts": work.prompts,
                    "output_lens": work.output_lens, "warmup_prompts": warm.prompts, "quant_sim": cfg.quant_sim,
                    "prefix_caching": cfg.shared_prefix > 0, "threads": cfg.threads, "npus": cfg.npus,
                    "tp": cfg.tp, "dp": cfg.dp, "speculative": cfg.speculative,
                    "speculative_tokens": cfg.speculative_tokens, "speculative_threshold": cfg.speculative_threshold,
                    "speculative_draft_sampling": cfg.speculative_draft_sampling}
            row: dict = {"concurrency": c, "num_prompts": n, "output_tokens": work.output_tokens}
            for e in engines:
                say(f"concurrency {c}: {e}, {n} requests x {cfg.input_len} input tokens, "
                    f"{work.output_tokens} output tokens ...")
                t0 = time.perf_counter()
                row[e] = engine_summary(_run_worker(e, spec, Path(tmp), cfg), work)
                say(f"concurrency {c}: {e} done in {time.perf_counter() - t0:.1f} s "
                    f"({row[e]['tok_s']:.1f} tok/s, peak RSS {row[e]['peak_rss_mib']:.0f} MiB)")
            peer = row.get("transformers")
            row["ratio"] = row["ours"]["tok_s"] / peer["tok_s"] if peer else None
            levels.append(row)
    return {
        "benchmark": "offline",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": cfg.model, "model_path": str(resolved.path), "dummy_weights": resolved.is_dummy,
        "config": asdict(cfg),
        "versions": {d: _version(d) for d in ("ascend-v4", "torch", "transformers")},
        "levels": levels,
    }


# ---------------------------------------------------------------------------------------------- reporting
def format_table(result: dict) -> str:
    """Human-readable header and one row per concurrency level."""
    c = result["config"]
    peer = c["peer"] != "none"
    threads = result["levels"][0]["ours"]["threads"] if result["levels"] else "?"
    dummy = ", dummy weights" if result["dummy_weights"] else ""
    lines = [
        f"bench offline: {result['model']} ({result['model_path']}{dummy})",
        f"  {c['input_len']} input tokens (shared prefix {c['shared_prefix']}), {c['output_len']} output tokens "
        f"(spread {c['output_len_spread']:g}), greedy, quant-sim {'on' if c['quant_sim'] else 'off'}, "
        f"torch threads {threads}, peer {c['peer']}"
        + (f", ours on {c['npus']} ranks (--tp {c['tp']} --dp {c['dp']}), sharing {os.cpu_count()} cores"
           if c.get("npus", 1) > 1 else ""),
        ("  tok/s: requested output tokens / wall time (prefill included)"
         + ("; ratio: ours / hf (transformers) tok/s" if peer else "")),
        "  latency: all requests submitted -> a request's last token" + (" (hf: the end of its batch)" if peer else ""),
        "",
    ]
    head = f"{'conc':>4} {'reqs':>5} {'ours tok/s':>10}"
    if peer:
        head += f" {'hf tok/s':>9} {'ratio':>6}"
    head += f" {'ours lat mean/p99 s':>20}"
    if peer:
        head += f" {'hf lat mean/p99 s':>18}"
    head += f" {'ours RSS MiB':>12}"
    if peer:
        head += f" {'hf RSS MiB':>10}"
    lines.append(head)
    for r in result["levels"]:
        o, h = r["ours"], r.get("transformers")
        line = f"{r['concurrency']:>4} {r['num_prompts']:>5} {o['tok_s']:>10.1f}"
        if peer:
            line += f" {h['tok_s']:>9.1f} {r['ratio']:>5.2f}x"
        line += f" {o['mean_latency_s']:>11.2f} / {o['p99_latency_s']:<6.2f}"
        if peer:
            line += f" {h['mean_latency_s']:>9.2f} / {h['p99_latency_s']:<6.2f}"
        line += f" {o['peak_rss_mib']:>12.0f}"
        if peer:
            line += f" {h['peak_rss_mib']:>10.0f}"
        lines.append(line)
    for r in result["levels"]:
        sp = r["ours"].get("speculative")
        if sp and sp["method"] != "none":
            acc = ", ".join(f"{a:.2f}" for a in sp["acceptance_per_position"])
            lines.append(f"  c={r['concurrency']}: {sp['method']}, {sp['tokens_per_step']:.2f} tokens per verify step, "
                         f"{sp['accepted']} / {sp['proposed']} draft tokens accepted (per position: {acc or '-'}), "
                         f"{sp['draft_seconds']:.2f} s drafting ({sp['draft_seconds'] / r['ours']['wall_s']:.0%} of "
                         f"the wall time)")
    if c["shared_prefix"]:
        hits = ", ".join(f"c={r['concurrency']}: {r['ours']['cached_prompt_tokens']}" for r in result["levels"])
        lines.append(f"  prompt tokens ours served from the prefix cache: {hits}")
    return "\n".join(lines)


__all__ = ["OfflineBenchConfig", "OfflineBenchError", "run_offline_bench", "format_table", "engine_summary",
           "percentile", "PEERS"]
