"""The project's one safetensors I/O module: the dtype table, a validating header parse, positional reads,
header-first writes with hashing. `ascend_v4.checkpoint` (reader, loader, dummy writer) and the converter
(`quant/`) both use it, so a format rule lives here only.

A safetensors file is `u64 little-endian header length N`, `N bytes of JSON`, then the data buffer; each JSON
entry is `{"dtype", "shape", "data_offsets": [begin, end]}` relative to the buffer. `parse_header` checks that
the header describes the file's bytes exactly (no gaps, overlaps, sizes that disagree with shape x dtype,
offsets past the end) before anything is read or mapped, naming the file and the tensor in each problem.

Reads use `os.pread` into fresh buffers (never mmap: the pages would count towards RSS, and a shard truncated
while we read it must raise `SourceReadError`, not SIGBUS). Writes compute the whole header from the planned
shapes first, then stream each tensor's bytes in header order while hashing them (sha256), so memory holds one
tensor at a time and the file's hash costs no second read.

Order of tensors in a written file: tensors whose byte size is a multiple of 8 first (planned order), then the
others by decreasing element width. With the header padded to 8 bytes this keeps every tensor aligned to its
element size without holes (safetensors forbids gaps between tensors).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SourceReadError

# Bits per element of every safetensors dtype (F4 / F6 headers count unpacked values, model-spec.md §16).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
# safetensors dtype name -> torch dtype, for the dtypes a V4 checkpoint or a converted one uses (model-spec §8.1).
TORCH_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "I8": torch.int8, "BF16": torch.bfloat16,
    "F32": torch.float32, "I64": torch.int64, "F16": torch.float16, "F64": torch.float64, "I32": torch.int32,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E5M2": torch.float8_e5m2,
}
ST_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}  # torch dtype -> safetensors name
# A header longer than this is certainly corrupt (the Flash shards' headers are ~200 KB).
MAX_HEADER_BYTES = 100 << 20
HASH_CHUNK = 16 << 20
WRITEBACK_CHUNK = 32 << 20  # HashingWriter starts writeback every this many bytes (with fsync)


def dtype_nbytes(dtype: str) -> int:
    """Bytes per element of a whole-byte safetensors dtype (KeyError for an unknown one)."""
    bits = DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"{dtype} packs {bits}-bit elements: use tensor_nbytes")
    return bits // 8


def tensor_nbytes(shape, dtype: str) -> int:
    """Bytes of a tensor of `shape` stored as `dtype` (sub-byte dtypes rounded up to whole bytes)."""
    return math.ceil(math.prod(shape) * DTYPE_BITS[dtype] / 8)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a shard header describes it. `begin`/`end` are absolute byte offsets in the file."""

    name: str
    file: str  # shard file name, relative to the checkpoint directory
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    file_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]  # in data (file offset) order
    broken: frozenset[str] = frozenset()  # names whose header entry was reported as a problem


def parse_header(path: str | Path, problems: list[str]) -> ShardHeader:
    """Parse the header of one safetensors file and check that it describes the file's bytes exactly.

    Problems (truncated file, unparsable JSON, offsets past the end of file, sizes that do not match
    shape x dtype, gaps/overlaps) are appended to `problems`, each naming the file and the tensor; broken
    entries are left out of the result (and listed in `ShardHeader.broken`). OSError (missing or unreadable
    file) propagates.
    """
    path = Path(path)
    probs = problems
    fname = path.name
    size = path.stat().st_size
    tensors: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    broken: set[str] = set()

    def done() -> ShardHeader:
        return ShardHeader(path, size, metadata, tensors, frozenset(broken))

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            probs.append(f"{fname}: file is {size} bytes, too short for a safetensors header (truncated?)")
            return done()
        (hlen,) = struct.unpack("<Q", head)
        if hlen > min(size - 8, MAX_HEADER_BYTES):
            probs.append(f"{fname}: header length {hlen} exceeds the file size {size} (truncated or not safetensors)")
            return done()
        raw = f.read(hlen)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        probs.append(f"{fname}: unreadable safetensors header ({e})")
        return done()

    meta = header.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    base, buf_size = 8 + hlen, size - 8 - hlen
    spans: list[tuple[int, int, str]] = []
    past: list[tuple[int, str]] = []  # (absolute end, name) of entries running past the end of the file
    for name, ent in header.items():
        where = f"{fname}: {name}"
        broken.add(name)  # until every check below passed
        try:
            dtype, shape = ent["dtype"], tuple(int(x) for x in ent["shape"])
            b, e = (int(x) for x in ent["data_offsets"])
        except (KeyError, TypeError, ValueError):
            probs.append(f"{where}: malformed header entry {ent!r}")
            continue
        if dtype not in DTYPE_BITS:
            probs.append(f"{where}: unknown dtype {dtype!r}")
            continue
        want = tensor_nbytes(shape, dtype)
        if min(shape, default=0) < 0 or not 0 <= b <= e:
            probs.append(f"{where}: invalid shape {list(shape)} or data_offsets [{b}, {e}]")
            continue
        if e - b != want:
            probs.append(f"{where}: header says {e - b} bytes but {dtype} {list(shape)} needs {want}")
            continue
        if e > buf_size:
            past.append((base + e, name))
            continue
        spans.append((b, e, name))
        broken.discard(name)
        tensors[name] = TensorEntry(name, fname, dtype, shape, base + b, base + e)

    if past:  # one line per file: a truncated shard would otherwise flood the report
        end, name = min(past)
        more = f"; {len(past) - 1} more tensors of this file affected" if len(past) > 1 else ""
        probs.append(f"{fname}: {name}: data ends at byte {end}, past the end of the file ({size} bytes): "
                     f"truncated shard or a header that lies about sizes{more}")

    # safetensors requires the buffer to be covered exactly: no gaps, no overlaps, nothing after the end.
    spans.sort()
    pos = 0
    for b, e, name in spans:
        if b != pos:
            what = "overlaps the previous tensor" if b < pos else f"leaves a gap of {b - pos} bytes"
            probs.append(f"{fname}: {name}: data_offsets [{b}, {e}] {what}")
        pos = max(pos, e)
    if spans and pos < buf_size and len(tensors) == len(header):
        probs.append(f"{fname}: {buf_size - pos} trailing bytes after the last tensor")
    tensors = {name: tensors[name] for _, _, name in spans}
    return done()


def pread_exact(fd: int, offset: int, n: int, what: str, into: memoryview | None = None) -> bytearray | memoryview:
    """Read exactly n bytes at offset; a short read (file truncated since validation) raises SourceReadError.

    `into`: a buffer of at least n bytes to read into (its first n bytes are returned) instead of a fresh one:
    streaming copies reuse one buffer per thread rather than allocating and zero-filling 64 MiB per chunk."""
    buf = bytearray(n) if into is None else into[:n]
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = os.preadv(fd, [view[got:]], offset + got)
        except OSError as e:
            raise SourceReadError(f"{what}: {e.strerror or e} reading {n} bytes at offset {offset}") from None
        if k <= 0:
            raise SourceReadError(f"{what}: file ended after {got} of {n} bytes at offset {offset} "
                                  f"(truncated or modified during the conversion)")
        got += k
    return buf


def read_tensor(fd: int, entry: TensorEntry, what: str | None = None) -> torch.Tensor:
    """The tensor `entry` of the open file `fd`, read with `pread_exact` into fresh memory (shape and dtype of
    the header)."""
    buf = pread_exact(fd, entry.begin, entry.end - entry.begin, what or f"{entry.file}: {entry.name}")
    raw = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
    return raw.view(TORCH_DTYPES[entry.dtype]).reshape(entry.shape)


def order_for_writing(items: list[tuple[str, str, int]]) -> list[int]:
    """Indices of (name, dtype, nbytes) items in on-disk order (see module docstring)."""
    main = [i for i, (_, _, n) in enumerate(items) if n % 8 == 0]
    tail = [i for i, (_, _, n) in enumerate(items) if n % 8 != 0]
    tail.sort(key=lambda i: -DTYPE_BITS[items[i][1]])
    return main + tail


def build_header(items: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header (padded to 8) for (name, dtype, shape, nbytes) items in on-disk order."""
    hdr: dict = {"__metadata__": metadata}
    pos = 0
    for name, dtype, shape, n in items:
        hdr[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class HashingWriter:
    """Write a file under `<name>.partial`, hashing every byte; `commit()` fsyncs and renames it into place.

    With `fsync`, every `WRITEBACK_CHUNK` bytes written are handed to the kernel's writeback at once
    (`posix_fadvise(DONTNEED)` starts it without waiting, and drops the pages once clean), so the final fsync
    waits for the tail only instead of the whole file."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path, self.tmp, self.fsync = path, path.with_name(path.name + ".partial"), fsync
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.n = 0
        self._flushed = 0  # bytes already handed to writeback

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        try:
            self.f.write(mv)
            if self.fsync and self.n + len(mv) - self._flushed >= WRITEBACK_CHUNK:
                self.f.flush()
                os.posix_fadvise(self.f.fileno(), self._flushed, self.n + len(mv) - self._flushed,
                                 os.POSIX_FADV_DONTNEED)
                self._flushed = self.n + len(mv)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.tmp)) from None  # name the file (write() does not)
        self.h.update(mv)
        self.n += len(mv)

    def commit(self) -> tuple[str, int]:
        try:
            self.f.flush()
            if self.fsync:
                os.fsync(self.f.fileno())
            self.f.close()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.tmp)) from None
        os.replace(self.tmp, self.path)
        return self.h.hexdigest(), self.n

    def abort(self) -> None:
        try:
            self.f.close()  # may fail again (ENOSPC on the final flush): the file goes anyway
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj, fsync: bool = True) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=False) + "\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
