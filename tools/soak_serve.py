#!/usr/bin/env python3
"""Soak test of `ascend-v4 serve`: a bounded mixed load for a long time, watching the server for leaks.

    python tools/soak_serve.py                                   # 30 min on `small` (starts the server)
    python tools/soak_serve.py --duration 120 --interval 15 --model tiny      # the CI version (2 min)
    python tools/soak_serve.py --url http://127.0.0.1:8000 [--pid PID] [--api-key KEY] --duration 600
    python tools/soak_serve.py ... --json > soak.json            # machine-readable result on stdout

Without --url it starts `ascend-v4 serve --model MODEL --port 0` on 127.0.0.1 (its log goes to a file
named in the output), and at the end sends SIGINT and checks that it drains and exits 0 ("stopped" in the
log). With --url it attaches to a running server; the server process (for RSS / fds / threads) is --pid or
the process listening on the URL's port (found with psutil), else those checks are skipped.

Load: --concurrency workers (default 8), each sending one request at a time, chosen at random (seeded) from
a fixed mix (MIX below): OpenAI chat (plain / streamed, thinking on / off), /v1/completions (plain /
streamed, logprobs), Anthropic /v1/messages (plain / streamed), streams dropped by the client after the first
chunks, requests sharing a long system prompt (prefix-cache hits), response_format json_schema and a forced
tool call (named tool_choice, thinking off) over small enum schemas, prompt log-probs (`echo` + `logprobs` +
`max_tokens: 0`, lm-eval's log-likelihood request), and malformed bodies that must get 400. For the
structured / tool / log-prob kinds a 400 is counted as "unsupported", not as an error; a finished structured
answer or forced call that does not validate against its schema is an error (--no-constrained: only noted).
Output lengths are small (--max-tokens) so that one request takes seconds, not minutes, on a CPU.

Every --interval seconds (default 60) one row: server RSS (the process and its children), open fds, threads,
`ascend_v4:cache_blocks_used` / `_total`, `ascend_v4:prefix_cache_hit_rate` (engine lifetime) and the share
of this window's shared-prefix requests that hit, requests finished, p50 / p99 latency of the window's
completed requests (whole request, streams to their end; dropped streams and bad requests excluded), and
errors by kind and status.

Verdict (exit 1 if any check fails). The warm-up is the first --warmup seconds (default: 10 % of the run,
at most 3 min, at least 2 windows); its windows set the baselines, each later window is checked against:
  * RSS <= warm-up max * (1 + --rss-growth) + --rss-slack-mib   (defaults 10 %, 64 MiB)
  * fds <= warm-up max + --fd-slack (default 2 x concurrency + 8); threads <= warm-up max + --thread-slack (8)
  * p99: the median p99 of the last third of the windows <= --p99-factor (2.0) x warm-up max p99 +
    --p99-slack-s (1 s), and no single window above twice that bound
  * no unexpected response: 5xx, 429, connection errors, malformed bodies, a bad request not answered 400
  * /health answers 200 at every sample
  * after the load stops: in-flight requests and cache blocks in use return to 0 within 30 s (idle)
  * the server this tool started exits 0 after SIGINT within its drain timeout.
Progress lines go to stderr; the table and verdict (or the JSON document with --json) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx2
import psutil

from ascend_v4.cli import command_line as cli

MIB = 1024 * 1024
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 180
IDLE_TIMEOUT_S = 30

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud ember maple "
         "harbor lantern meadow copper violet thunder silver garden window orbit canyon").split()
# shared by every "prefix" request: long enough for several 128-token cache blocks
SHARED_SYSTEM = ("You are a careful assistant for a soak test. Follow these rules exactly. " +
                 " ".join(f"Rule {i}: answer with the word {WORDS[i % len(WORDS)]} when asked about item {i}."
                          for i in range(60)))
# finite (enums and a boolean): a constrained random model ends it in a few tokens, so it can be validated
SCHEMA = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                                           "ok": {"type": "boolean"}},
          "required": ["color", "ok"], "additionalProperties": False}
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}

# kind -> weight of the mix
MIX = {"chat": 3, "chat_stream": 3, "completion": 2, "completion_stream": 1, "messages": 2, "messages_stream": 2,
       "disconnect": 1, "prefix": 3, "structured": 1, "tool": 1, "loglik": 1, "bad": 1}
# kinds where a 400 means "feature not there yet" (counted, not an error)
MAY_BE_UNSUPPORTED = {"structured", "tool", "loglik"}


def valid_answer(v) -> bool:
    return isinstance(v, dict) and set(v) == {"color", "ok"} and v["color"] in ("red", "green", "blue") and \
        isinstance(v["ok"], bool)


def valid_weather(v) -> bool:
    return isinstance(v, dict) and set(v) == {"city", "unit"} and v["city"] in ("Paris", "Tokyo", "Lima") and \
        v["unit"] in ("celsius", "fahrenheit")


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- server


class StartedServer:
    """`ascend-v4 serve --port 0` on 127.0.0.1, output to a log file (never an unread pipe)."""

    def __init__(self, model: str, extra: list[str], log_path: Path, drain_timeout: float):
        self.log_path = log_path
        self.drain_timeout = drain_timeout
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop / kill)
        args = [*cli(), "serve", "--host", "127.0.0.1", "--port", "0", "--model", model, "--no-access-log",
                "--drain-timeout", f"{drain_timeout:g}", *extra]
        shown = ["***" if i and args[i - 1] == "--api-key" else a for i, a in enumerate(args)]
        log(f"starting: {' '.join(shown)} (log: {log_path})")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=log_path.parent,
                                     start_new_session=True)  # our Ctrl-C is not the server's
        self.url: str | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log_text())
            if m:
                self.url = m.group(1)
                return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.kill()
        raise SystemExit(f"server did not start (rc={self.proc.poll()}):\n{self.log_text()[-4000:]}")

    def stop(self) -> dict:
        """SIGINT, then wait for a clean exit (drain timeout + grace); kill if it hangs."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(self.drain_timeout + 30)
            except subprocess.TimeoutExpired:
                self.kill()
                return {"exited": False, "rc": None, "seconds": round(time.monotonic() - t0, 1),
                        "stopped_line": False}
        self._log.close()
        return {"exited": True, "rc": self.proc.returncode, "seconds": round(time.monotonic() - t0, 1),
                "stopped_line": "ascend-v4 serve: stopped" in self.log_text()}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._log.closed:
            self._log.close()


def find_listening_pid(url: str) -> int | None:
    port = urlparse(url).port
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return c.pid
    except (psutil.AccessDenied, PermissionError):
        pass
    return None


def process_sample(pid: int | None) -> dict:
    if pid is None:
        return {"rss_mib": None, "fds": None, "threads": None}
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
        rss = 0
        for q in procs:
            try:
                rss += q.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return {"rss_mib": round(rss / MIB, 1), "fds": p.num_fds(), "threads": p.num_threads()}
    except psutil.NoSuchProcess:
        return {"rss_mib": None, "fds": None, "threads": None, "gone": True}


def parse_metrics(text: str) -> dict:
    def one(name: str) -> float | None:
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+|NaN)$", text, re.MULTILINE)
        return float(m.group(1)) if m else None

    return {"blocks_used": one("ascend_v4:cache_blocks_used"), "blocks_total": one("ascend_v4:cache_blocks_total"),
            "prefix_hit_rate": one("ascend_v4:prefix_cache_hit_rate"),
            "in_flight": one("ascend_v4:num_requests_in_flight"),
            "aborted": one("ascend_v4:request_aborted_total"),
            "disconnects": one("ascend_v4:client_disconnects_total")}


# ------------------------------------------------------------------------------------------------- load


@dataclass
class Result:
    kind: str
    end: float  # monotonic
    latency: float
    outcome: str  # ok | dropped | bad_ok | unsupported | error
    status: str  # HTTP status or exception name
    detail: str = ""
    prefix_hit: bool | None = None


class Malformed(Exception):
    pass


@dataclass
class Load:
    url: str
    model: str
    headers: dict
    max_tokens: int
    seed: int
    constrained: bool = True  # structured outputs / forced tool calls must validate (--no-constrained: not)
    results: list[Result] = field(default_factory=list)

    def text(self, rng: random.Random, n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    def thinking(self, rng: random.Random) -> dict:
        return {"type": "enabled" if rng.random() < 0.5 else "disabled"}

    async def run_one(self, client: httpx2.AsyncClient, kind: str, rng: random.Random) -> Result:
        t0 = time.monotonic()
        try:
            outcome, status, detail, hit = await getattr(self, "_" + kind)(client, rng)
        except Malformed as e:
            outcome, status, detail, hit = "error", "malformed", str(e)[:200], None
        except (httpx2.HTTPError, OSError, asyncio.TimeoutError) as e:
            outcome, status, detail, hit = "error", type(e).__name__, str(e)[:200], None
        t1 = time.monotonic()
        return Result(kind, t1, t1 - t0, outcome, str(status), detail, hit)

    def _tokens(self, rng: random.Random) -> int:
        return rng.randint(max(1, self.max_tokens // 4), self.max_tokens)

    @staticmethod
    def _check(r, kind: str, may_be_unsupported: bool = False):
        """(outcome, status, detail) for a non-200 answer, or None for 200."""
        if r.status_code == 200:
            return None
        body = r.text[:200]
        if may_be_unsupported and r.status_code == 400:
            return "unsupported", r.status_code, body
        return "error", r.status_code, body

    async def _post_json(self, client, path: str, body: dict, kind: str, may_be_unsupported: bool = False):
        r = await client.post(path, json=body)
        bad = self._check(r, kind, may_be_unsupported)
        if bad:
            return bad, None
        try:
            return None, r.json()
        except ValueError as e:
            raise Malformed(f"{kind}: body is not JSON: {r.text[:100]}") from e

    async def _sse(self, client, path: str, body: dict, *, stop_after: int | None = None):
        """(outcome tuple or None, list of data payloads, saw_end). stop_after: drop the stream after that
        many data lines (client disconnect)."""
        datas: list[str] = []
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return ("error", r.status_code, r.text[:200]), datas, False
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    datas.append(line[6:])
                    if stop_after is not None and len(datas) >= stop_after:
                        return None, datas, False  # leaving the block closes the connection mid-stream
        return None, datas, True

    # --- kinds: each returns (outcome, status, detail, prefix_hit)

    async def _chat(self, client, rng, *, messages=None, extra=None, kind="chat"):
        mt = self._tokens(rng)
        body = {"model": self.model, "messages": messages or [{"role": "user", "content": self.text(rng, 12)}],
                "max_tokens": mt, "thinking": self.thinking(rng), **(extra or {})}
        bad, j = await self._post_json(client, "/v1/chat/completions", body, kind)
        if bad:
            return (*bad, None)
        try:
            ch, u = j["choices"][0], j["usage"]
            assert ch["finish_reason"] in ("stop", "length", "tool_calls"), ch["finish_reason"]
            assert u["completion_tokens"] <= mt and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        except (KeyError, IndexError, TypeError, AssertionError) as e:
            raise Malformed(f"{kind}: {e!r} in {str(j)[:200]}") from e
        return "ok", 200, "", (u.get("prompt_cache_hit_tokens") or 0) > 0

    async def _chat_stream(self, client, rng):
        body = {"model": self.model, "messages": [{"role": "user", "content": self.text(rng, 12)}],
                "max_tokens": self._tokens(rng), "thinking": self.thinking(rng), "stream": True,
                "stream_options": {"include_usage": True}}
        bad, datas, _ = await self._sse(client, "/v1/chat/completions", body)
        if bad:
            return (*bad, None)
        if not datas or datas[-1] != "[DONE]":
            raise Malformed(f"chat_stream: no [DONE] (last: {datas[-1:]})")
        if not json.loads(datas[-2]).get("usage"):
            raise Malformed("chat_stream: no usage chunk")
        return "ok", 200, "", None

    async def _completion(self, client, rng):
        body = {"model": self.model, "prompt": self.text(rng, 10), "max_tokens": self._tokens(rng),
                "logprobs": rng.choice([None, 2])}
        bad, j = await self._post_json(client, "/v1/completions", body, "completion")
        if bad:
            return (*bad, None)
        if not isinstance(j.get("choices", [{}])[0].get("text"), str):
            raise Malformed(f"completion: {str(j)[:200]}")
        return "ok", 200, "", None

    async def _completion_stream(self, client, rng):
        body = {"model": self.model, "prompt": self.text(rng, 10), "max_tokens": self._tokens(rng), "stream": True}
        bad, datas, _ = await self._sse(client, "/v1/completions", body)
        if bad:
            return (*bad, None)
        if not datas or datas[-1] != "[DONE]":
            raise Malformed("completion_stream: no [DONE]")
        return "ok", 200, "", None

    async def _messages(self, client, rng):
        body = {"model": self.model, "max_tokens": self._tokens(rng), "thinking": self.thinking(rng),
                "messages": [{"role": "user", "content": self.text(rng, 12)}]}
        bad, j = await self._post_json(client, "/v1/messages", body, "messages")
        if bad:
            return (*bad, None)
        if j.get("type") != "message" or j.get("stop_reason") not in ("end_turn", "max_tokens", "stop_sequence",
                                                                        "tool_use"):
            raise Malformed(f"messages: {str(j)[:200]}")
        return "ok", 200, "", None

    async def _messages_stream(self, client, rng):
        body = {"model": self.model, "max_tokens": self._tokens(rng), "thinking": self.thinking(rng),
                "stream": True, "messages": [{"role": "user", "content": self.text(rng, 12)}]}
        bad, datas, _ = await self._sse(client, "/v1/messages", body)
        if bad:
            return (*bad, None)
        if not datas or json.loads(datas[-1]).get("type") != "message_stop":
            raise Malformed(f"messages_stream: no message_stop (last: {datas[-1:]})")
        return "ok", 200, "", None

    async def _disconnect(self, client, rng):
        msgs = [{"role": "user", "content": self.text(rng, 12)}]
        if rng.random() < 0.5:
            path, body = "/v1/chat/completions", {"model": self.model, "messages": msgs, "stream": True,
                                                  "max_tokens": 2000, "ignore_eos": True}
        else:
            path, body = "/v1/messages", {"model": self.model, "messages": msgs, "stream": True, "max_tokens": 2000}
        bad, _, ended = await self._sse(client, path, body, stop_after=rng.randint(2, 4))
        if bad:
            return (*bad, None)
        if ended:  # the stream ended before we could drop it (a model that stops early): still fine
            return "ok", 200, "ended before the drop", None
        return "dropped", 200, "", None

    async def _prefix(self, client, rng):
        msgs = [{"role": "system", "content": SHARED_SYSTEM},
                {"role": "user", "content": f"What about item {rng.randint(0, 59)}? " + self.text(rng, 4)}]
        return await self._chat(client, rng, messages=msgs, extra={"thinking": {"type": "disabled"}}, kind="prefix")

    async def _structured(self, client, rng):
        """response_format json_schema (thinking off). With constrained decoding a finished answer must
        validate (else an error); without it (prompt-level JSON mode) non-JSON is only noted (detail)."""
        body = {"model": self.model, "max_tokens": 64, "thinking": {"type": "disabled"},
                "messages": [{"role": "user", "content": "Pick a color. " + self.text(rng, 6)}],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}}
        bad, j = await self._post_json(client, "/v1/chat/completions", body, "structured", may_be_unsupported=True)
        if bad:
            return (*bad, None)
        ch = j["choices"][0]
        content = ch["message"].get("content") or ""
        try:
            ok = valid_answer(json.loads(content))
        except ValueError:
            ok = False
        if ok:
            return "ok", 200, "json", None
        if ch["finish_reason"] == "stop" and self.constrained:
            return "error", "invalid", f"structured: finished answer does not match the schema: {content[:120]!r}", None
        return "ok", 200, "not json" if ch["finish_reason"] == "stop" else "cut", None

    async def _tool(self, client, rng):
        """A named tool_choice with thinking off: with constrained tool calls the call must come, with
        arguments matching the schema."""
        body = {"model": self.model, "max_tokens": 96, "thinking": {"type": "disabled"}, "tools": [TOOL],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "messages": [{"role": "user", "content": "Weather? " + self.text(rng, 6)}]}
        bad, j = await self._post_json(client, "/v1/chat/completions", body, "tool", may_be_unsupported=True)
        if bad:
            return (*bad, None)
        ch = j["choices"][0]
        calls = ch["message"].get("tool_calls") or []
        try:
            ok = len(calls) >= 1 and all(c["function"]["name"] == "get_weather" and
                                         valid_weather(json.loads(c["function"]["arguments"])) for c in calls)
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok and ch["finish_reason"] == "tool_calls":
            return "ok", 200, "json", None
        if self.constrained and ch["finish_reason"] != "length":
            return "error", "invalid", f"tool: no valid forced call: {str(ch)[:160]}", None
        return "ok", 200, "no call" if ch["finish_reason"] != "length" else "cut", None

    async def _loglik(self, client, rng):
        body = {"model": self.model, "prompt": self.text(rng, 8), "echo": True, "logprobs": 1, "max_tokens": 0}
        bad, j = await self._post_json(client, "/v1/completions", body, "loglik", may_be_unsupported=True)
        if bad:
            return (*bad, None)
        lp = (j.get("choices") or [{}])[0].get("logprobs") or {}
        if not lp.get("token_logprobs"):
            raise Malformed(f"loglik: no token_logprobs in {str(j)[:200]}")
        return "ok", 200, "", None

    async def _bad(self, client, rng):
        body = rng.choice([
            {"model": self.model, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5},
            {"model": self.model, "messages": "not a list"},
            {"model": self.model, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            {"model": self.model, "max_tokens": 4},  # no messages
        ])
        r = await client.post("/v1/chat/completions", json=body)
        if r.status_code == 400:
            return "bad_ok", 400, "", None
        return "error", r.status_code, f"bad request answered {r.status_code}: {r.text[:150]}", None

    async def worker(self, wid: int, client: httpx2.AsyncClient, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + wid)
        kinds, weights = list(MIX), list(MIX.values())
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            res = await self.run_one(client, kind, rng)
            self.results.append(res)
            if res.outcome == "error" and res.status in ("ConnectError", "RemoteProtocolError", "ReadError"):
                await asyncio.sleep(1)  # do not spin on a dead server


# ---------------------------------------------------------------------------------------------- sampling


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def summarize_window(results: list[Result]) -> dict:
    lat = [r.latency for r in results if r.outcome == "ok"]
    errors: dict[str, int] = {}
    for r in results:
        if r.outcome == "error":
            key = f"{r.kind}:{r.status}"
            errors[key] = errors.get(key, 0) + 1
    prefix = [r for r in results if r.kind == "prefix" and r.outcome == "ok"]
    return {"requests": len(results), "ok": len(lat), "dropped": sum(r.outcome == "dropped" for r in results),
            "bad_400": sum(r.outcome == "bad_ok" for r in results),
            "unsupported": sum(r.outcome == "unsupported" for r in results),
            "p50_s": None if not lat else round(pct(lat, 0.5), 3), "p99_s": None if not lat else round(pct(lat, 0.99), 3),
            "prefix_req_hits": None if not prefix else round(sum(bool(r.prefix_hit) for r in prefix) / len(prefix), 3),
            "errors": errors}


async def sample(client: httpx2.AsyncClient, pid: int | None) -> dict:
    s = process_sample(pid)
    try:
        h = await client.get("/health", timeout=10)
        s["health"] = h.status_code
    except httpx2.HTTPError as e:
        s["health"] = type(e).__name__
    try:
        m = await client.get("/metrics", timeout=10)
        s.update(parse_metrics(m.text))
    except httpx2.HTTPError:
        s.update(parse_metrics(""))
    return s


def fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def table(rows: list[dict]) -> str:
    head = (f"{'t_s':>6} {'phase':>6} {'rss_MiB':>8} {'fds':>5} {'thr':>4} {'blocks':>9} {'pfx_hit':>7} {'pfx_req':>7} "
            f"{'reqs':>5} {'ok':>5} {'drop':>4} {'unsup':>5} {'p50_s':>6} {'p99_s':>6}  errors")
    out = [head]
    for r in rows:
        blocks = f"{fmt(r.get('blocks_used'), '.0f')}/{fmt(r.get('blocks_total'), '.0f')}"
        errs = ",".join(f"{k}={v}" for k, v in sorted(r.get("errors", {}).items())) or "-"
        out.append(f"{r['t_s']:>6.0f} {r['phase']:>6} {fmt(r.get('rss_mib'), '.1f'):>8} {fmt(r.get('fds')):>5} "
                   f"{fmt(r.get('threads')):>4} {blocks:>9} {fmt(r.get('prefix_hit_rate'), '.3f'):>7} "
                   f"{fmt(r.get('prefix_req_hits'), '.2f'):>7} {r.get('requests', 0):>5} {r.get('ok', 0):>5} "
                   f"{r.get('dropped', 0):>4} {r.get('unsupported', 0):>5} {fmt(r.get('p50_s'), '.2f'):>6} "
                   f"{fmt(r.get('p99_s'), '.2f'):>6}  {errs}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ verdict


def verdict(args, rows: list[dict], idle: dict, stop: dict | None, totals: dict) -> list[dict]:
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    load = [r for r in rows if r["phase"] in ("warmup", "load")]
    warm = [r for r in load if r["phase"] == "warmup"]
    after = [r for r in load if r["phase"] == "load"]
    if not warm or not after:
        check("windows", False, f"{len(warm)} warm-up and {len(after)} later windows: run longer or lower --interval")
        return checks

    def series(rs, key):
        return [r[key] for r in rs if r.get(key) is not None]

    if series(warm, "rss_mib"):
        base = max(series(warm, "rss_mib"))
        bound = base * (1 + args.rss_growth) + args.rss_slack_mib
        top = max(series(after + [idle], "rss_mib"), default=base)
        check("rss", top <= bound, f"max {top:.1f} MiB after warm-up, bound {bound:.1f} "
                                    f"(warm-up max {base:.1f} + {args.rss_growth:.0%} + {args.rss_slack_mib} MiB)")
        fb = max(series(warm, "fds")) + args.fd_slack
        ftop = max(series(after + [idle], "fds"))
        check("fds", ftop <= fb, f"max {ftop} after warm-up, bound {fb} (warm-up max + {args.fd_slack})")
        tb = max(series(warm, "threads")) + args.thread_slack
        ttop = max(series(after + [idle], "threads"))
        check("threads", ttop <= tb, f"max {ttop} after warm-up, bound {tb} (warm-up max + {args.thread_slack})")
    else:
        check("process", True, "no server pid: RSS / fds / threads not checked (pass --pid)")

    wp = series(warm, "p99_s")
    ap = series(after, "p99_s")
    if wp and ap:
        bound = args.p99_factor * max(wp) + args.p99_slack_s
        tail = ap[-max(1, len(ap) // 3):]
        med = statistics.median(tail)
        check("p99", med <= bound and max(ap) <= 2 * bound,
              f"median p99 of the last {len(tail)} window(s) {med:.2f} s, worst window {max(ap):.2f} s; bound "
              f"{bound:.2f} s ({args.p99_factor:g} x warm-up max {max(wp):.2f} + {args.p99_slack_s:g}), spike bound "
              f"{2 * bound:.2f} s")
    else:
        check("p99", False, "no completed requests in some phase")
    n_ok = sum(r.get("ok", 0) for r in load)
    check("progress", all(r.get("ok", 0) > 0 for r in load), f"{n_ok} requests completed; every window completed some")
    errs = totals["errors"]
    check("errors", not errs, "none" if not errs else ", ".join(f"{k}={v}" for k, v in sorted(errs.items())))
    bad_health = [r["t_s"] for r in rows if r.get("health") != 200]
    check("health", not bad_health, "200 at every sample" if not bad_health else f"not 200 at t={bad_health}")
    check("idle", idle.get("blocks_used") == 0 and idle.get("in_flight") == 0,
          f"after the load: blocks_used={idle.get('blocks_used')}, in_flight={idle.get('in_flight')} "
          f"(waited {idle.get('idle_wait_s')} s)")
    if stop is not None:
        check("shutdown", stop["exited"] and stop["rc"] == 0 and stop["stopped_line"],
              f"SIGINT: exited={stop['exited']} rc={stop['rc']} in {stop['seconds']} s, "
              f"'stopped' logged={stop['stopped_line']}")
    return checks


# ----------------------------------------------------------------------------------------------------- main


async def soak(args, url: str, pid: int | None, model: str) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    load = Load(url, model, headers, args.max_tokens, args.seed, constrained=args.constrained)
    limits = httpx2.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency)
    async with httpx2.AsyncClient(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S, limits=limits,
                                  trust_env=False) as client, \
            httpx2.AsyncClient(base_url=url, headers=headers, timeout=30, trust_env=False) as probe:
        t0 = time.monotonic()
        rows = [{"t_s": 0.0, "phase": "start", **await sample(probe, pid), **summarize_window([])}]
        log(f"start: rss {rows[0]['rss_mib']} MiB, fds {rows[0]['fds']}, threads {rows[0]['threads']}, "
            f"blocks {rows[0]['blocks_used']}/{rows[0]['blocks_total']}")
        deadline = t0 + args.duration
        workers = [asyncio.create_task(load.worker(i, client, deadline)) for i in range(args.concurrency)]
        seen = 0
        k = 0
        while True:
            k += 1
            t_next = t0 + k * args.interval
            now = time.monotonic()
            if t_next > deadline + 0.5:
                break
            await asyncio.sleep(max(0.0, t_next - now))
            new, seen = load.results[seen:], len(load.results)
            row = {"t_s": round(time.monotonic() - t0, 1),
                   "phase": "warmup" if k * args.interval <= args.warmup + 1e-6 else "load",
                   **await sample(probe, pid), **summarize_window(new)}
            rows.append(row)
            errs = ",".join(f"{a}={b}" for a, b in sorted(row["errors"].items())) or "no errors"
            log(f"t={row['t_s']:.0f}s {row['phase']}: rss {row['rss_mib']} MiB, fds {row['fds']}, threads "
                f"{row['threads']}, blocks {fmt(row['blocks_used'], '.0f')}/{fmt(row['blocks_total'], '.0f')}, "
                f"{row['requests']} reqs ({row['ok']} ok, {row['dropped']} dropped, {row['unsupported']} unsupported), "
                f"p50 {row['p50_s']} s p99 {row['p99_s']} s, {errs}")
        log("load stopped; waiting for in-flight requests")
        await asyncio.gather(*workers)
        tail = load.results[seen:]  # finished after the last window closed: shown in the idle row
        # idle: in-flight and cache blocks back to 0
        t_idle = time.monotonic()
        while True:
            idle = await sample(probe, pid)
            if (idle.get("blocks_used") == 0 and idle.get("in_flight") == 0) or \
                    time.monotonic() - t_idle > IDLE_TIMEOUT_S:
                break
            await asyncio.sleep(0.5)
        idle_wait = round(time.monotonic() - t_idle, 1)
        await asyncio.sleep(6)  # keep-alive connections (5 s on the server) close before fds are counted
        idle = {**await sample(probe, pid), "blocks_used": idle.get("blocks_used"), "in_flight": idle.get("in_flight")}
        idle.update(t_s=round(time.monotonic() - t0, 1), phase="idle", idle_wait_s=idle_wait, **summarize_window(tail))
        rows.append(idle)
    res = load.results
    totals = summarize_window(res)
    by_kind: dict[str, dict] = {}
    for r in res:
        d = by_kind.setdefault(r.kind, {})
        key = f"{r.outcome}:{r.detail}" if r.kind in ("structured", "tool") and r.outcome == "ok" else r.outcome
        d[key] = d.get(key, 0) + 1
    structured_json = sum(r.kind in ("structured", "tool") and r.detail == "json" for r in res)
    return {"rows": rows, "idle": idle, "totals": totals, "by_kind": by_kind, "structured_json": structured_json,
            "elapsed_s": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="attach to a running server instead of starting one")
    ap.add_argument("--pid", type=int, help="with --url: the server process to watch (default: found by port)")
    ap.add_argument("--api-key", default=os.environ.get("ASCEND_V4_API_KEY"))
    ap.add_argument("--model", default="small", help="preset / dir to serve (default small); with --url the "
                                                      "served name to request (default: the first of /v1/models)")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `ascend-v4 serve` argument (repeatable; "
                                                                     "e.g. --serve-arg=--max-num-seqs=16)")
    ap.add_argument("--duration", type=float, default=1800, help="seconds of load (default 1800)")
    ap.add_argument("--interval", type=float, default=60, help="seconds per sample window (default 60)")
    ap.add_argument("--warmup", type=float, help="seconds of warm-up (default: 10%% of the run, at most 180, "
                                                 "at least 2 windows)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24, help="upper bound of max_tokens per request (default 24)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drain-timeout", type=float, default=30, help="the started server's --drain-timeout")
    ap.add_argument("--rss-growth", type=float, default=0.10)
    ap.add_argument("--rss-slack-mib", type=float, default=64)
    ap.add_argument("--fd-slack", type=int)
    ap.add_argument("--thread-slack", type=int, default=8)
    ap.add_argument("--p99-factor", type=float, default=2.0)
    ap.add_argument("--p99-slack-s", type=float, default=1.0)
    ap.add_argument("--log-dir", type=Path, help="where the started server's log goes (default: a temp dir)")
    ap.add_argument("--no-constrained", dest="constrained", action="store_false",
                    help="do not require structured outputs / forced tool calls to validate (a server without "
                         "constrained decoding)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(min(180.0, 0.1 * args.duration), 2 * args.interval)
    if args.fd_slack is None:
        args.fd_slack = 2 * args.concurrency + 8
    if args.duration < args.warmup + args.interval:
        ap.error(f"--duration {args.duration:g} leaves no window after the {args.warmup:g} s warm-up")

    server = None
    stop = None
    if args.url:
        url = args.url.rstrip("/")
        pid = args.pid or find_listening_pid(url)
        if pid is None:
            log("no server pid found (pass --pid): RSS / fds / threads will not be checked")
    else:
        log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="soak-serve-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        extra = [*args.serve_arg, *(["--api-key", args.api_key] if args.api_key else [])]
        server = StartedServer(args.model, extra, log_dir / "server.log", args.drain_timeout)
        t = time.monotonic()
        url = server.wait_ready()
        pid = server.proc.pid
        log(f"server up at {url} (pid {pid}) in {time.monotonic() - t:.1f} s")
    try:
        models = httpx2.get(url + "/v1/models", trust_env=False, timeout=30,
                            headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})
        models.raise_for_status()
        model = models.json()["data"][0]["id"] if args.url else args.model
        log(f"load: {args.duration:g} s, concurrency {args.concurrency}, windows of {args.interval:g} s, warm-up "
            f"{args.warmup:g} s, max_tokens <= {args.max_tokens}, model {model}")
        out = asyncio.run(soak(args, url, pid, model))
    except BaseException:
        if server is not None:
            server.kill()
            log(f"server log: {server.log_path}")
        raise
    if server is not None:
        log("stopping the server (SIGINT)")
        stop = server.stop()
        log(f"server exited={stop['exited']} rc={stop['rc']} in {stop['seconds']} s")
    checks = verdict(args, out["rows"], out["idle"], stop, out["totals"])
    passed = all(c["ok"] for c in checks)
    doc = {"verdict": "PASS" if passed else "FAIL", "checks": checks, "url": url, "pid": pid,
           "server_log": str(server.log_path) if server else None,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                      if k not in ("api_key", "json")},
           "mix": MIX, "windows": out["rows"], "totals": out["totals"], "by_kind": out["by_kind"],
           "structured_json_valid": out["structured_json"], "shutdown": stop, "elapsed_s": out["elapsed_s"]}
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(table(out["rows"]))
        t = out["totals"]
        print(f"\n{t['requests']} requests: {t['ok']} ok, {t['dropped']} dropped by the client, {t['bad_400']} bad "
              f"requests answered 400, {t['unsupported']} unsupported (400 on structured / tool / loglik); "
              f"{out['structured_json']} structured answers and forced tool calls validated")
        print("by kind: " + "; ".join(f"{k} {v}" for k, v in sorted(out["by_kind"].items())))
        if server:
            print(f"server log: {server.log_path}")
        for c in checks:
            print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['check']}: {c['detail']}")
        print(f"verdict: {doc['verdict']}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
