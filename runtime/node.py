"""Multi-node runs: the same `ascend-v4 serve/generate ... --npus N --nnodes M --node-rank K` command on every
node. Node 0 runs rank 0 (the engine front, `DistEngine`) and its other local ranks; node K > 0 only starts its
N / M local ranks as worker processes (`runtime/worker.py`) and waits for them: they meet rank 0 at
MASTER_ADDR:MASTER_PORT, load their parts and step with it until it stops them (or fails).

torchrun-style variables are read as defaults: NNODES, NODE_RANK (or GROUP_RANK), MASTER_ADDR, MASTER_PORT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from .distributed import DEFAULT_INIT_TIMEOUT_S

# The caller's working directory must not shadow the installed package (code-style.md §7.1 trap 2).
WORKER_CMD = "import sys; sys.path[:1] = [] if sys.path[:1] == [''] else sys.path[:1]; " \
             "from ascend_v4.runtime.worker import main; main()"


@dataclass(frozen=True)
class NodeSpec:
    """Where this process sits among the nodes of one run."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @classmethod
    def from_env(cls, nnodes: int | None = None, node_rank: int | None = None, master_addr: str | None = None,
                 master_port: int | None = None) -> "NodeSpec":
        env = os.environ
        rank = node_rank if node_rank is not None else env.get("NODE_RANK", env.get("GROUP_RANK"))
        port = master_port if master_port is not None else env.get("MASTER_PORT")
        return cls(nnodes if nnodes is not None else int(env.get("NNODES", 1)), int(rank or 0),
                   master_addr or env.get("MASTER_ADDR"), int(port) if port else None)

    def check(self, npus: int) -> None:
        """ValueError naming the option that is wrong."""
        if self.nnodes < 1 or npus % self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes} must divide --npus {npus} (the same number of ranks per node)")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be in [0, --nnodes {self.nnodes})")
        if self.nnodes > 1 and (not self.master_addr or not self.master_port):
            raise ValueError("a multi-node run needs --master-addr (node 0's address) and --master-port on every node")

    def local_ranks(self, npus: int) -> range:
        per = npus // self.nnodes
        return range(self.node_rank * per, (self.node_rank + 1) * per)


def run_node(spec: NodeSpec, npus: int, init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S) -> int:
    """Node K > 0: start this node's ranks and wait for them. Returns 0 when all ended cleanly, else the first
    non-zero exit status. SIGINT / SIGTERM stop them."""
    spec.check(npus)
    ranks = spec.local_ranks(npus)
    procs = []
    for local, rank in enumerate(ranks):
        env = {**os.environ, "MASTER_ADDR": spec.master_addr, "MASTER_PORT": str(spec.master_port),
               "RANK": str(rank), "WORLD_SIZE": str(npus), "LOCAL_RANK": str(local),
               "LOCAL_WORLD_SIZE": str(len(ranks))}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER_CMD, "--watch-parent", str(os.getpid()),
                                       "--init-timeout", str(init_timeout_s)], env=env, stdin=subprocess.DEVNULL))

    def stop(signum, _frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return next((c for c in codes if c != 0), 0)


__all__ = ["NodeSpec", "run_node", "WORKER_CMD"]
