"""`ascend-v4 doctor --first-run`: the one command an Atlas owner runs on day one, and sends back.

Runs, each step in its own child process with a time limit (a step that fails or hangs is recorded and the kit
goes on): the environment report (`doctor`), the op self-check table (`doctor --ops`), a tiny dummy `generate`,
a 2-device expert-parallel `generate --npus 2`, and a `small` throughput figure (`bench offline`, ours only).
Everything lands in one directory: `first-run-report.json` (machine-readable, every step's command, exit code,
seconds, output) and `first-run-report.txt` (the same for people), plus the files the steps write. Progress goes
to stderr, one line per step. On a machine without NPUs the same steps run on the CPU (that is how CI checks the
kit); the report says which device ran them.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

CLI = [sys.executable, "-c", "from ascend_v4.cli import main; main()"]


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]
    timeout_s: float
    skip_reason: str | None = None
    result: dict = field(default_factory=dict)


def plan_steps(out: Path, device: str, n_devices: int, quick: bool) -> list[Step]:
    """The kit's steps for `device` ("npu" or "cpu") with `n_devices` visible NPUs."""
    tiny = ["--model", "tiny", "--prompt-ids", "0,100,200,300,400", "--max-tokens", "8", "--json",
            "--device", device]
    steps = [
        Step("environment", "driver, CANN, torch/torch_npu, op libraries, NPUs, HCCL settings",
             ["doctor", "--json"], 300),
        Step("op-self-check", "every usable backend of every op against the CPU reference",
             ["doctor", "--no-probe", "--json", "--ops", "--ops-size", "small" if quick else "all"], 1800),
        Step("generate-tiny", "tiny dummy model, one device", ["generate", *tiny], 600),
        Step("generate-ep2", "tiny dummy model, 2 devices (expert parallelism)",
             ["generate", *tiny, "--npus", "2"], 900,
             None if device == "cpu" or n_devices >= 2 else f"{n_devices} NPU visible, 2 needed"),
        Step("throughput-small", "small dummy model, 1 and 16 concurrent, 128 in / 32 out (ours only)",
             ["bench", "offline", "--model", "small", "--concurrency", "1,16", "--output-len", "32",
              "--peer", "none", "--json", str(out / "bench-small.json")], 1800,
             "--quick" if quick else None),
    ]
    return steps


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_step(step: Step) -> dict:
    """Run one step's command; never raises."""
    if step.skip_reason:
        return {"status": "skipped", "why": step.skip_reason}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([*CLI, *step.argv], capture_output=True, text=True, timeout=step.timeout_s)
    except subprocess.TimeoutExpired as e:
        return {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1),
                "why": f"no result within {step.timeout_s:.0f} s",
                "stderr": _tail((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes)
                                else e.stderr or "")}
    out = {"status": "ok" if r.returncode == 0 else "failed", "exit_code": r.returncode,
           "seconds": round(time.perf_counter() - t0, 1), "stdout": _tail(r.stdout), "stderr": _tail(r.stderr)}
    try:  # the JSON steps: keep their result as data, not text
        out["json"] = json.loads(r.stdout)
        out.pop("stdout")
    except (json.JSONDecodeError, ValueError):
        pass
    return out


def _devices() -> tuple[str, int]:
    """("npu", count) when the doctor's torch_npu probe (a child process) sees NPUs, else ("cpu", 0)."""
    from ascend_v4.cli.doctor import Report, check_torch

    info = check_torch(Report(), probe=True)  # None without an importable torch_npu
    return ("npu", info["devices"]) if info and info["devices"] > 0 else ("cpu", 0)


def first_run(out: Path, quick: bool = False) -> Path:
    """Run the kit into `out`; returns the JSON report's path."""
    out.mkdir(parents=True, exist_ok=True)
    device, n = _devices()
    steps = plan_steps(out, device, n, quick)
    report = {"ascend_v4_first_run": 1, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "device": device,
              "npus_visible": n, "host": platform.node(), "python": sys.version.split()[0], "steps": []}
    for i, step in enumerate(steps, 1):
        click.echo(f"[first-run] {i}/{len(steps)} {step.name}: {step.what} ...", err=True)
        step.result = run_step(step)
        click.echo(f"[first-run] {i}/{len(steps)} {step.name}: {step.result['status']}"
                   + (f" in {step.result['seconds']} s" if "seconds" in step.result else "")
                   + (f" ({step.result['why']})" if "why" in step.result else ""), err=True)
        report["steps"].append({k: v for k, v in asdict(step).items() if k != "timeout_s"})
        (out / "first-run-report.json").write_text(json.dumps(report, indent=2))  # partial results survive
    (out / "first-run-report.txt").write_text(render(report))
    return out / "first-run-report.json"


def render(report: dict) -> str:
    lines = [f"ascend-v4 first-run report ({report['started']}, host {report['host']}, device {report['device']}, "
             f"{report['npus_visible']} NPU(s) visible)", ""]
    for s in report["steps"]:
        r = s["result"]
        lines.append(f"== {s['name']}: {r['status']}" + (f" ({r.get('seconds')} s)" if "seconds" in r else ""))
        lines.append(f"   ascend-v4 {' '.join(s['argv'])}")
        if "why" in r:
            lines.append(f"   {r['why']}")
        body = json.dumps(r["json"], indent=1)[:3000] if "json" in r else r.get("stdout", "")
        if body:
            lines.append(body)
        if r.get("status") != "ok" and r.get("stderr"):
            lines.append("   stderr (tail):\n" + r["stderr"])
        lines.append("")
    return "\n".join(lines)


__all__ = ["first_run", "plan_steps", "run_step", "render", "Step"]
