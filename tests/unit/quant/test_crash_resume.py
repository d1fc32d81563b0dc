"""Crash safety: kills at random points (SIGKILL of a subprocess) and injected failures, then --resume, give
files bit-identical to an uninterrupted run; destinations holding something else are refused; an unfinished
conversion is never presented as complete."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ascend_v4.checkpoint.errors import CheckpointError
from ascend_v4.checkpoint.reader import read_checkpoint
from ascend_v4.quant.errors import DestinationConflictError, InjectedFailure, ResumeMismatchError
from ascend_v4.quant.manifest import JOURNAL_NAME, MANIFEST_NAME
from ascend_v4.quant.st_io import sha256_file
from ascend_v4.quant.tool import Hooks, quantize

FMT, EP = "w4a8", 2


def hashes(d: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tiny_info, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("uninterrupted")
    quantize(tiny_info, out, FMT, ep=EP, workers=2, read_baseline="off")
    return hashes(out)


def _assert_unfinished(out: Path) -> None:
    """Nothing presented as complete: no manifest, and the reader refuses the directory."""
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(CheckpointError, match="did not finish" if (out / JOURNAL_NAME).exists() else ""):
        read_checkpoint(out)


@pytest.mark.parametrize("fail_after", [1, 4])
def test_injected_failure_then_resume(fail_after, tiny_info, reference, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InjectedFailure):
        quantize(tiny_info, out, FMT, ep=EP, workers=2, read_baseline="off", hooks=Hooks(fail_after_files=fail_after))
    _assert_unfinished(out)
    with pytest.raises(DestinationConflictError, match="--resume"):
        quantize(tiny_info, out, FMT, ep=EP, read_baseline="off")
    res = quantize(tiny_info, out, FMT, ep=EP, workers=1, resume=True, read_baseline="off")
    assert res.files_skipped >= fail_after and res.files_written > 0
    assert hashes(out) == reference


def test_interrupt_inside_a_file_then_resume(tiny_info, reference, tmp_path):
    out = tmp_path / "out"
    n = [0]

    def ctrl_c():
        n[0] += 1
        if n[0] == 150:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_info, out, FMT, ep=EP, workers=2, read_baseline="off", hooks=Hooks(after_unit=ctrl_c))
    _assert_unfinished(out)
    quantize(tiny_info, out, FMT, ep=EP, workers=2, resume=True, read_baseline="off")
    assert hashes(out) == reference and not list(out.glob("*.partial"))


SCRIPT = textwrap.dedent("""
    import sys, time
    from ascend_v4.checkpoint.reader import read_checkpoint
    from ascend_v4.quant.tool import Hooks, quantize
    info = read_checkpoint(sys.argv[1])
    print("START", flush=True)
    quantize(info, sys.argv[2], sys.argv[3], ep=int(sys.argv[4]), workers=2, resume=True, read_baseline="off",
             hooks=Hooks(after_unit=lambda: time.sleep(0.004)))
    print("DONE", flush=True)
""")


def test_sigkill_at_random_points_then_resume(tiny_src, reference, tmp_path):
    out = tmp_path / "out"
    rng = random.Random(1234)
    cmd = [sys.executable, "-c", SCRIPT, str(tiny_src), str(out), FMT, str(EP)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kills = 0
    for _ in range(3):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        assert p.stdout.readline().strip() == "START", p.stderr.read()
        time.sleep(rng.uniform(0.05, 1.2))  # somewhere inside the ~1.5 s conversion
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        if not (out / MANIFEST_NAME).exists():
            _assert_unfinished(out)
    assert kills >= 2
    r = subprocess.run(cmd, capture_output=True, env=env, text=True, timeout=120)
    assert r.returncode == 0 and "DONE" in r.stdout, r.stderr
    assert hashes(out) == reference
    read_checkpoint(out)  # complete again


def test_destination_rules(tiny_info, converted, tmp_path):
    done = converted("w8a8")
    # same conversion again: nothing to do; --resume re-verifies everything and keeps it
    assert quantize(tiny_info, done, "w8a8", read_baseline="off").already_complete
    before = hashes(done)
    res = quantize(tiny_info, done, "w8a8", resume=True, read_baseline="off")
    assert res.files_written == 0 and res.files_skipped == len([p for p in done.glob("*.safetensors")])
    assert hashes(done) == before
    # a different conversion is refused unless --force
    with pytest.raises(DestinationConflictError, match="different conversion"):
        quantize(tiny_info, done, "bf16", read_baseline="off")
    # unrelated files: refused; --force replaces only what the converter owns
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("keep me")
    with pytest.raises(DestinationConflictError, match="not empty"):
        quantize(tiny_info, other, "bf16", read_baseline="off")
    quantize(tiny_info, other, "bf16", force=True, read_baseline="off")
    assert (other / "README.md").read_text() == "keep me" and (other / MANIFEST_NAME).is_file()
    # an unfinished conversion with other arguments cannot be resumed
    part = tmp_path / "part"
    with pytest.raises(InjectedFailure):
        quantize(tiny_info, part, "w8a8", read_baseline="off", hooks=Hooks(fail_after_files=1))
    assert (part / JOURNAL_NAME).is_file()
    with pytest.raises(ResumeMismatchError):
        quantize(tiny_info, part, "w8a8", ep=2, resume=True, read_baseline="off")


def test_resume_redoes_a_corrupted_file(tiny_info, reference, tmp_path):
    out = tmp_path / "out"
    quantize(tiny_info, out, FMT, ep=EP, read_baseline="off")
    victim = sorted(out.glob("*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    res = quantize(tiny_info, out, FMT, ep=EP, resume=True, read_baseline="off")
    assert res.files_written == 1
    assert hashes(out) == reference
