"""The raw-read baseline of `quantize`: a cold sequential read of the same source bytes, timed in the same run,
as the reference for the printed throughput ratio."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .conversion_plan import OutFile, SourceCheckpoint

READ_SAMPLE_BYTES = 4 << 30  # default baseline: this many bytes spread over the source shards


def evict(paths: list[Path]) -> None:
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
    evict(paths)
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
    evict(paths)
    return n, dt


def read_ranges(src: SourceCheckpoint, files: list[OutFile]) -> list[tuple[Path, int, int]]:
    """Per source shard, the span of bytes the given output files read from it."""
    spans: dict[str, list[int]] = {}
    for f in files:
        for u in f.units:
            for t in u.src:
                s = spans.setdefault(t.file, [t.begin, t.end])
                s[0], s[1] = min(s[0], t.begin), max(s[1], t.end)
    root = Path(src.path)
    return [(root / name, b, e) for name, (b, e) in sorted(spans.items())]


__all__ = ["measure_raw_read", "read_ranges", "evict", "READ_SAMPLE_BYTES"]
