"""Fixtures of the server unit tests: a scripted engine (forced model output, no model) and a live uvicorn
server in a thread, so the official SDKs can talk to `create_app` over real HTTP on 127.0.0.1.

The scripted engine stands in for `AsyncEngine` where a test needs output a random dummy model cannot
produce (DSML tool calls, `</think>`, stop sequences) or a failure on demand. It honours max_tokens,
stop strings at piece granularity and logprobs, and yields `StepOutput`s like the real engine.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from ascend_v4.runtime.async_engine import EngineDeadError, QueueFullError  # noqa: E402
from ascend_v4.runtime.engine import StepOutput  # noqa: E402
from ascend_v4.runtime.sampling import Sampled  # noqa: E402
from ascend_v4.server.launch import serve_in_thread  # noqa: E402
from ascend_v4.tokenizer import Tokenizer  # noqa: E402


class ScriptedEngine:
    """AsyncEngine look-alike. `script(prompt_ids, params) -> list[str]`: the text pieces to emit, one step
    each (each piece's token ids come from the real tokenizer). `fail_after`: raise EngineDeadError after
    that many steps of a request and stay dead. `step_delay`: seconds per step."""

    def __init__(self, tokenizer: Tokenizer, script=None, *, max_model_len: int = 4096, max_num_seqs: int = 8,
                 max_queue: int = 8, step_delay: float = 0.0):
        self.tokenizer = tokenizer
        self.script = script or (lambda ids, p: ["Hello", " world", "!"])
        self.engine = SimpleNamespace(
            tokenizer=tokenizer, max_model_len=max_model_len, max_running=max_num_seqs,
            model=SimpleNamespace(args=SimpleNamespace(vocab_size=tokenizer.vocab_size)),
            config=SimpleNamespace(max_num_seqs=max_num_seqs, max_queue=max_queue))
        self.step_delay = step_delay
        self.fail_after: int | None = None
        self.error: Exception | None = None
        self.in_flight = 0
        self.aborted = 0
        self.requests: list[tuple[list[int], object]] = []

    def check_ready(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error!r}")
        cfg = self.engine.config
        if self.in_flight >= cfg.max_num_seqs + cfg.max_queue:
            raise QueueFullError("full")

    async def generate(self, prompt_ids, params, request_id=None):
        self.check_ready()
        self.requests.append((list(prompt_ids), params))
        self.in_flight += 1
        finished = False
        try:
            pieces = list(self.script(prompt_ids, params))
            text, n = "", 0
            for k, piece in enumerate(pieces):
                await asyncio.sleep(self.step_delay)
                if self.fail_after is not None and k >= self.fail_after:
                    self.error = RuntimeError("injected failure")
                    raise EngineDeadError(f"engine failed: {self.error!r}")
                ids = self.tokenizer.encode(piece) or [self.tokenizer.eos_id]
                n += len(ids)
                reason, stop_reason, new = None, None, piece
                hit = next((s for s in params.stop if s in text + piece), None)
                if hit is not None:
                    full = text + piece
                    new, reason, stop_reason = full[:full.index(hit)][len(text):], "stop", hit
                elif n >= params.max_tokens:
                    reason = "length"
                elif k == len(pieces) - 1:
                    reason = "stop"
                text += new
                lps = [Sampled(t, -0.5, [(t, -0.5)] * (params.logprobs or 0)) for t in ids] \
                    if params.logprobs is not None else []
                finished = reason is not None
                yield StepOutput(request_id or "r", ids, new, finished, reason, stop_reason, lps,
                                 len(prompt_ids), 0, n)
                if finished:
                    return
        finally:
            self.in_flight -= 1
            if not finished and self.error is None:
                self.aborted += 1

    def health(self) -> dict:
        ok = self.error is None
        return {"healthy": ok, "reason": "" if ok else f"engine failed: {self.error!r}", "in_flight": self.in_flight}

    def stats(self) -> dict:
        return {"waiting": 0, "running": self.in_flight, "in_flight": self.in_flight, "blocks_used": 0,
                "blocks_total": 1, "cache_usage": 0.0, "prefix_hit_rate": 0.0, "aborted": self.aborted}

    async def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        return None




@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture
def scripted(tokenizer):
    """Factory: scripted(script=None, **kw) -> ScriptedEngine."""
    return lambda script=None, **kw: ScriptedEngine(tokenizer, script, **kw)


@pytest.fixture(scope="session")
def live():
    """serve_in_thread as a fixture: `with live(app) as url: ...`."""
    return serve_in_thread


SERVED_MODEL, SERVED_KEY = "deepseek-v4-flash", "sk-test"  # what `served` apps serve, and their API key


@pytest.fixture
def served(scripted, live):
    """start(script=None, config=None, **engine_kw) -> (engine, context manager yielding the server URL); the app
    serves SERVED_MODEL behind SERVED_KEY unless `config` says otherwise."""
    from ascend_v4.server.app import create_app
    from ascend_v4.server.serving import ServerConfig

    def start(script=None, config=None, **kw):
        eng = scripted(script, **kw)
        return eng, live(create_app(eng, config or ServerConfig(model_names=[SERVED_MODEL], api_key=SERVED_KEY)))
    return start
