"""A worker rank that fails says so in one line naming the error (the traceback only with ASCEND_V4_DEBUG=1):
serve / generate print their workers' stderr, and users must never get a Python traceback."""

from __future__ import annotations

import os
import subprocess
import sys

from ascend_v4.runtime.node import WORKER_CMD


def _worker(debug: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", MASTER_ADDR="no.such.host.invalid", MASTER_PORT="29999",
               ASCEND_V4_DEBUG=debug)
    return subprocess.run([sys.executable, "-c", WORKER_CMD, "--init-timeout", "2"], env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_failing_worker_prints_one_line_and_the_traceback_only_in_debug():
    r = _worker("0")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ascend-v4 worker rank 1")]
    assert len(lines) == 1 and "no.such.host.invalid" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert "Traceback (most recent call last)" in _worker("1").stderr


def test_native_stdout_while_groups_connect_goes_to_stderr():
    """torch 2.10's Gloo writes "[Gloo] Rank r is connected ..." on file descriptor 1 while the groups connect
    (in every rank, workers included); `init_process_groups` sends fd 1 to stderr meanwhile, so machine-read stdout
    (`generate --json`) stays clean. Checked with a native write in a child process."""
    import subprocess
    import sys

    code = ("import os, sys\nfrom ascend_v4.runtime.distributed import _stdout_to_stderr\nprint('before', flush=True)\n"
            "with _stdout_to_stderr():\n    os.write(1, b'native line\\n')\n    print('python line')\n"
            "print('after')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n") == ["before", "after", ""]
    assert "native line" in r.stderr and "python line" in r.stderr
