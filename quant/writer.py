"""Writing one output file of a conversion: read each unit's source bytes, convert, stream into the file.

Memory: a worker holds one unit at a time (large copies are streamed in `COPY_CHUNK` pieces), so the peak is
about `workers x` the largest linear's working set, independent of shard sizes. Workers are threads (see
`tool.py`): the heavy parts (pread, numpy/torch kernels, sha256, write) release the GIL.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ascend_v4.quant import get_format

from .conversion_plan import OutFile, SourceTensor
from .errors import NonFiniteSourceError, QuantizeError
from .formats.base import TORCH_DTYPE
from .st_io import HashingWriter, dtype_nbytes, pread_exact, read_tensor
from .value_checks import NonFiniteValueError, check_chunk

COPY_CHUNK = 64 << 20


@dataclass
class Hooks:
    """Test hooks: simulate a crash after n files of this run, or slow every unit down."""

    fail_after_files: int | None = None
    after_unit: Callable[[], None] | None = None


class Progress:
    def __init__(self, bar, total_tensors: int) -> None:
        self.bar, self.total, self.n = bar, total_tensors, 0
        self.lock = threading.Lock()

    def update(self, nbytes: int, ntensors: int) -> None:
        if self.bar is None:
            return
        with self.lock:
            self.n += ntensors
            self.bar.update(nbytes, f"{self.n}/{self.total} tensors")


class Timers:
    def __init__(self) -> None:
        self.t = {"read": 0.0, "compute": 0.0, "write": 0.0}
        self.lock = threading.Lock()

    def add(self, **kw: float) -> None:
        with self.lock:
            for k, v in kw.items():
                self.t[k] += v


class Fds:
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

    def chunk_buffer(self) -> memoryview:
        """This thread's reusable `COPY_CHUNK` read buffer (a chunk is checked and written before the next read)."""
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = memoryview(bytearray(COPY_CHUNK))
        return buf

    def close_mine(self) -> None:
        for fd in getattr(self.local, "fds", {}).values():
            os.close(fd)
        self.local.fds = {}


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


class Cancelled(Exception):
    """Another worker failed or the run was interrupted: stop at the next unit."""


class SourceValues:
    """Every source byte the converter reads is checked for non-finite values (`value_checks`): the first one
    raises `NonFiniteSourceError` naming file, tensor and element, or, with `allow`, is reported through `warn`
    once per tensor and the run goes on."""

    def __init__(self, allow: bool = False, warn: Callable[[str], None] | None = None) -> None:
        self.allow, self.warn = allow, warn or (lambda s: None)
        self.warned: set[str] = set()
        self.lock = threading.Lock()

    def check(self, t: SourceTensor, buf, first_element: int = 0, scale_of: str | None = None) -> None:
        try:
            check_chunk(t.dtype, buf, tensor=t.name, file=t.file, first_element=first_element, shape=t.shape,
                        scale_of=scale_of)
        except NonFiniteValueError as e:
            if not self.allow:
                raise NonFiniteSourceError(f"{e}; the source checkpoint is corrupt (pass --allow-nonfinite to "
                                           f"convert it anyway)") from None
            with self.lock:
                if t.name not in self.warned:
                    self.warned.add(t.name)
                    self.warn(f"warning: {e} (converted anyway: --allow-nonfinite)")


@dataclass
class Run:
    """What every `write_file` of one conversion shares."""

    out: Path
    fds: Fds
    fsync: bool
    progress: Progress
    timers: Timers
    hooks: Hooks
    stop: threading.Event
    values: SourceValues


def write_file(f: OutFile, run: Run) -> tuple[str, int]:
    """Write output file `f` under `<name>.partial`, then fsync and rename it; (sha256, bytes)."""
    fds, timers, values = run.fds, run.timers, run.values
    w = HashingWriter(run.out / f.name, fsync=run.fsync)
    try:
        w.write(f.header)
        main = {t.name for t in f.order if t.nbytes % 8 == 0}
        stash: dict[str, bytes | np.ndarray] = {}
        for u in f.units:
            if run.stop.is_set():
                raise Cancelled(f.name)
            t0 = time.perf_counter()
            if u.is_copy:
                s, o = u.src[0], u.outputs[0]
                width = dtype_nbytes(s.dtype)
                if o.name in main:
                    fd, buf = fds.get(s.file), fds.chunk_buffer()
                    for pos in range(s.begin, s.end, COPY_CHUNK):  # chunks start on element boundaries
                        n = min(COPY_CHUNK, s.end - pos)
                        t1 = time.perf_counter()
                        chunk = pread_exact(fd, pos, n, f"{s.file}: {s.name}", into=buf)
                        if not u.duplicate:
                            values.check(s, chunk, (pos - s.begin) // width, u.scale_of)
                        t2 = time.perf_counter()
                        w.write(chunk)
                        timers.add(read=t2 - t1, write=time.perf_counter() - t2)
                else:
                    data = bytes(pread_exact(fds.get(s.file), s.begin, s.end - s.begin, f"{s.file}: {s.name}"))
                    if not u.duplicate:
                        values.check(s, data, 0, u.scale_of)
                    stash[o.name] = data
            else:
                wt, st = u.src
                tens = {"weight": read_tensor(fds.get(wt.file), wt), "scale": read_tensor(fds.get(st.file), st)}
                values.check(wt, tens["weight"])
                values.check(st, tens["scale"], scale_of=wt.dtype)
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
            run.progress.update(u.src_bytes, len(u.outputs))
            if run.hooks.after_unit:
                run.hooks.after_unit()
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


__all__ = ["Hooks", "Progress", "Timers", "Fds", "Cancelled", "SourceValues", "Run", "write_file", "COPY_CHUNK"]
