"""Minimal streaming safetensors I/O for the converter: positional reads, header-first writes, hashing.

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
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceReadError

_WIDTH = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4,
          "I64": 8, "F64": 8}
HASH_CHUNK = 16 << 20


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file; begin/end are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> tuple[dict[str, Entry], bytes, int]:
    """(entries by name in file order, raw header JSON bytes, data start offset). Trusts the file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    hdr = json.loads(raw)
    hdr.pop("__metadata__", None)
    base = 8 + n
    ents = sorted((Entry(k, v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
                   for k, v in hdr.items()), key=lambda e: e.begin)
    return {e.name: e for e in ents}, raw, base


def pread_exact(fd: int, offset: int, n: int, what: str) -> bytearray:
    """Read exactly n bytes at offset; a short read (file truncated since validation) raises SourceReadError."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k <= 0:
            raise SourceReadError(f"{what}: file ended after {got} of {n} bytes at offset {offset} "
                                  f"(truncated or modified during the conversion)")
        got += k
    return buf


def order_for_writing(items: list[tuple[str, str, int]]) -> list[int]:
    """Indices of (name, dtype, nbytes) items in on-disk order (see module docstring)."""
    main = [i for i, (_, _, n) in enumerate(items) if n % 8 == 0]
    tail = [i for i, (_, _, n) in enumerate(items) if n % 8 != 0]
    tail.sort(key=lambda i: -_WIDTH[items[i][1]])
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
    """Write a file under `<name>.partial`, hashing every byte; `commit()` fsyncs and renames it into place."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path, self.tmp, self.fsync = path, path.with_name(path.name + ".partial"), fsync
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        self.f.write(mv)
        self.h.update(mv)
        self.n += len(mv)

    def commit(self) -> tuple[str, int]:
        self.f.flush()
        if self.fsync:
            os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.h.hexdigest(), self.n

    def abort(self) -> None:
        self.f.close()
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
