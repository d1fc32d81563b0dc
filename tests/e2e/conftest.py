"""Live-server fixtures: `ascend-v4 serve` subprocesses on 127.0.0.1 (free ports, `--port 0`) over the tiny
dummy checkpoint, and an in-process uvicorn thread for tests that must reach into the engine.

Each server's stdout/stderr goes to a log file (never an unread pipe); a server that does not come up
within the start timeout fails the test with its log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")
pytest.importorskip("anthropic")

from ascend_v4.cli import command_line as cli  # noqa: E402
from ascend_v4.server.launch import serve_in_thread  # noqa: E402

START_TIMEOUT_S = 180
API_KEY = "sk-e2e"


class LiveServer:
    def __init__(self, args: list[str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # cwd outside the repo, so the checkout never shadows the installed package
        self.proc = subprocess.Popen([*cli(), "serve", "--port", "0", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     cwd=log_path.parent)
        self.url: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> LiveServer:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log())
            if m:
                self.url = m.group(1)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"server did not start (rc={self.proc.poll()}):\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """Build the tiny dummy once, before servers start (two servers must not both build it)."""
    from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint

    return ensure_dummy_checkpoint("tiny")


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    """Two servers started together: `main` (API key, room for 64 streams, 2048-token context) and
    `small` (no --model: the default tiny dummy; max_num_seqs 1 + max_queue 1 for backpressure; its last
    test sends Ctrl-C)."""
    d = tmp_path_factory.mktemp("serve")
    main = LiveServer(["--model", "tiny", "--api-key", API_KEY, "--max-num-seqs", "64", "--max-queue", "64",
                       "--max-model-len", "2048", "--no-access-log"], d / "main.log")
    small = LiveServer(["--max-num-seqs", "1", "--max-queue", "1", "--no-access-log"], d / "small.log")
    try:
        yield {"main": main.wait_ready(), "small": small.wait_ready()}
    finally:
        for s in (main, small):
            s.stop()




def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


@pytest.fixture(scope="session")
def metric():
    """metric(prometheus_text, name) -> value of an unlabelled series."""
    return _metric


@pytest.fixture(scope="session")
def in_thread():
    """serve_in_thread as a fixture: `with in_thread(app) as url: ...`."""
    return serve_in_thread
