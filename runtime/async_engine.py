"""Asyncio front of the engine, for the server: submit, stream deltas, abort, health, stats, shutdown.

One background thread owns the `Engine` and runs steps while there is work; asyncio callers talk to it
through a command queue, and receive `StepOutput`s on a per-request asyncio queue. A consumer that stops
iterating (client disconnect, cancellation) aborts its request, which frees its cache at the next command
drain (before the next step). If a step raises, the engine is marked dead: every open stream gets
`EngineDeadError`, and so does every later request; `health()` reports it. A step running longer than
`EngineConfig.step_timeout_s` makes `health()` report a hang.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator

from .engine import Engine, RequestError, StepOutput
from .sampling import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine failed and cannot serve requests."""


class QueueFullError(RuntimeError):
    """More requests than max_num_seqs + max_queue are in flight."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.error: BaseException | None = None
        self._stopping = False
        self._accepting = True
        self._step_started: float | None = None
        self._thread = threading.Thread(target=self._run, name="ascend-v4-engine", daemon=True)
        self._thread.start()

    # -- public API (event loop side) --------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def check_ready(self) -> None:
        """Raise EngineDeadError / QueueFullError when a new request would be refused."""
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error!r}")
        if not self._accepting:
            raise EngineDeadError("engine is shutting down")
        cfg = self.engine.config
        if self.in_flight >= self.engine.max_running + cfg.max_queue:
            raise QueueFullError(f"{self.in_flight} requests in flight (running {self.engine.max_running}: "
                                 f"max_num_seqs x DP groups, + max_queue {cfg.max_queue})")

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StepOutput]:
        """Submit a request and yield its deltas until it finishes. Leaving early aborts it."""
        self.check_ready()
        rid = request_id or f"req-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._streams:
                raise RequestError(f"request id {rid!r} is already in use")
            self._streams[rid] = (asyncio.get_running_loop(), q)
        self._send(("add", rid, list(prompt_ids), params))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Abort a request: its stream slot is released now, its cache before the next engine step."""
        with self._lock:
            self._streams.pop(request_id, None)
        self._send(("abort", request_id))

    def health(self) -> dict:
        started = self._step_started
        stuck = started is not None and time.monotonic() - started > self.engine.config.step_timeout_s
        ok = self.error is None and self._thread.is_alive() and not stuck
        reason = (f"engine failed: {self.error!r}" if self.error is not None else
                  "engine thread is not running" if not self._thread.is_alive() else
                  "a step has been running longer than step_timeout_s" if stuck else "")
        return {"healthy": ok, "reason": reason, "in_flight": self.in_flight}

    def stats(self) -> dict:
        return {**self.engine.stats(), "in_flight": self.in_flight}

    async def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting requests; with `drain`, wait (up to timeout) for in-flight ones; stop the thread."""
        self._accepting = False
        t_end = time.monotonic() + timeout
        while drain and self._streams and time.monotonic() < t_end and self.error is None:
            await asyncio.sleep(0.05)
        self._stopping = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)

    # -- engine thread -----------------------------------------------------------------------------------
    def _send(self, cmd: tuple) -> None:
        self._cmds.put(cmd)
        self._wake.set()

    def _push(self, rid: str, item) -> None:
        with self._lock:
            target = self._streams.get(rid)
            if target is not None and (isinstance(item, BaseException) or item.finished):
                del self._streams[rid]
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params = cmd
                if rid not in self._streams:  # aborted before it was added
                    continue
                try:
                    self.engine.add_request(rid, ids, params)
                except RequestError as e:
                    self._push(rid, e)
            elif cmd[0] == "abort":
                self.engine.abort(cmd[1])

    def _run(self) -> None:
        while not self._stopping:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            self._step_started = time.monotonic()
            try:
                outs = self.engine.step()
            except BaseException as e:  # noqa: BLE001 - any failure kills the engine, reported to all
                self.error = e
                with self._lock:
                    rids = list(self._streams)
                for rid in rids:
                    self._push(rid, EngineDeadError(f"engine failed: {e!r}"))
                return
            finally:
                self._step_started = None
            for o in outs:
                self._push(o.request_id, o)
