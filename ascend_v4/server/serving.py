"""Server state shared by the routes: served model names, admission (backpressure), and running engine
requests with per-request metrics.

Admission is counted here, synchronously in the route before anything is awaited, so concurrent requests
cannot overshoot `max_num_seqs + max_queue` (AsyncEngine's own check happens later, at the first await).
A request with `n` choices takes n slots. Full -> 429 with Retry-After; engine dead or shutting down -> 503.

Shutdown: when the drain timeout of a graceful shutdown runs out, `ServerState.stop_requests()` sets the
state's `stopping` event. Open SSE responses (sse.SSEResponse) then end with their API's terminal error
events and non-streaming requests answer 503, so every connection closes before uvicorn would cancel its
task. Code reaches the event of the current request through `current_stopping()` (set per request by
`StopScopeMiddleware`).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from ascend_v4.chat.encoding import ENCODER_0731, ENCODER_APRIL
from ascend_v4.runtime.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from ascend_v4.runtime.engine import RequestError, StepOutput
from ascend_v4.runtime.sampling import SamplingParams

from .errors import APIError
from .metrics import ServerMetrics

# Model-name aliases of DeepSeek's API that fix the thinking mode (serving-notes §1.1, §2).
THINKING_ALIASES = {"deepseek-chat": False, "deepseek-reasoner": True}
THINK_END = "</think>"
SHUTDOWN_MESSAGE = "the server is shutting down and ended this request before it finished; retry it later or elsewhere"

# The `stopping` event of the ServerState serving the current request (StopScopeMiddleware sets it).
_STOPPING: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("ascend_v4_stopping", default=None)


def current_stopping() -> asyncio.Event | None:
    """The shutdown event of the server handling the current request (None outside a request)."""
    return _STOPPING.get()


class StopScopeMiddleware:
    """Plain ASGI middleware that makes `state.stopping` visible to the request's code (`current_stopping`)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        token = _STOPPING.set(self.state.stopping)
        try:
            await self.app(scope, receive, send)
        finally:
            _STOPPING.reset(token)


@dataclass
class ServerConfig:
    """What the HTTP layer needs to know beyond the engine.

    Attributes:
        model_names: served names; the first is reported in responses and /v1/models.
        api_key: required as `Authorization: Bearer` or `x-api-key` on /v1/*, /tokenize, /detokenize.
        require_reasoning_passback: DeepSeek's 400 for tool-call turns without reasoning_content.
        honor_sampling_in_thinking: apply temperature / top_p / penalties in thinking mode (DeepSeek ignores them).
        encoder_version: "april" or "0731" effort-preamble ladder of the chat encoder.
        default_max_tokens: output budget when a chat request gives none (bounded by the context).
        retry_after_s: Retry-After value of 429 answers.
        model_root: where the weights came from (shown in /v1/models).
    """

    model_names: list[str] = field(default_factory=lambda: ["ascend-v4"])
    api_key: str | None = None
    require_reasoning_passback: bool = False
    honor_sampling_in_thinking: bool = False
    encoder_version: str = ENCODER_APRIL
    default_max_tokens: int = 4096
    retry_after_s: int = 1
    model_root: str | None = None


def encoder_version_of(path: str | Path | None) -> str:
    """0731 ladder for checkpoints with DSpark heads (V4-Flash-0731 / V4-Pro-0813 carry `dspark_*` config
    keys, model-spec §13.1), April otherwise."""
    if path is None:
        return ENCODER_APRIL
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return ENCODER_APRIL
    return ENCODER_0731 if any(k.startswith("dspark") for k in cfg) else ENCODER_APRIL


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class Ticket:
    """Admission of one HTTP request (n engine slots); released exactly once."""

    def __init__(self, state: ServerState, n: int):
        self.state, self.n, self.arrival = state, n, time.monotonic()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.state.admitted -= self.n


class ServerState:
    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        core = engine.engine
        self.tokenizer = core.tokenizer
        self.max_model_len: int = core.max_model_len
        self.vocab_size: int = core.model.args.vocab_size
        self.capacity = core.max_running + core.config.max_queue  # max_num_seqs per DP group
        self.admitted = 0
        self.created = int(time.time())
        ids = self.tokenizer.encode(THINK_END)
        self.think_end_id = ids[0] if len(ids) == 1 else None
        self.metrics = ServerMetrics(engine.stats, engine.health)
        # Set when the drain timeout runs out: open streams end with an error event, new requests get 503.
        self.stopping = asyncio.Event()

    def stop_requests(self) -> None:
        """End every open request now (drain timeout reached); call on the server's event loop."""
        self.stopping.set()

    # -- names -------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.config.model_names[0]

    def resolve_model(self, name: str | None, *, anthropic: bool = False) -> bool | None:
        """Check a requested model name; return the thinking mode an alias forces (None = not forced).
        On /v1/messages every `claude*` name maps to the served model, as DeepSeek's Anthropic endpoint does."""
        if name is None or name in self.config.model_names:
            return None
        if name in THINKING_ALIASES:
            return THINKING_ALIASES[name]
        if anthropic and name.startswith("claude"):
            return None
        raise APIError(404, f"The model `{name}` does not exist. Served: {', '.join(self.model_names_all())}",
                       param="model", code="model_not_found")

    def model_names_all(self) -> list[str]:
        return [*self.config.model_names, *THINKING_ALIASES]

    # -- admission ---------------------------------------------------------------------------------------
    def admit(self, n: int = 1) -> Ticket:
        if self.stopping.is_set():
            raise APIError(503, SHUTDOWN_MESSAGE)
        try:
            self.engine.check_ready()
        except EngineDeadError as e:
            raise APIError(503, f"the engine is not available: {e}") from None
        except QueueFullError:
            pass  # counted below, with the same answer
        if self.admitted + n > self.capacity:
            raise APIError(429, f"server busy: {self.admitted} requests admitted, capacity {self.capacity} "
                                "(max_num_seqs + max_queue); retry later",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        self.admitted += n
        return Ticket(self, n)

    def check_prompt(self, ids: list[int], where: str = "prompt") -> None:
        """400 for prompts the engine would refuse (names both numbers for a too-long prompt)."""
        if not ids:
            raise APIError(400, f"{where} is empty", param=where)
        if len(ids) + 1 > self.max_model_len:
            raise APIError(400, f"prompt has {len(ids)} tokens; the maximum context length is {self.max_model_len} "
                                "(prompt plus at least one generated token)", param=where,
                           code="context_length_exceeded")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"{where}: token ids outside [0, {self.vocab_size}): {bad[:5]}", param=where)

    def max_tokens_for(self, requested: int | None, prompt_len: int, default: int | None = None) -> int:
        """The output budget: the request's, else the default, never beyond the context left."""
        room = self.max_model_len - prompt_len
        if requested is not None:
            return max(1, min(requested, room))
        return max(1, min(default or self.config.default_max_tokens, room))

    # -- running -----------------------------------------------------------------------------------------
    async def generate(self, ticket: Ticket, jobs: list[tuple[list[int], SamplingParams]],
                       request_id: str) -> AsyncIterator[tuple[int, StepOutput]]:
        """Run one engine request per (prompt ids, params) job (the choices); yield (choice index, delta) as
        they come. Leaving early aborts every choice. Releases the ticket at the end."""
        try:
            if len(jobs) == 1:
                async for out in self._one(*jobs[0], request_id, ticket.arrival):
                    yield 0, out
                return
            q: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, ids: list[int], p: SamplingParams) -> None:
                try:
                    async for out in self._one(ids, p, f"{request_id}-{i}", ticket.arrival):
                        q.put_nowait((i, out))
                    q.put_nowait((i, None))
                except Exception as e:  # noqa: BLE001 - handed to the consumer
                    q.put_nowait((i, e))

            tasks = [asyncio.create_task(pump(i, ids, p)) for i, (ids, p) in enumerate(jobs)]
            try:
                done = 0
                while done < len(tasks):
                    i, item = await q.get()
                    if item is None:
                        done += 1
                    elif isinstance(item, Exception):
                        raise item
                    else:
                        yield i, item
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            ticket.release()

    async def _one(self, prompt_ids: list[int], params: SamplingParams, rid: str,
                   arrival: float) -> AsyncIterator[StepOutput]:
        first: float | None = None
        n, reason = 0, "disconnect"
        try:
            async for out in self.engine.generate(prompt_ids, params, request_id=rid):
                if first is None and out.new_token_ids:
                    first = time.monotonic()
                n = out.completion_tokens
                if out.finished:
                    reason = out.finish_reason or "stop"
                yield out
        except (EngineDeadError, RequestError, QueueFullError):
            reason = "error"
            raise
        finally:
            if reason == "disconnect" and self.stopping.is_set():
                reason = "abort"  # ended by the server's shutdown, not by the client
            self.metrics.observe_request(reason, arrival, first, time.monotonic(), n)


async def wait_disconnect(receive) -> None:
    """Return when the client has gone (the request body must already be read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(receive, coro):
    """Await `coro` (a whole non-streaming generation); if the client disconnects first, cancel it (which
    aborts the engine requests) and return None. If the server's drain timeout runs out first, cancel it
    and raise APIError(503)."""
    task = asyncio.ensure_future(coro)
    watches = [asyncio.ensure_future(wait_disconnect(receive))]
    stopping = current_stopping()
    if stopping is not None:
        watches.append(asyncio.ensure_future(stopping.wait()))
    try:
        await asyncio.wait({task, *watches}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for w in watches:
            w.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
    if task.cancelled():
        if stopping is not None and stopping.is_set():
            raise APIError(503, SHUTDOWN_MESSAGE)
        return None
    return task.result()


def engine_error(e: Exception) -> APIError:
    """Map an engine exception raised while running to the HTTP error of a non-streaming answer."""
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), headers={"Retry-After": "1"})
    if isinstance(e, RequestError):
        return APIError(400, str(e))
    return APIError(503, f"the engine failed: {e}")
