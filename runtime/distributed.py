"""Process groups for multi-device (expert-parallel) runs: settings, rendezvous, teardown.

One rank per device. Rank 0 lives in the caller's process (it owns the request API); ranks 1..N-1 are worker
processes (`runtime/worker.py`). Rendezvous goes through a `TCPStore` hosted by rank 0 at MASTER_ADDR:MASTER_PORT
(torchrun-style names; port 0 = any free port on a single node), which also carries the start-up handshake
(run spec, per-rank "ready" reports). Then `torch.distributed` is initialised on that store with the platform's
backend (HCCL on NPUs, NCCL on GPUs, Gloo on CPU) and a timeout that bounds every collective: a rank that dies or
hangs makes the others' next collective fail within `ParallelConfig.timeout_s` (a killed process much sooner:
its sockets close).

No module globals hold parallel state (code-style.md habit 3): `init_process_groups` returns a frozen
`ParallelContext` that callers pass on. torch.distributed itself keeps one default process group per process,
so a process hosts at most one multi-rank engine at a time (`destroy_process_groups` frees it).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from ascend_v4.platform import COMM_BACKENDS

from .layout import check_engine_tp

DEFAULT_TIMEOUT_S = 120.0  # any collective; bound on detecting a dead or hung rank
DEFAULT_INIT_TIMEOUT_S = 900.0  # start-up: connecting, loading weights on every rank
_PG_PREFIX = "pg"  # process-group keys in the shared store, apart from the handshake keys


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks and how they meet.

    Attributes:
        world_size: ranks in total (`--npus N`); each owns `n_routed_experts / world_size` routed experts.
        tp: attention tensor-parallel size (`--tp T`): ranks r with the same r // T form one TP group, each
            holding 1/T of the query heads, output groups and vocab (ascend_v4/model/tp.py); the world_size / T
            TP groups are attention data-parallel groups, each with its own scheduler and requests.
        nproc_per_node: ranks started on this node, rank 0 included (default: all of them; a multi-node run
            sets it, or LOCAL_WORLD_SIZE, and starts the other nodes' ranks with `python -m
            ascend_v4.runtime.worker`).
        master_addr / master_port: where rank 0 hosts the rendezvous store (MASTER_ADDR / MASTER_PORT; port 0
            picks a free port, single node only).
        timeout_s: bound on any collective, hence on detecting a dead or hung worker.
        init_timeout_s: bound on start-up (every rank connected and loaded).
        heartbeat_s: when idle, rank 0 pings the workers this often (default timeout_s / 4), so that idle
            workers do not time out and a worker that died while idle is noticed.
        threads_per_rank: CPU intra-op threads of each rank (default: cpu_count // nproc_per_node, at least 1);
            ignored on NPU / GPU.
    """

    world_size: int = 1
    tp: int = 1
    nproc_per_node: int | None = None
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S
    heartbeat_s: float | None = None
    threads_per_rank: int | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"ParallelConfig.world_size must be >= 1, got {self.world_size}")
        check_engine_tp(None, self.world_size, self.tp)
        if self.nproc_per_node is not None and not 1 <= self.nproc_per_node <= self.world_size:
            raise ValueError(f"ParallelConfig.nproc_per_node must be in [1, world_size={self.world_size}], "
                             f"got {self.nproc_per_node}")
        if self.local_procs < self.world_size and self.master_port == 0:
            raise ValueError("a multi-node run needs a fixed MASTER_PORT (master_port) for the other nodes")
        if self.timeout_s <= 0 or self.init_timeout_s <= 0:
            raise ValueError("ParallelConfig timeouts must be > 0")

    @classmethod
    def from_env(cls, world_size: int, **overrides: Any) -> "ParallelConfig":
        """Settings from torchrun-style variables (MASTER_ADDR, MASTER_PORT, LOCAL_WORLD_SIZE), then overrides."""
        kw: dict[str, Any] = {"world_size": world_size}
        if os.environ.get("MASTER_ADDR"):
            kw["master_addr"] = os.environ["MASTER_ADDR"]
        if os.environ.get("MASTER_PORT"):
            kw["master_port"] = int(os.environ["MASTER_PORT"])
        if os.environ.get("LOCAL_WORLD_SIZE"):
            kw["nproc_per_node"] = min(int(os.environ["LOCAL_WORLD_SIZE"]), world_size)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def local_procs(self) -> int:
        return self.nproc_per_node or self.world_size

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_s or self.timeout_s / 4

    def cpu_threads(self) -> int:
        return self.threads_per_rank or max(1, (os.cpu_count() or 1) // self.local_procs)

    def with_port(self, port: int) -> "ParallelConfig":
        return replace(self, master_port=port)


@dataclass(frozen=True)
class ParallelContext:
    """What a rank knows about the run; passed to the components that communicate (never a global).

    Attributes:
        rank / world_size / local_rank: this rank, the number of ranks, its index on its node (device index).
        backend: torch.distributed backend of `group` (hccl, nccl, gloo).
        device: this rank's torch device ("cpu", "cuda:1", "npu:3").
        group: process group for tensors (expert dispatch / combine).
        tp_group / tp_rank / tp_size: this rank's attention tensor-parallel group (ranks r // tp_size equal) and
            its place in it; tp_group is None when tp_size is 1. tp_cpu_group: the same ranks on Gloo (sampled
            tokens); dp_rank = rank // tp_size is the rank's attention data-parallel group.
        cpu_group: Gloo process group for Python objects (commands, sampled tokens); `group` itself on CPU.
        timeout_s: the collectives' timeout.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str
    group: Any
    cpu_group: Any
    timeout_s: float
    tp_group: Any = None
    tp_rank: int = 0
    tp_size: int = 1
    tp_cpu_group: Any = None

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def tp_leader(self) -> int:
        """Global rank of this rank's TP group leader (TP rank 0)."""
        return self.dp_rank * self.tp_size


def rank_device(device_type: str, local_rank: int) -> str:
    return "cpu" if device_type == "cpu" else f"{device_type}:{local_rank}"


def create_store(rank: int, world_size: int, addr: str, port: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0 hosts the store (port 0: any free port, read back from `.port`); other ranks connect to it."""
    return dist.TCPStore(addr, port, world_size, is_master=rank == 0,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send what native code writes on file descriptor 1 to 2 for a while: torch 2.10's Gloo prints "[Gloo] Rank r
    is connected to n peer ranks" on stdout while connecting, which would corrupt machine-read output such as
    `generate --json` (torch_npu's 2.10 line is what Atlas users run)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def init_process_groups(store: dist.Store, rank: int, world_size: int, local_rank: int, *, device_type: str,
                        timeout_s: float, tp: int = 1) -> ParallelContext:
    """Join the default process group on `store` with the platform's backend for `device_type`, and create the
    attention TP groups of `tp` consecutive ranks (every rank creates every group, as torch requires).

    Raises:
        RuntimeError: this process already has a default process group.
    """
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process: one multi-rank engine "
                           "per process (shut the other one down first)")
    backend = COMM_BACKENDS[device_type]  # type: ignore[index]
    device = rank_device(device_type, local_rank)
    if device_type != "cpu":
        getattr(torch, device_type).set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    with _stdout_to_stderr():  # the groups connect here
        dist.init_process_group(backend, store=dist.PrefixStore(_PG_PREFIX, store), rank=rank, world_size=world_size,
                                timeout=timeout)
        group = dist.group.WORLD
        cpu_group = group if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        tp_group = tp_cpu = None
        if tp > 1:
            for first in range(0, world_size, tp):
                ranks = list(range(first, first + tp))
                g = group if tp == world_size else dist.new_group(ranks, timeout=timeout)
                gc = cpu_group if tp == world_size else g if backend == "gloo" else \
                    dist.new_group(ranks, backend="gloo", timeout=timeout)
                if first <= rank < first + tp:
                    tp_group, tp_cpu = g, gc
    return ParallelContext(rank, world_size, local_rank, backend, device, group, cpu_group, timeout_s,
                           tp_group, rank % tp, tp, tp_cpu)


def destroy_process_groups() -> None:
    """Free this process's process groups (safe to call when none exist or after a failed collective)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group broken by a dead peer is being dropped anyway
            pass


def broadcast_object(ctx: ParallelContext, obj: Any = None) -> Any:
    """Rank 0's `obj` on every rank (pickled over the Gloo group)."""
    buf = [obj]
    dist.broadcast_object_list(buf, src=0, group=ctx.cpu_group)
    return buf[0]


# torch's single-tensor all-gather (its name changed across versions): out [size * n, ...] <- every rank's [n, ...]
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def broadcast_in_tp_group(ctx: ParallelContext, obj: Any = None) -> Any:
    """The TP group leader's `obj` on every rank of the group (Gloo)."""
    buf = [obj]
    dist.broadcast_object_list(buf, src=ctx.tp_leader, group=ctx.tp_cpu_group)
    return buf[0]


def gather_to_driver(ctx: ParallelContext, obj: Any) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    out = [None] * ctx.world_size if ctx.is_driver else None
    dist.gather_object(obj, out, dst=0, group=ctx.cpu_group)
    return out


# -- start-up handshake keys in the store ------------------------------------------------------------
SPEC_KEY = "ascend_v4/spec"


def ready_key(rank: int) -> str:
    return f"ascend_v4/ready/{rank}"


def put_object(store: dist.Store, key: str, obj: Any) -> None:
    store.set(key, pickle.dumps(obj))


def get_object(store: dist.Store, key: str) -> Any:
    return pickle.loads(store.get(key))


__all__ = ["ParallelConfig", "ParallelContext", "init_process_groups", "destroy_process_groups", "create_store",
           "broadcast_object", "broadcast_in_tp_group", "gather_to_driver", "all_gather_into", "rank_device", "SPEC_KEY", "ready_key", "put_object", "get_object"]
