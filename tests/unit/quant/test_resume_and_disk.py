"""Resume keeps finished work: after `kill -9` of the real CLI with k files finished, `--resume` keeps at least
those k (checked by hash) and ends byte-identical to a clean run, --ep outputs included; a disk that fills up
mid-run (a real tmpfs) gives one error naming the path and the bytes still to write, and `--resume` finishes
once space is freed; progress is printed as log lines when stderr is not a terminal."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ascend_v4.checkpoint.reader import read_checkpoint
from ascend_v4.quant.errors import OutputWriteError
from ascend_v4.quant.manifest import JOURNAL_NAME, MANIFEST_NAME
from ascend_v4.quant.st_io import sha256_file
from ascend_v4.quant.tool import Hooks, make_plan, quantize


def hashes(d: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.is_file()}


def _journal_files(out: Path) -> dict:
    try:
        return json.loads((out / JOURNAL_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return {}


@pytest.mark.parametrize("fmt,ep,k", [("w8a8", None, 3), ("w4a8", 2, 5)])
def test_kill_after_k_files_then_resume_keeps_them(fmt, ep, k, tiny_src, converted, tmp_path):
    reference = hashes(converted(fmt, ep))
    out = tmp_path / "out"
    cmd = ["ascend-v4", "quantize", "-m", str(tiny_src), "-o", str(out), "-f", fmt, "-j", "1",
           "--read-baseline", "off"] + (["--ep", str(ep)] if ep else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while len(_journal_files(out)) < k and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    finished = _journal_files(out)
    assert p.returncode == -signal.SIGKILL and len(finished) >= k, "the run ended before it could be killed"
    assert not (out / MANIFEST_NAME).exists()
    kept = {name: rec["sha256"] for name, rec in finished.items()}

    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    m = re.search(r"resume: (\d+) of (\d+) output files verified and kept", r.stderr)
    assert m and int(m.group(1)) >= len(kept), r.stderr
    assert hashes(out) == reference
    assert all(reference[name] == sha for name, sha in kept.items())


def _fill(fs: Path) -> Path:
    """Take every free byte of the filesystem holding `fs` (as another process writing there would)."""
    filler = fs / "filler"
    with open(filler, "wb") as f:
        block = b"\0" * (1 << 20)
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
            # keep what fits in the last partial block too
    return filler


def test_disk_full_mid_run_then_resume(tiny_info, converted, small_fs):
    reference = hashes(converted("w8a8"))
    plan = make_plan(tiny_info, "w8a8", None)
    fs = small_fs(plan.total_bytes + (80 << 20))  # passes the up-front check (needs total + 64 MiB margin)
    out = fs / "out"
    n_units = sum(len(f.units) for f in plan.files)
    seen = [0]
    filler: list[Path] = []

    def fill_later():
        seen[0] += 1
        if seen[0] == n_units // 2:
            filler.append(_fill(fs))

    with pytest.raises(OutputWriteError) as ei:
        quantize(tiny_info, out, "w8a8", workers=1, read_baseline="off", hooks=Hooks(after_unit=fill_later))
    msg = str(ei.value)
    assert str(out) in msg and "No space left on device" in msg and "--resume" in msg
    left = float(re.search(r"([\d.]+) GB in \d+ of \d+ files still to write", msg).group(1))
    finished = _journal_files(out)
    assert finished and 0 < left * 1e9 < plan.total_bytes
    assert not list(out.glob("*.partial")) and not (out / MANIFEST_NAME).exists()

    filler[0].unlink()
    res = quantize(tiny_info, out, "w8a8", workers=1, resume=True, read_baseline="off")
    assert res.files_skipped >= len(finished)
    assert hashes(out) == reference
    read_checkpoint(out)


def test_disk_full_from_the_cli_is_one_line(tiny_src, small_fs):
    out = small_fs(8 << 20) / "out"
    r = subprocess.run(["ascend-v4", "quantize", "-m", str(tiny_src), "-o", str(out), "-f", "w8a8",
                        "--read-baseline", "off"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "InsufficientDiskSpaceError" in r.stderr and str(out) in r.stderr


def test_progress_lines_when_stderr_is_piped(tiny_src, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["ascend-v4", "quantize", "-m", str(tiny_src), "-o", str(out), "-f", "bf16",
                        "--read-baseline", "off"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("quantize bf16")]
    assert lines and "\r" not in r.stderr
    assert re.search(r"100%\s+[\d.]+ MB/[\d.]+ MB\s+[\d.]+ [KMG]?B/s\s+ETA \S+\s+\d+/\d+ tensors", lines[-1])


def test_progress_bar_log_mode_interval():
    import io

    from ascend_v4.quant.progress import ProgressBar

    s = io.StringIO()
    bar = ProgressBar(100, "job", stream=s, log_interval=0.05)
    bar.update(10)
    assert s.getvalue() == ""  # nothing before the first interval
    time.sleep(0.06)
    bar.update(10, "x")
    bar.close()
    out = s.getvalue().splitlines()
    assert len(out) == 2 and out[0].startswith("job   20%") and out[0].endswith("x") and "\r" not in s.getvalue()
