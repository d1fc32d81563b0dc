"""`quantize()`: stream an official DeepSeek-V4 checkpoint into another format, shard by shard, resumably.

The parts, one role each: `conversion_plan.py` (what becomes what, in which file: decided before any byte is
written), `destination.py` (what the output directory holds, the journal, side files, the manifest),
`writer.py` (one output file: read, convert, stream, hash), `raw_read.py` (the cold-read baseline). This
module runs them: plan, check the destination and free space, write the files on a thread pool, record each
finished file in the journal at once, then the index, the description and last the manifest.

Workers are threads, not processes: the heavy parts (pread, numpy/torch kernels, sha256, write) release the GIL,
so K threads keep K cores busy, and they share one address space - one memory budget, no pickling of tensors,
no extra interpreters importing torch (~0.3 GB each).

Resume: the conversion is deterministic (tables and roundings in fp32 / exact integer sums, no
thread-count-dependent reductions), so a run resumed after a kill, a Ctrl-C or a full disk ends bit-identical
to an uninterrupted one.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import recipes
from .conversion_plan import CONVERTER_VERSION, OutFile, Plan, SourceCheckpoint, converter_options, make_plan
from .destination import (OWN_SIDE_FILES, Journal, check_space, manifest_for, own_files, prepare_destination,
                          verified_files, write_side_files)
from .errors import InjectedFailure, OutputWriteError, UnsupportedConversionError
from .manifest import JOURNAL_NAME, MANIFEST_NAME, conversion_key, source_identity
from .raw_read import READ_SAMPLE_BYTES, measure_raw_read, read_ranges
from .st_io import fsync_dir, write_json_atomic
from .writer import Fds, Hooks, Progress, Run, SourceValues, Timers, write_file

# errno values that mean "the output cannot be written right now": reported with what is left to write.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


@dataclass
class QuantizeResult:
    out_dir: Path
    output_format: str
    files_written: int
    files_skipped: int  # verified outputs of an earlier run (resume), or everything when already complete
    input_bytes: int  # source bytes converted in this run
    output_bytes: int  # bytes written in this run
    seconds: float  # conversion phase (wall)
    raw_read_bytes: int = 0
    raw_read_seconds: float = 0.0
    peak_rss_bytes: int = 0
    start_rss_bytes: int = 0  # RSS when quantize() was entered (interpreter, torch, caller's data)
    max_shard_bytes: int = 0
    thread_seconds: dict[str, float] = field(default_factory=dict)  # read / compute / write, summed over workers
    already_complete: bool = False

    @property
    def rate(self) -> float:
        return self.input_bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def raw_read_rate(self) -> float:
        return self.raw_read_bytes / self.raw_read_seconds if self.raw_read_seconds > 0 else 0.0

    @property
    def throughput_ratio(self) -> float | None:
        return self.rate / self.raw_read_rate if self.raw_read_rate > 0 and self.input_bytes else None

    def summary(self) -> str:
        gb = 1e9
        lines = [f"{self.out_dir}: {self.output_format}, {self.files_written} files written, "
                 f"{self.files_skipped} verified and kept"]
        if self.already_complete:
            lines.append("already complete (same source, same arguments): nothing to do")
        if self.input_bytes:
            lines.append(f"converted {self.input_bytes / gb:.2f} GB -> {self.output_bytes / gb:.2f} GB in "
                         f"{self.seconds:.1f} s: {self.rate / 1e6:.0f} MB/s of input")
        ratio = self.throughput_ratio
        if ratio is not None:
            lines.append(f"raw read of the same source bytes ({self.raw_read_bytes / gb:.2f} GB, cold): "
                         f"{self.raw_read_rate / 1e6:.0f} MB/s; throughput ratio {ratio:.2f}")
        if self.thread_seconds:
            tot = sum(self.thread_seconds.values()) or 1.0
            lines.append("worker time: " + ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in
                                                       self.thread_seconds.items()))
        mib = 2 ** 20
        lines.append(f"peak RSS {self.peak_rss_bytes / mib:.0f} MiB (at start {self.start_rss_bytes / mib:.0f} MiB; "
                     f"largest input shard {self.max_shard_bytes / mib:.0f} MiB, bound 2 shards = "
                     f"{2 * self.max_shard_bytes / mib:.0f} MiB)")
        return "\n".join(l for l in lines if l)


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far.

    `resource.getrusage(RUSAGE_SELF).ru_maxrss` (KiB on Linux) survives fork + exec, so a converter started by
    a big parent would report the parent's peak; the kernel's own high-water mark of this process image
    (`VmHWM`) does not, so it is used when available, else getrusage."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return ru


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def quantize(src: SourceCheckpoint, out_dir: str | Path, output_format: str, *, ep: int | None = None,
             workers: int = 1, resume: bool = False, force: bool = False, fsync: bool = True,
             read_baseline: str = "sample", progress_factory: Callable[[int, str], Any] | None = None,
             hooks: Hooks | None = None, log: Callable[[str], None] | None = None,
             allow_nonfinite: bool = False, mindie: bool = False) -> QuantizeResult:
    """Convert the validated checkpoint `src` into `out_dir` (see the module docstring).

    Args:
        src: a validated official checkpoint (`ascend_v4.checkpoint.reader.read_checkpoint(...)`).
        out_dir: destination directory (created; must be empty, hold this conversion, or `force`).
        output_format: one of `recipes.OUTPUT_FORMATS`.
        ep: write routed experts pre-split for this many expert-parallel ranks (must divide the experts).
        workers: converter threads (each converts one output file at a time).
        resume: continue an unfinished (or re-verify a finished) conversion of the same source and arguments.
        force: discard whatever conversion the destination holds.
        fsync: fsync every file before its rename (crash safety against power loss; off only for benchmarks).
        read_baseline: "sample" (cold-read up to 4 GiB of the same source bytes first), "full" (all of them)
            or "off": the reference for the printed throughput ratio.
        progress_factory: `(total_bytes, description) -> bar` with `update(nbytes, extra)` and `close()`.
        hooks: test hooks (crash injection, slow-down).
        log: receives one-line status messages.
        allow_nonfinite: report non-finite source values (NaN/inf floats, FP8 NaN bytes, NaN or overflowing
            UE8M0 scales) as warnings through `log` and go on, instead of failing.
        mindie: w8a8 / w4a8 only: add MindIE's `quantize` (and `moe_quantize`) fields to config.json
            (`ascend_v1.adjust_config`; msModelSlim writes none for V4).

    Raises:
        DestinationConflictError / ResumeMismatchError, InsufficientDiskSpaceError, UnsupportedConversionError,
        SourceReadError, OutputWriteError (disk full / I/O error mid-run: finished files are kept for
        `resume`), NonFiniteSourceError; nothing in `out_dir` looks complete unless the call returned.
    """
    start_rss = current_rss_bytes()
    out = Path(out_dir)
    hooks = hooks or Hooks()
    say = log or (lambda s: None)
    if workers < 1:
        raise UnsupportedConversionError(f"--workers must be >= 1, got {workers}")
    if read_baseline not in ("sample", "full", "off"):
        raise UnsupportedConversionError(f"read_baseline must be sample, full or off, not {read_baseline!r}")
    plan = make_plan(src, output_format, ep)
    style = recipes.STYLES[output_format]
    root = Path(src.path)
    index_path = root / "model.safetensors.index.json" if src.has_index else None
    identity = source_identity(root, [Path(sh.path) for sh in src.shards], index_path)
    key = conversion_key(identity, output_format, ep, converter_options(), CONVERTER_VERSION)
    max_shard = max((Path(sh.path).stat().st_size for sh in src.shards), default=0)

    state, previous = prepare_destination(out, key, resume, force)
    if state == "complete":
        return QuantizeResult(out, output_format, 0, len(plan.files), 0, 0, 0.0, peak_rss_bytes=peak_rss_bytes(),
                              start_rss_bytes=start_rss, max_shard_bytes=max_shard, already_complete=True)

    # Which planned files are already done (resume: re-hash what the journal / manifest lists).
    done = verified_files(out, plan.files, previous, workers) if state == "resume" else {}
    if state == "resume":
        say(f"resume: {len(done)} of {len(plan.files)} output files verified and kept")
    todo = [f for f in plan.files if f.name not in done]

    # Space: everything still to write, minus what we will delete or overwrite.
    planned = {f.name for f in plan.files}
    stale = [p for p in own_files(out) if state == "fresh" or (p.name not in done and p.name != JOURNAL_NAME)]
    reclaim = sum(p.stat().st_size for p in stale if p.is_file())
    check_space(out, sum(f.size for f in todo), reclaim)

    # Invalidate: the manifest first (the directory stops looking complete), then stale outputs.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    journal = Journal(out, key, output_format, ep, done, fsync)
    try:
        journal.save()
        for p in stale:
            if p.name != JOURNAL_NAME and (state == "fresh" or p.name in planned or p.suffix == ".partial"
                                           or p.name in OWN_SIDE_FILES):
                p.unlink(missing_ok=True)
        fsync_dir(out)
        write_side_files(src, out, output_format, mindie)

        raw = (0, 0.0)
        if read_baseline != "off" and todo:
            raw = measure_raw_read(read_ranges(src, todo), None if read_baseline == "full" else READ_SAMPLE_BYTES)
            say(f"raw read baseline: {raw[0] / 1e9:.2f} GB in {raw[1]:.2f} s")

        in_bytes = sum(f.src_bytes for f in todo)
        t0 = time.perf_counter()
        written, out_bytes, timers = _write_all(src, out, todo, journal, workers, fsync, hooks, output_format,
                                                progress_factory, allow_nonfinite, say)
        seconds = time.perf_counter() - t0
        fsync_dir(out)
        _finish(plan, out, journal, key, identity, root, style.index, fsync)
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS:
            raise
        left = [f for f in plan.files if f.name not in journal.files]
        raise OutputWriteError(
            f"{e.filename or out}: {e.strerror or e} while writing the output; "
            f"{sum(f.size for f in left) / 1e9:.2f} GB in {len(left)} of {len(plan.files)} files still to write "
            f"({len(journal.files)} finished files kept); free space (or fix the disk) and run again with "
            f"--resume") from None
    return QuantizeResult(out, output_format, written, len(done), in_bytes, out_bytes, seconds, raw[0], raw[1],
                          peak_rss_bytes(), start_rss, max_shard, dict(timers.t))


def _write_all(src: SourceCheckpoint, out: Path, todo: list[OutFile], journal: Journal, workers: int, fsync: bool,
               hooks: Hooks, output_format: str, progress_factory, allow_nonfinite: bool,
               say: Callable[[str], None]) -> tuple[int, int, Timers]:
    """Write `todo` on `workers` threads; each file enters the journal the moment it is complete."""
    in_bytes = sum(f.src_bytes for f in todo)
    bar = progress_factory(in_bytes, f"quantize {output_format}") if progress_factory and todo else None
    prog = Progress(bar, sum(len(t.outputs) for f in todo for t in f.units))
    timers = Timers()
    run = Run(out, Fds(Path(src.path)), fsync, prog, timers, hooks, threading.Event(),
              SourceValues(allow_nonfinite, say))

    def task(f: OutFile) -> int:
        try:
            sha, n = write_file(f, run)
        finally:
            run.fds.close_mine()
        journal.record(f.name, n, sha)
        return n

    threads = max(1, (os.cpu_count() or 1) // workers)
    written = out_bytes = 0
    try:
        with _torch_threads(threads), ThreadPoolExecutor(max_workers=workers,
                                                         thread_name_prefix="quantize") as pool:
            # Largest first: better balance; output bytes do not depend on the order.
            pending = {pool.submit(task, f) for f in sorted(todo, key=lambda f: -f.size)}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        out_bytes += fut.result()
                        written += 1
                        if hooks.fail_after_files is not None and written >= hooks.fail_after_files:
                            raise InjectedFailure(f"injected failure after {written} files")
            except BaseException:
                run.stop.set()
                for fut in pending:
                    fut.cancel()
                raise
    finally:
        if bar is not None:
            bar.close()
    return written, out_bytes, timers


def _finish(plan: Plan, out: Path, journal: Journal, key: str, identity: dict, root: Path, index: str,
            fsync: bool) -> None:
    """Last: index, description, manifest (the directory now looks complete); then the journal goes."""
    files = [journal.files[f.name] for f in plan.files]
    write_json_atomic(out / index, {"metadata": {"total_size": plan.data_bytes}, "weight_map": plan.weight_map},
                      fsync)
    if plan.description is not None:
        write_json_atomic(out / recipes.DESCRIPTION_NAME, plan.description, fsync)
    write_json_atomic(out / MANIFEST_NAME, manifest_for(plan, key, identity, root, files, index), fsync)
    fsync_dir(out)
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    fsync_dir(out)


__all__ = ["quantize", "make_plan", "Plan", "QuantizeResult", "Hooks", "measure_raw_read", "CONVERTER_VERSION",
           "peak_rss_bytes", "OUTPUT_ERRNOS"]
