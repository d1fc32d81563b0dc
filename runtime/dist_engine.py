"""Rank 0 of an expert-parallel engine: the `Engine` interface (add_request / abort / step / has_unfinished /
stats / config / generate), driving N ranks that each own E/N routed experts.

    engine = DistEngine(path, ModelOptions(...), EngineConfig(), ParallelConfig(world_size=4))
    engine.add_request("r1", ids, SamplingParams(max_tokens=16))
    while engine.has_unfinished():
        outs = engine.step()
    engine.shutdown()

Layout (runtime/layout.py): DP groups of TP consecutive ranks. The ranks of a TP group hold the same `Engine`
state (SPMD); each DP group has its own engine and requests. Rank 0 takes requests (validated by its own engine at
once) and routes each to the DP group with the fewest unfinished requests (lowest group on a tie); at each step it
broadcasts the add/abort commands taken since the last step (tagged with their group), every rank applies its
group's and steps; the MoE layers exchange tokens with all-to-all collectives over every rank (an idle group
steps an empty batch), a TP group's sampled tokens are its leader's (`Engine.token_sync`), and with several DP
groups the leaders' step outputs are gathered on rank 0.

Failure handling: every collective has the process-group timeout (`ParallelConfig.timeout_s`); worker processes
are checked before and after each step and, while idle, every second by a heartbeat thread that also pings the
workers. A worker that dies or hangs makes `step()` raise `WorkerError` naming the rank and how it ended, within
`timeout_s` (a killed worker: at the next collective, typically well under a second); the remaining workers are
then killed, and every later `step()` raises the same error (`AsyncEngine` marks itself dead, fails in-flight
requests, `health()` reports it). `shutdown()`, garbage collection and interpreter exit terminate the workers;
workers also exit when this process dies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from ascend_v4.model.layers import ModelOptions
from ascend_v4.tokenizer import Tokenizer

from .config import EngineConfig
from .speculative import spec_ratios
from .distributed import (SPEC_KEY, ParallelConfig, ParallelContext, broadcast_object, create_store,
                          destroy_process_groups, init_process_groups, put_object, ready_key)
from .dp_router import DPRouter
from .engine import Engine, RequestError, StepOutput
from .generate import run_to_completion
from .node import WORKER_CMD
from .processes import finalize, how_ended, proc_state, reap
from .sampling import SamplingParams
from .worker import (INFO, PING, STEP, STOP, RankSpec, build_rank_model, load_tokenizer, make_engine, rank_info,
                     step_group)

_POLL_S = 0.05
_LIVENESS_S = 1.0  # idle liveness check period (the heartbeat ping itself is every heartbeat_interval)


class WorkerError(RuntimeError):
    """A rank of the expert-parallel engine died, hung or failed; the engine cannot continue."""


def _heartbeat_loop(ref: "weakref.ref[DistEngine]", stop: threading.Event, period: float) -> None:
    while not stop.wait(period):
        engine = ref()
        if engine is None:
            return
        engine._idle_tick()
        del engine


def aggregate_stats(groups: list[dict]) -> dict:
    """One server's engine stats from its DP groups' `Engine.stats()`: numbers summed (queue lengths, blocks,
    bytes, token and request counters), the ratios recomputed from the sums (cache usage, prefix hit rate)."""
    if len(groups) == 1:
        return dict(groups[0])
    out = {k: sum(g[k] for g in groups) for k, v in groups[0].items() if isinstance(v, (int, float))}
    for k in ("spec_position_reached", "spec_position_accepted"):  # per draft position, summed position-wise
        n = max(len(g.get(k, ())) for g in groups)
        out[k] = [sum(g[k][j] for g in groups if j < len(g.get(k, ()))) for j in range(n)]
    out = spec_ratios(out)
    out["cache_usage"] = out["blocks_used"] / out["blocks_total"] if out["blocks_total"] else 0.0
    q = out.get("prefix_query_tokens", 0)
    out["prefix_hit_rate"] = out.get("prefix_hit_tokens", 0) / q if q else 0.0
    return out


class DistEngine:
    """Rank 0 of an N-rank expert-parallel engine (N - 1 local worker processes started here, or fewer with
    other nodes joining through MASTER_ADDR / MASTER_PORT; see `runtime/worker.py`)."""

    def __init__(self, model_path: str, options: ModelOptions, config: EngineConfig | None = None,
                 parallel: ParallelConfig | None = None, *, device_type: str = "cpu",
                 tokenizer_dir: str | None = None, tokenizer: Tokenizer | None = None):
        self.parallel = p = parallel or ParallelConfig()
        self._procs: list[subprocess.Popen] = []
        self._ranks: dict[int, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._pending: list[tuple] = []
        self._group: dict[str, int] = {}  # unfinished request id -> its DP group
        self._load = [0] * p.dp  # unfinished requests per DP group
        self._group_stats: list[dict] = []  # every group's engine stats after the last step (dp > 1)
        self._usage: dict[str, tuple[int, int, int]] = {}  # request -> (prompt, cached, completion) tokens so far
        config = config or EngineConfig()
        self.router = DPRouter(p.dp, config.block_size, prefix_aware=config.enable_prefix_caching,
                               slack=max(1, config.max_num_seqs // 2))
        self.error: WorkerError | None = None
        self._closed = False
        self.ctx: ParallelContext | None = None
        self._owns_pg: list[bool] = []  # [True] once this engine created the process groups
        self._finalizer = weakref.finalize(self, finalize, self._procs, self._stop, self._owns_pg)
        self.store = create_store(0, p.world_size, p.master_addr, p.master_port, p.init_timeout_s)
        self.parallel = p = p.with_port(self.store.port)
        spec = RankSpec(str(Path(model_path).resolve()), options, config, p, device_type,
                        str(tokenizer_dir) if tokenizer_dir else None)
        self.spec = spec
        try:
            put_object(self.store, SPEC_KEY, spec)
            for r in range(1, p.local_procs):
                self._spawn(r)
            if device_type == "cpu":
                torch.set_num_threads(p.cpu_threads())
            model = build_rank_model(spec, 0, 0)
            tokenizer = tokenizer or load_tokenizer(spec)
            self._wait_ready()
            self.ctx = init_process_groups(self.store, 0, p.world_size, 0, device_type=device_type,
                                           timeout_s=p.timeout_s, tp=p.tp)
            self._owns_pg.append(True)
            self.engine: Engine = make_engine(model, tokenizer, spec, self.ctx)
        except BaseException:
            self._close(graceful=False)
            raise
        self._last_sync = time.monotonic()
        self._beat = threading.Thread(target=_heartbeat_loop, args=(weakref.ref(self), self._stop, _LIVENESS_S),
                                      name="ascend-v4-ep-heartbeat", daemon=True)
        self._beat.start()

    # -- start-up -----------------------------------------------------------------------------------------
    def _spawn(self, rank: int) -> None:
        p = self.parallel
        env = {**os.environ, "MASTER_ADDR": p.master_addr, "MASTER_PORT": str(p.master_port), "RANK": str(rank),
               "WORLD_SIZE": str(p.world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(p.local_procs)}
        if self.spec.device_type == "cpu":
            env["OMP_NUM_THREADS"] = str(p.cpu_threads())
        # own session: a terminal's Ctrl-C reaches rank 0 only, which then shuts the workers down.
        cmd = [sys.executable, "-c", WORKER_CMD, "--watch-parent", str(os.getpid()),
               "--init-timeout", str(p.init_timeout_s)]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs.append(proc)
        self._ranks[rank] = proc

    def _wait_ready(self) -> None:
        p = self.parallel
        pending = set(range(1, p.world_size))
        t_end = time.monotonic() + p.init_timeout_s
        while pending:
            for r in sorted(pending):
                if self.store.check([ready_key(r)]):
                    status = self.store.get(ready_key(r)).decode()
                    if status != "ok":
                        raise WorkerError(f"rank {r} failed to start: {status}")
                    pending.discard(r)
            dead = [r for r in pending if r in self._ranks and self._ranks[r].poll() is not None]
            if dead:
                r = dead[0]
                if self.store.check([ready_key(r)]):
                    continue  # it reported before exiting: raise its message on the next pass
                raise WorkerError(f"rank {r} (pid {self._ranks[r].pid}) {how_ended(self._ranks[r].returncode)} "
                                  "during start-up (see its output above)")
            if time.monotonic() > t_end:
                raise WorkerError(f"ranks {sorted(pending)} not ready after init_timeout_s={p.init_timeout_s}s")
            time.sleep(_POLL_S)

    # -- Engine interface ------------------------------------------------------------------------------------
    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def model(self):
        return self.engine.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_running(self) -> int:
        """Sequences running at once over all DP groups (max_num_seqs each)."""
        return self.engine.config.max_num_seqs * self.parallel.dp

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Validated here at once (RequestError as from `Engine`) and routed to a DP group (`DPRouter`: the least
        loaded, or the one whose prefix cache likely holds the prompt's first blocks); the workers get it at the
        next step. Never raises WorkerError (the failure surfaces at `step()`)."""
        with self._lock:
            if request_id in self._group:
                raise RequestError(f"request id {request_id!r} is already in use")
            self.engine.validate(prompt_ids, params)  # every group's engine adds it at the next step
            g = self.router.route(list(prompt_ids), self._load)
            self._group[request_id] = g
            self._usage[request_id] = (len(prompt_ids), 0, 0)
            self._load[g] += 1
            self._pending.append(("add", g, request_id, list(prompt_ids), params))

    def abort(self, request_id: str) -> StepOutput | None:
        with self._lock:
            g = self._group.pop(request_id, None)
            if g is None:
                return None
            self._load[g] -= 1
            self._pending.append(("abort", g, request_id))
            prompt, cached, done = self._usage.pop(request_id)
            out = self.engine.abort(request_id) if g == 0 else None  # rank 0's own group: at once
            # another group's request ends at its next step there; its usage so far is known here
            return out or StepOutput(request_id, [], "", True, "abort", prompt_tokens=prompt, cached_tokens=cached,
                                     completion_tokens=done)

    def has_unfinished(self) -> bool:
        return bool(self._group)

    def step(self) -> list[StepOutput]:
        """One step on every rank. Raises WorkerError (within `timeout_s`) when a rank died or hung."""
        with self._lock:
            if self.error is not None:
                raise self.error
            if self._closed:
                raise WorkerError("the expert-parallel engine was shut down")
            if self._dead():
                raise self._fail("a worker exited before the step")
            cmds, self._pending = self._pending, []
            try:
                broadcast_object(self.ctx, (STEP, cmds))
                outs, group_stats = step_group(self.engine, self.ctx, cmds)
            except Exception as e:  # noqa: BLE001 - a collective or the step failed: the ranks are out of step
                raise self._fail(f"step failed: {type(e).__name__}: {e}") from e
            if group_stats is not None:
                self._group_stats = group_stats
            outs = [o for o in outs if o.request_id in self._group]  # not aborted meanwhile
            for o in outs:
                self._usage[o.request_id] = (o.prompt_tokens, o.cached_tokens, o.completion_tokens)
                if o.finished:
                    self._load[self._group.pop(o.request_id)] -= 1
                    self._usage.pop(o.request_id, None)
            self._last_sync = time.monotonic()
            if self._dead():
                raise self._fail("a worker exited during the step")
            return outs

    def stats(self) -> dict:
        """The engine counters of the whole server: with several DP groups, every group's counters and gauges
        summed (each group leader's, as of the last step; rank 0's own group live), ratios recomputed from the
        sums, and the per-group figures under "per_dp_group"; plus the layout and each group's unfinished
        requests."""
        p = self.parallel
        own = self.engine.stats()
        groups = [own, *self._group_stats[1:]] if len(self._group_stats) == p.dp else [own]
        return {**aggregate_stats(groups), "world_size": p.world_size, "tp": p.tp, "dp": p.dp,
                "unfinished_per_dp_group": list(self._load), "dp_prefix_routed": self.router.prefix_routed,
                "experts_per_rank": self.engine.model.args.n_routed_experts // p.world_size,
                **({"per_dp_group": groups} if p.dp > 1 else {})}

    def health(self) -> dict:
        ok = self.error is None and not self._closed
        return {"healthy": ok, "reason": "" if ok else str(self.error or "shut down"),
                "world_size": self.parallel.world_size, "worker_pids": self.worker_pids}

    def rank_info(self) -> list[dict]:
        """Per rank (0 first): its routed expert ids, parameter count, pid (a collective: between steps)."""
        with self._lock:
            if self.error is not None:
                raise self.error
            try:
                broadcast_object(self.ctx, (INFO,))
                out: list = [None] * self.parallel.world_size
                dist.gather_object(rank_info(self.engine.model, 0), out, dst=0, group=self.ctx.cpu_group)
            except Exception as e:  # noqa: BLE001
                raise self._fail(f"rank_info failed: {type(e).__name__}: {e}") from e
            self._last_sync = time.monotonic()
            return out

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[StepOutput]]:
        """Run requests to completion (offline use); returns every step output per request."""
        return run_to_completion(self, prompts, params)

    # -- failure handling -------------------------------------------------------------------------------------
    def _dead(self) -> list[tuple[int, subprocess.Popen]]:
        return [(r, p) for r, p in self._ranks.items() if p.poll() is not None]

    def _fail(self, reason: str) -> WorkerError:
        """Record the failure (naming the ranks at fault), kill the workers, drop the process groups.
        Called with the lock held."""
        timed_out = "timed out" in reason.lower()
        if not self._dead() and not timed_out:  # a peer's socket closes a moment before its status is reapable
            t_end = time.monotonic() + 0.5
            while not self._dead() and time.monotonic() < t_end:
                time.sleep(0.02)
        ended = {r: p.returncode for r, p in self._dead()}
        pid = {r: p.pid for r, p in self._ranks.items()}
        killed = [f"rank {r} (pid {pid[r]}) {how_ended(c)}" for r, c in sorted(ended.items()) if c < 0]
        exited = [f"rank {r} (pid {pid[r]}) {how_ended(c)}" for r, c in sorted(ended.items()) if c >= 0]
        parts = killed[:]
        if timed_out or not ended:
            alive = [f"rank {r} (pid {pid[r]}, {proc_state(pid[r])})" for r in sorted(self._ranks) if r not in ended]
            parts.append(f"a rank did not respond within timeout_s={self.parallel.timeout_s}s (hung, or a remote "
                         f"node failed); still running: {', '.join(alive) or 'none here'}")
        if exited:  # usually a consequence: their own collective with the faulty rank failed
            parts.append(", ".join(exited))
        self.error = WorkerError(f"expert-parallel engine ({self.parallel.world_size} ranks) failed: "
                                 f"{'; '.join(parts)}; {reason}")
        self._stop.set()
        reap(self._procs)
        self._drop_groups()
        return self.error

    def _idle_tick(self) -> None:
        """Heartbeat thread: liveness check every second; ping the workers when no step ran for a while."""
        if not self._lock.acquire(blocking=False):
            return  # a step (or shutdown) is running: it checks for itself
        try:
            if self.error is not None or self._closed:
                return
            if self._dead():
                self._fail("a worker exited while the engine was idle")
                return
            if time.monotonic() - self._last_sync >= self.parallel.heartbeat_interval:
                try:
                    broadcast_object(self.ctx, (PING,))
                except Exception as e:  # noqa: BLE001
                    self._fail(f"heartbeat failed: {type(e).__name__}: {e}")
                    return
                self._last_sync = time.monotonic()
        finally:
            self._lock.release()

    # -- shutdown ------------------------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every worker (gracefully when healthy) and free the process groups. Idempotent; bounded by
        about `timeout` seconds even when a step is stuck in a collective."""
        self._stop.set()
        got = self._lock.acquire(timeout=timeout)
        if not got:  # a step is blocked in a collective: killing the workers makes it fail now
            reap(self._procs)
            got = self._lock.acquire(timeout=timeout)
        try:
            self._close(graceful=self.error is None, timeout=timeout)
        finally:
            if got:
                self._lock.release()

    def _close(self, graceful: bool, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if graceful and self.ctx is not None and not self._dead():
            try:
                broadcast_object(self.ctx, (STOP,))
                t_end = time.monotonic() + timeout
                for p in self._procs:
                    p.wait(max(0.0, t_end - time.monotonic()))
            except Exception:  # noqa: BLE001 - fall through to killing them
                pass
        reap(self._procs, grace_s=2.0 if graceful else 0.0)
        self._drop_groups()
        self.ctx = None
        self.store = None
        self._finalizer.detach()

    def _drop_groups(self) -> None:
        if self._owns_pg:  # never a process group this engine did not create
            self._owns_pg.clear()
            destroy_process_groups()

    def __enter__(self) -> "DistEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


__all__ = ["DistEngine", "WorkerError", "aggregate_stats"]
