"""`quantize()`: stream an official DeepSeek-V4 checkpoint into another format, shard by shard, resumably.

Plan (before any byte is written): every source tensor becomes a *unit* - a byte copy, or a linear
(`.weight` + `.scale`) converted to the target tensor format of its role (`recipes.py`). Units go to one output
file per (source shard, EP rank): the source shard of a unit is that of its weight, its rank that of its routed
expert under `--ep N` (shared tensors: no rank). Output shapes, dtypes, headers and sizes are all known up front,
so free disk space is checked before writing and each file is written header first, then tensor by tensor.

Memory: a worker holds one unit at a time (large copies are streamed in 64 MiB chunks), so the peak is about
`workers x` the largest linear's working set, independent of shard sizes.

Workers are threads, not processes: the heavy parts (pread, numpy/torch kernels, sha256, write) release the GIL,
so K threads keep K cores busy, and they share one address space - one memory budget, no pickling of tensors,
no extra interpreters importing torch (~0.3 GB each).

Crash safety: files are written as `<name>.partial`, fsynced and renamed; the journal records each finished
file's sha256; index, `quant_model_description.json` and finally the manifest are written last (`manifest.py`).
`resume=True` re-hashes the journaled files and redoes only what is missing; the conversion is deterministic
(tables and roundings in fp32 / exact integer sums, no thread-count-dependent reductions), so the result is
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ascend_v4.quant import get_format

from . import recipes
from .errors import (DestinationConflictError, InjectedFailure, InsufficientDiskSpaceError, QuantizeError,
                     ResumeMismatchError, UnsupportedConversionError)
from .formats.base import TORCH_DTYPE, TensorLayout
from .formats.int4_channel import CLIP_GRID
from .manifest import JOURNAL_NAME, MANIFEST_NAME, MANIFEST_VERSION, conversion_key, read_json, source_identity
from .st_io import HashingWriter, build_header, fsync_dir, order_for_writing, pread_exact, sha256_file, \
    write_json_atomic

CONVERTER_VERSION = 1
COPY_CHUNK = 64 << 20
SPACE_MARGIN = 64 << 20  # JSON side files, filesystem slack
READ_SAMPLE_BYTES = 4 << 30  # default raw-read baseline: this many bytes spread over the source shards
OWN_SIDE_FILES = (MANIFEST_NAME, JOURNAL_NAME, recipes.DESCRIPTION_NAME) + tuple(
    sorted({s.index for s in recipes.STYLES.values()}))
SOURCE_SKIP = {"model.safetensors.index.json", "config.json", MANIFEST_NAME, JOURNAL_NAME, recipes.DESCRIPTION_NAME}
FLOAT = "FLOAT"


# ---------------------------------------------------------------------------------------------- source protocol
class SourceTensor(Protocol):
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SourceShard(Protocol):
    path: Path
    tensors: dict[str, SourceTensor]


class SourceCheckpoint(Protocol):
    """What the converter needs from a validated checkpoint (`ascend_v4.checkpoint.reader.CheckpointInfo`)."""

    path: Path
    shards: list[SourceShard]
    tensors: dict[str, SourceTensor]
    has_index: bool
    args: Any  # ModelArgs: n_routed_experts is read


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class OutTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Unit:
    """One step of the conversion: a byte copy of `src[0]`, or a linear converted from `src_fmt` to `dst_fmt`."""

    name: str  # tensor name (copy) or linear base name (linear)
    src: list[SourceTensor]  # copy: [tensor]; linear: [weight, scale]
    outputs: list[OutTensor]
    src_fmt: str | None = None
    dst_fmt: str | None = None
    down: bool = False

    @property
    def is_copy(self) -> bool:
        return self.dst_fmt is None

    @property
    def src_bytes(self) -> int:
        return sum(t.end - t.begin for t in self.src)


@dataclass
class OutFile:
    name: str
    rank: int | None
    units: list[Unit] = field(default_factory=list)
    order: list[OutTensor] = field(default_factory=list)  # on-disk order
    header: bytes = b""

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.order)

    @property
    def src_bytes(self) -> int:
        return sum(u.src_bytes for u in self.units)


@dataclass
class Plan:
    output_format: str
    ep: int | None
    n_routed_experts: int
    files: list[OutFile]
    description: dict[str, Any] | None  # ascendV1 quant_model_description.json, or None
    weight_map: dict[str, str]
    n_tensors: int

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for f in self.files for t in f.order)


def _linear_src_format(weight: SourceTensor) -> str:
    return {"F8_E4M3": "fp8_block", "I8": "fp4_mx", "BF16": "bf16"}[weight.dtype]


def _out_in(src_fmt: str, weight: SourceTensor) -> tuple[int, int]:
    o, i = weight.shape
    return (o, 2 * i) if src_fmt == "fp4_mx" else (o, i)


def _outs(base: str, layout: dict[str, TensorLayout]) -> list[OutTensor]:
    return [OutTensor(f"{base}.{sfx}", lay.st_dtype, lay.shape, lay.nbytes) for sfx, lay in layout.items()]


def plan_units(src: SourceCheckpoint, output_format: str) -> list[tuple[Unit, SourceTensor]]:
    """Every unit with its primary source tensor (which decides its output file), in source order."""
    tensors = src.tensors
    units: list[tuple[Unit, SourceTensor]] = []
    done: set[str] = set()
    for sh in src.shards:
        for name, ent in sh.tensors.items():  # file offset order
            if name in done or name not in tensors:
                continue
            base, _, leaf = name.rpartition(".")
            if leaf in ("weight", "scale") and f"{base}.scale" in tensors and f"{base}.weight" in tensors:
                w, s = tensors[f"{base}.weight"], tensors[f"{base}.scale"]
                src_fmt = _linear_src_format(w)
                dst = recipes.target_format(output_format, base)
                if dst is not None and dst != src_fmt:
                    down = recipes.is_down_proj(base)
                    o, i = _out_in(src_fmt, w)
                    units.append((Unit(base, [w, s], _outs(base, get_format(dst).layout(o, i, down)), src_fmt, dst,
                                       down), w))
                    done.update((w.name, s.name))
                    continue
            units.append((Unit(name, [ent], [OutTensor(name, ent.dtype, tuple(ent.shape), ent.end - ent.begin)]),
                          ent))
            done.add(name)
    return units


def make_plan(src: SourceCheckpoint, output_format: str, ep: int | None) -> Plan:
    if output_format not in recipes.OUTPUT_FORMATS:
        raise UnsupportedConversionError(f"unknown format {output_format!r}; "
                                         f"one of {', '.join(recipes.OUTPUT_FORMATS)}")
    n_exp = int(src.args.n_routed_experts)
    if ep is not None and (ep < 1 or n_exp % ep):
        raise UnsupportedConversionError(f"--ep {ep} must divide the {n_exp} routed experts")
    style = recipes.STYLES[output_format]
    shard_idx = {sh.path.name: i for i, sh in enumerate(src.shards)}
    n_shards = len(src.shards)
    files: dict[tuple[int, int | None], OutFile] = {}
    for unit, primary in plan_units(src, output_format):
        i = shard_idx[primary.file]
        e = recipes.expert_id(unit.outputs[0].name)
        rank = None if ep is None or e is None else e // (n_exp // ep)
        key = (i, rank)
        if key not in files:
            stem = f"{style.stem}-{i + 1:05d}-of-{n_shards:05d}"
            name = f"{stem}.safetensors" if rank is None else f"{stem}-ep{rank:03d}-of-{ep:03d}.safetensors"
            files[key] = OutFile(name, rank)
        files[key].units.append(unit)

    meta = {"format": "pt", "ascend_v4.quantize": f"{output_format} v{CONVERTER_VERSION}"}
    weight_map: dict[str, str] = {}
    description: dict[str, Any] | None = None
    if style.ascend_v1:
        description = {"model_quant_type": style.model_quant_type, "version": recipes.ASCEND_V1_VERSION,
                       "group_size": 0}
    for f in files.values():
        outs = [t for u in f.units for t in u.outputs]
        f.order = [outs[j] for j in order_for_writing([(t.name, t.dtype, t.nbytes) for t in outs])]
        f.header = build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in f.order], meta)
        for u in f.units:
            qt = get_format(u.dst_fmt).quant_type if u.dst_fmt else FLOAT
            for t in u.outputs:
                weight_map[t.name] = f.name
                if description is not None:
                    description[t.name] = qt
    ordered = sorted(files.values(), key=lambda f: f.name)
    return Plan(output_format, ep, n_exp, ordered, description, dict(sorted(weight_map.items())), len(weight_map))


def converter_options() -> dict:
    """Options that change output bytes (part of the conversion key)."""
    return {"int4_clip_grid": [float(a) for a in CLIP_GRID]}


# ---------------------------------------------------------------------------------------------- result
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


# ---------------------------------------------------------------------------------------------- destination
def _own_files(out: Path) -> list[Path]:
    pats = ["*.safetensors", "*.partial"]
    found = {p for pat in pats for p in out.glob(pat)}
    found |= {out / n for n in OWN_SIDE_FILES if (out / n).exists()}
    return sorted(found)


def _prepare_destination(out: Path, key: str, resume: bool, force: bool) -> tuple[str, dict]:
    """Decide what to do with `out`: ("fresh" | "resume" | "complete", journal files)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_json(out / MANIFEST_NAME)
    journal = read_json(out / JOURNAL_NAME)
    if force:
        return "fresh", {}
    if isinstance(manifest, dict):
        if manifest.get("key") == key:
            return ("resume", {f["name"]: f for f in manifest.get("files", [])}) if resume else ("complete", {})
        raise DestinationConflictError(
            f"{out} holds a different conversion ({manifest.get('format')!r} of "
            f"{manifest.get('source', {}).get('path', '?')}); pass --force to replace it")
    if isinstance(journal, dict):
        if journal.get("key") != key:
            raise ResumeMismatchError(
                f"{out} holds an unfinished conversion with another source or other arguments "
                f"({journal.get('format')!r}); pass --force to discard it")
        if not resume:
            raise DestinationConflictError(f"{out} holds an unfinished conversion of this checkpoint; pass --resume "
                                           f"to continue it or --force to start over")
        return "resume", dict(journal.get("files", {}))
    others = [p.name for p in out.iterdir()]
    if others:
        raise DestinationConflictError(f"{out} is not empty ({', '.join(sorted(others)[:5])}"
                                       f"{', ...' if len(others) > 5 else ''}) and holds no conversion; choose an "
                                       f"empty directory or pass --force (replaces *.safetensors and index files)")
    return "fresh", {}


def _check_space(out: Path, need: int, reclaim: int) -> None:
    free = shutil.disk_usage(out).free
    if need + SPACE_MARGIN > free + reclaim:
        raise InsufficientDiskSpaceError(
            f"{out}: the conversion needs {need / 1e9:.2f} GB more but only {(free + reclaim) / 1e9:.2f} GB are "
            f"free (incl. {reclaim / 1e9:.2f} GB of files it replaces); nothing was written")


def _write_side_files(src: SourceCheckpoint, out: Path, output_format: str) -> None:
    """config.json (adjusted) and the small top-level files of the source (tokenizer, generation config...)."""
    style = recipes.STYLES[output_format]
    cfg = json.loads((Path(src.path) / "config.json").read_text())
    if style.drop_quantization_config:
        cfg.pop("quantization_config", None)
    if style.expert_dtype:
        cfg["expert_dtype"] = style.expert_dtype
    write_json_atomic(out / "config.json", cfg)
    shard_names = {Path(sh.path).name for sh in src.shards}
    for p in sorted(Path(src.path).iterdir()):
        if not p.is_file() or p.name in SOURCE_SKIP or p.name in shard_names or p.suffix in (".safetensors",) \
                or p.name.endswith(".partial"):
            continue
        tmp = out / (p.name + ".partial")
        shutil.copyfile(p, tmp)
        os.replace(tmp, out / p.name)


# ---------------------------------------------------------------------------------------------- execution
@dataclass
class Hooks:
    """Test hooks: simulate a crash after n files of this run, or slow every unit down."""

    fail_after_files: int | None = None
    after_unit: Callable[[], None] | None = None


class _Progress:
    def __init__(self, bar, total_tensors: int) -> None:
        self.bar, self.total, self.n = bar, total_tensors, 0
        self.lock = threading.Lock()

    def update(self, nbytes: int, ntensors: int) -> None:
        if self.bar is None:
            return
        with self.lock:
            self.n += ntensors
            self.bar.update(nbytes, f"{self.n}/{self.total} tensors")


class _Timers:
    def __init__(self) -> None:
        self.t = {"read": 0.0, "compute": 0.0, "write": 0.0}
        self.lock = threading.Lock()

    def add(self, **kw: float) -> None:
        with self.lock:
            for k, v in kw.items():
                self.t[k] += v


class _Fds:
    """Per-thread cache of read-only file descriptors of the source shards."""

    def __init__(self, root: Path) -> None:
        self.root, self.local = root, threading.local()

    def get(self, fname: str) -> int:
        d = getattr(self.local, "fds", None)
        if d is None:
            d = self.local.fds = {}
        if fname not in d:
            d[fname] = os.open(self.root / fname, os.O_RDONLY)
        return d[fname]

    def close_mine(self) -> None:
        for fd in getattr(self.local, "fds", {}).values():
            os.close(fd)
        self.local.fds = {}


def _read_tensor(fds: _Fds, t: SourceTensor) -> torch.Tensor:
    buf = pread_exact(fds.get(t.file), t.begin, t.end - t.begin, f"{t.file}: {t.name}")
    raw = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
    return raw.view(TORCH_DTYPE[t.dtype]).reshape(t.shape)


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


class _Cancelled(Exception):
    """Another worker failed or the run was interrupted: stop at the next unit."""


def _write_file(f: OutFile, out: Path, fds: _Fds, fsync: bool, progress: _Progress, timers: _Timers,
                hooks: Hooks, stop: threading.Event) -> tuple[str, int]:
    w = HashingWriter(out / f.name, fsync=fsync)
    try:
        w.write(f.header)
        main = {t.name for t in f.order if t.nbytes % 8 == 0}
        stash: dict[str, bytes | np.ndarray] = {}
        for u in f.units:
            if stop.is_set():
                raise _Cancelled(f.name)
            t0 = time.perf_counter()
            if u.is_copy:
                s, o = u.src[0], u.outputs[0]
                if o.name in main:
                    fd = fds.get(s.file)
                    for pos in range(s.begin, s.end, COPY_CHUNK):
                        n = min(COPY_CHUNK, s.end - pos)
                        t1 = time.perf_counter()
                        chunk = pread_exact(fd, pos, n, f"{s.file}: {s.name}")
                        t2 = time.perf_counter()
                        w.write(chunk)
                        timers.add(read=t2 - t1, write=time.perf_counter() - t2)
                else:
                    stash[o.name] = bytes(pread_exact(fds.get(s.file), s.begin, s.end - s.begin, s.name))
            else:
                tens = {"weight": _read_tensor(fds, u.src[0]), "scale": _read_tensor(fds, u.src[1])}
                t1 = time.perf_counter()
                res = get_format(u.dst_fmt).convert(get_format(u.src_fmt), tens, u.down)
                t2 = time.perf_counter()
                for o in u.outputs:
                    t = res[o.name.rsplit(".", 1)[1]]
                    if t.dtype != TORCH_DTYPE[o.dtype] or tuple(t.shape) != o.shape:
                        raise QuantizeError(f"internal: {o.name} came out {t.dtype} {list(t.shape)}, planned "
                                            f"{o.dtype} {list(o.shape)}")
                    data = _tensor_bytes(t)
                    if o.name in main:
                        w.write(data)
                    else:
                        stash[o.name] = data.tobytes()
                del tens, res
                timers.add(read=t1 - t0, compute=t2 - t1, write=time.perf_counter() - t2)
            progress.update(u.src_bytes, len(u.outputs))
            if hooks.after_unit:
                hooks.after_unit()
        t0 = time.perf_counter()
        for t in f.order:
            if t.name not in main:
                w.write(stash.pop(t.name))
        if w.n != f.size:
            raise QuantizeError(f"internal: {f.name} has {w.n} bytes, planned {f.size}")
        sha, n = w.commit()
        timers.add(write=time.perf_counter() - t0)
        return sha, n
    except BaseException:
        w.abort()
        raise


# ---------------------------------------------------------------------------------------------- raw read baseline
def _evict(paths: list[Path]) -> None:
    """Drop the source shards' clean pages from the page cache (advisory; no root needed)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)


def measure_raw_read(ranges: list[tuple[Path, int, int]], budget: int | None) -> tuple[int, float]:
    """Cold sequential read of the given (file, begin, end) byte ranges (a proportional prefix of each when
    `budget` is smaller than their total). Returns (bytes, seconds)."""
    total = sum(e - b for _, b, e in ranges)
    frac = 1.0 if budget is None or budget >= total else budget / total
    paths = sorted({p for p, _, _ in ranges})
    _evict(paths)
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for p, b, e in ranges:
        end = b + int((e - b) * frac)
        fd = os.open(p, os.O_RDONLY)
        try:
            pos = b
            while pos < end:
                k = os.preadv(fd, [view[:min(len(buf), end - pos)]], pos)
                if k <= 0:
                    break
                pos += k
                n += k
        finally:
            os.close(fd)
    dt = time.perf_counter() - t0
    _evict(paths)
    return n, dt


def _read_ranges(src: SourceCheckpoint, files: list[OutFile]) -> list[tuple[Path, int, int]]:
    """Per source shard, the span of bytes the given output files read from it."""
    spans: dict[str, list[int]] = {}
    for f in files:
        for u in f.units:
            for t in u.src:
                s = spans.setdefault(t.file, [t.begin, t.end])
                s[0], s[1] = min(s[0], t.begin), max(s[1], t.end)
    root = Path(src.path)
    return [(root / name, b, e) for name, (b, e) in sorted(spans.items())]


@contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------- entry point
def quantize(src: SourceCheckpoint, out_dir: str | Path, output_format: str, *, ep: int | None = None,
             workers: int = 1, resume: bool = False, force: bool = False, fsync: bool = True,
             read_baseline: str = "sample", progress_factory: Callable[[int, str], Any] | None = None,
             hooks: Hooks | None = None, log: Callable[[str], None] | None = None) -> QuantizeResult:
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

    Raises:
        DestinationConflictError / ResumeMismatchError, InsufficientDiskSpaceError, UnsupportedConversionError,
        SourceReadError; nothing in `out_dir` looks complete unless the call returned.
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

    state, previous = _prepare_destination(out, key, resume, force)
    if state == "complete":
        return QuantizeResult(out, output_format, 0, len(plan.files), 0, 0, 0.0, peak_rss_bytes=peak_rss_bytes(),
                              start_rss_bytes=start_rss, max_shard_bytes=max_shard, already_complete=True)

    # Which planned files are already done (resume: re-hash what the journal / manifest lists).
    done: dict[str, dict] = {}
    if state == "resume":
        cands = [f for f in plan.files if (rec := previous.get(f.name)) and (out / f.name).is_file()
                 and (out / f.name).stat().st_size == rec.get("bytes") == f.size]
        with ThreadPoolExecutor(max_workers=workers) as pool:  # sha256 releases the GIL
            digests = list(pool.map(lambda f: sha256_file(out / f.name), cands))
        for f, sha in zip(cands, digests):
            if sha == previous[f.name].get("sha256"):
                done[f.name] = {"name": f.name, "bytes": f.size, "sha256": sha}
        say(f"resume: {len(done)} of {len(plan.files)} output files verified and kept")
    todo = [f for f in plan.files if f.name not in done]

    # Space: everything still to write, minus what we will delete or overwrite.
    planned = {f.name for f in plan.files}
    stale = [p for p in _own_files(out) if state == "fresh" or (p.name not in done and p.name != JOURNAL_NAME)]
    reclaim = sum(p.stat().st_size for p in stale if p.is_file())
    _check_space(out, sum(f.size for f in todo), reclaim)

    # Invalidate: the manifest first (the directory stops looking complete), then stale outputs.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    journal = {"key": key, "format": output_format, "ep": ep, "files": dict(done)}
    write_json_atomic(out / JOURNAL_NAME, journal, fsync)
    for p in stale:
        if p.name != JOURNAL_NAME and (state == "fresh" or p.name in planned or p.suffix == ".partial"
                                       or p.name in OWN_SIDE_FILES):
            p.unlink(missing_ok=True)
    fsync_dir(out)
    _write_side_files(src, out, output_format)

    raw = (0, 0.0)
    if read_baseline != "off" and todo:
        raw = measure_raw_read(_read_ranges(src, todo), None if read_baseline == "full" else READ_SAMPLE_BYTES)
        say(f"raw read baseline: {raw[0] / 1e9:.2f} GB in {raw[1]:.2f} s")

    in_bytes = sum(f.src_bytes for f in todo)
    bar = progress_factory(in_bytes, f"quantize {output_format}") if progress_factory and todo else None
    prog = _Progress(bar, sum(len(t.outputs) for f in todo for t in f.units))
    timers = _Timers()
    fds = _Fds(root)
    lock = threading.Lock()
    stop = threading.Event()
    written = 0

    def task(f: OutFile) -> tuple[str, str, int]:
        try:
            sha, n = _write_file(f, out, fds, fsync, prog, timers, hooks, stop)
        finally:
            fds.close_mine()
        return f.name, sha, n

    t0 = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // workers)
    out_bytes = 0
    try:
        with _torch_threads(threads), ThreadPoolExecutor(max_workers=workers,
                                                         thread_name_prefix="quantize") as pool:
            # Largest first: better balance; output bytes do not depend on the order.
            pending = {pool.submit(task, f) for f in sorted(todo, key=lambda f: -f.size)}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in finished:
                        name, sha, n = fut.result()
                        with lock:
                            journal["files"][name] = {"name": name, "bytes": n, "sha256": sha}
                            write_json_atomic(out / JOURNAL_NAME, journal, fsync)
                            written += 1
                            out_bytes += n
                        if hooks.fail_after_files is not None and written >= hooks.fail_after_files:
                            raise InjectedFailure(f"injected failure after {written} files")
            except BaseException:
                stop.set()
                for fut in pending:
                    fut.cancel()
                raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    fsync_dir(out)

    # Last: index, description, manifest; then the journal goes.
    files = [journal["files"][f.name] for f in plan.files]
    write_json_atomic(out / style.index, {"metadata": {"total_size": plan.data_bytes}, "weight_map": plan.weight_map},
                      fsync)
    if plan.description is not None:
        write_json_atomic(out / recipes.DESCRIPTION_NAME, plan.description, fsync)
    write_json_atomic(out / MANIFEST_NAME, _manifest(plan, key, identity, root, files, style.index), fsync)
    fsync_dir(out)
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    fsync_dir(out)
    return QuantizeResult(out, output_format, written, len(done), in_bytes, out_bytes, seconds, raw[0], raw[1],
                          peak_rss_bytes(), start_rss, max_shard, dict(timers.t))


def _manifest(plan: Plan, key: str, identity: dict, root: Path, files: list[dict], index: str) -> dict:
    by_name = {f.name: f for f in plan.files}
    ep_layout = None
    if plan.ep is not None:
        per = plan.n_routed_experts // plan.ep
        ep_layout = {"world": plan.ep, "experts_per_rank": per,
                     "shared_files": [f.name for f in plan.files if f.rank is None],
                     "ranks": [{"rank": r, "experts": [r * per, (r + 1) * per],
                                "files": [f.name for f in plan.files if f.rank == r]} for r in range(plan.ep)]}
    return {
        "manifest_version": MANIFEST_VERSION,
        "tool": "ascend-v4 quantize",
        "converter_version": CONVERTER_VERSION,
        "key": key,
        "format": plan.output_format,
        "ep": plan.ep,
        "n_routed_experts": plan.n_routed_experts,
        "options": converter_options(),
        "source": {"path": str(root.resolve()), **identity},
        "index": index,
        "description": recipes.DESCRIPTION_NAME if plan.description is not None else None,
        "tensors": plan.n_tensors,
        "total_bytes": sum(f["bytes"] for f in files),
        "files": [{**f, "tensors": sum(len(u.outputs) for u in by_name[f["name"]].units),
                   "rank": by_name[f["name"]].rank} for f in files],
        "ep_layout": ep_layout,
    }


__all__ = ["quantize", "make_plan", "Plan", "QuantizeResult", "Hooks", "measure_raw_read", "CONVERTER_VERSION",
           "peak_rss_bytes"]
