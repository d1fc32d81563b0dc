"""Worker processes of a multi-rank engine as seen from rank 0: how one ended, its state, reaping them.
(`runtime/dist_engine.py` starts and watches them.)"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

from .distributed import destroy_process_groups


def how_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def proc_state(pid: int) -> str:
    """'stopped', 'running', ... from /proc (Linux); 'running' where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            code = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "running"
    return {"T": "stopped", "t": "stopped (traced)", "D": "in uninterruptible wait", "Z": "exiting"}.get(code,
                                                                                                       "running")


def reap(procs: list[subprocess.Popen], grace_s: float = 0.0) -> None:
    """Terminate (SIGTERM, then SIGKILL after grace_s) and reap every worker process. Safe to repeat."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            p.send_signal(signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
        except ProcessLookupError:
            pass
    t_end = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(max(0.0, t_end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    for p in procs:
        try:
            p.wait(5.0)
        except subprocess.TimeoutExpired:  # unkillable (D state): nothing more we can do
            pass


def finalize(procs: list[subprocess.Popen], stop: threading.Event, owns_pg: list[bool]) -> None:
    """Garbage collection or interpreter exit without shutdown(): stop everything this engine started."""
    stop.set()
    reap(procs)
    if owns_pg:
        destroy_process_groups()


__all__ = ["how_ended", "proc_state", "reap", "finalize"]
