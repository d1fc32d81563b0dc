"""A 2-minute soak of `ascend-v4 serve --model tiny` (tools/soak_serve.py): mixed OpenAI / Anthropic load at
concurrency 8 with client disconnects, shared prefixes, structured-output and prompt-log-prob requests and bad
bodies; server RSS, fds, threads and p99 latency must stay within the tool's bounds after the warm-up, cache
blocks must return to 0 when idle and the server must exit 0 on Ctrl-C. The 30-minute run on `small` is the
same tool without arguments (docs/serving.md, "Soak and real clients").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx2")
pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

TOOL = Path(__file__).resolve().parents[2] / "tools" / "soak_serve.py"
DURATION_S = 120


def test_soak_two_minutes_tiny(tiny_checkpoint, tmp_path):
    cmd = [sys.executable, str(TOOL), "--model", "tiny", "--duration", str(DURATION_S), "--interval", "15",
           "--json", "--log-dir", str(tmp_path)]
    # start (s) + load + drain of the last requests + idle wait + shutdown, with room for a busy CI machine
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=DURATION_S + 300, cwd=tmp_path)
    assert p.stdout.strip(), f"no JSON on stdout (rc={p.returncode}):\n{p.stderr[-4000:]}"
    doc = json.loads(p.stdout)
    failed = [c for c in doc["checks"] if not c["ok"]]
    assert p.returncode == 0 and doc["verdict"] == "PASS" and not failed, (
        f"soak failed: {json.dumps(failed, indent=1)}\nprogress:\n{p.stderr[-4000:]}\n"
        f"server log:\n{(tmp_path / 'server.log').read_text(errors='replace')[-3000:]}")
    names = {c["check"] for c in doc["checks"]}
    assert {"rss", "fds", "threads", "p99", "errors", "health", "idle", "shutdown"} <= names
    # the mix really ran: every kind was sent, streams were dropped, prefixes hit, bad bodies got 400
    kinds = doc["by_kind"]
    assert set(doc["mix"]) <= set(kinds), kinds
    assert doc["totals"]["dropped"] > 0 and doc["totals"]["bad_400"] > 0
    assert any((w.get("prefix_req_hits") or 0) > 0 for w in doc["windows"])
    assert len([w for w in doc["windows"] if w["phase"] in ("warmup", "load")]) == DURATION_S // 15


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("soak_serve", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("soak_serve", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _rows(rss, fds, threads, p99, phases):
    return [{"t_s": 15.0 * i, "phase": ph, "rss_mib": r, "fds": f, "threads": t, "p99_s": p, "ok": 10,
             "health": 200} for i, (r, f, t, p, ph) in enumerate(zip(rss, fds, threads, p99, phases))]


def test_verdict_catches_growth():
    """The tool's bounds, on synthetic windows: steady numbers pass; RSS, fd, thread or p99 growth after the
    warm-up, an error, blocks left in use when idle and an unclean exit each fail their own check."""
    soak = _tool()
    args = soak.argparse.Namespace(rss_growth=0.10, rss_slack_mib=64, fd_slack=24, thread_slack=8, p99_factor=2.0,
                                   p99_slack_s=1.0)
    phases = ["warmup"] * 2 + ["load"] * 6
    idle = {"t_s": 130.0, "phase": "idle", "rss_mib": 900, "fds": 7, "threads": 7, "blocks_used": 0, "in_flight": 0,
            "health": 200, "idle_wait_s": 0.1}
    clean = {"exited": True, "rc": 0, "seconds": 0.5, "stopped_line": True}

    def failed(rows, idle=idle, stop=clean, errors=None):
        checks = soak.verdict(args, rows, idle, stop, {"errors": errors or {}})
        return {c["check"] for c in checks if not c["ok"]}

    steady = _rows([880, 890, 895, 896, 897, 897, 898, 898], [15] * 8, [7] * 8, [5.0, 6.0, 5.5, 5.0, 6.1, 5.2, 5.9, 5.4],
                   phases)
    assert failed(steady) == set()
    leak = _rows([880, 890, 950, 1000, 1050, 1100, 1150, 1200], [15] * 8, [7] * 8, [5.0] * 8, phases)
    assert failed(leak) == {"rss"}
    assert failed(_rows([890] * 8, [15, 15, 20, 30, 40, 50, 60, 70], [7] * 8, [5.0] * 8, phases)) == {"fds"}
    assert failed(_rows([890] * 8, [15] * 8, [7, 7, 9, 11, 13, 15, 17, 19], [5.0] * 8, phases)) == {"threads"}
    assert failed(_rows([890] * 8, [15] * 8, [7] * 8, [5, 6, 6, 8, 10, 14, 18, 22], phases)) == {"p99"}
    assert failed(steady, errors={"chat:500": 1}) == {"errors"}
    assert failed(steady, idle={**idle, "blocks_used": 3}) == {"idle"}
    assert failed(steady, stop={**clean, "rc": 1}) == {"shutdown"}
