"""Process-wide heap settings for an engine that computes on the CPU.

Why: PyTorch's CPU tensors come straight from `malloc`, with no caching allocator in between. glibc serves
requests above its mmap threshold (128 KiB at start, raised as large blocks are freed) with a fresh `mmap` and
returns them with `munmap`, and hands the top of the heap back to the kernel once more than the trim threshold
is free. A prefill step allocates and frees hundreds of activation temporaries of 1-32 MiB, so each one used
to arrive as untouched pages: the kernel zero-fills and maps them on first touch, and that page-fault work cost
more than the arithmetic (an `abs` of 8 M fp32 values: 10 ms fresh, 1.9 ms on reused memory; a 16 x 128-token
prefill of `small`: 1.65 -> 1.43 s, docs/perf.md).

What: the mmap threshold is pinned at glibc's maximum (32 MiB), `M_MMAP_MAX` set to 0 so that larger blocks
(a prefill's [2048, 8, 512] fp32 activations are exactly 32 MiB) come from the heap too, and the trim threshold
raised so freed heap memory stays mapped for the next step; what the process holds is then its high-water mark,
as with the device caching allocators of torch. (Threads other than the main one allocate from arenas of at
most 64 MiB; glibc still maps a larger block for them, whatever M_MMAP_MAX says.) Setting the trim threshold
alone would be worse than the defaults: any explicit setting turns off glibc's adaptive mmap threshold, which
then stays at 128 KiB.

`ASCEND_V4_CPU_MALLOC=0` leaves glibc's defaults. Elsewhere (musl, macOS, no libc found) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from ascend_v4 import envs

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit builds
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int

_done: bool | None = None  # None: not tried yet; else whether the settings took effect (process-wide)


def keep_freed_heap() -> bool:
    """Apply the settings once per process (idempotent); True when glibc accepted all three."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not envs.cpu_malloc():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None) if libc else None
        if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
            return False  # not glibc: its allocator has its own policy
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        _done = all(mallopt(param, value) == 1 for param, value in
                    ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    except OSError as e:
        log.debug("CPU allocator settings not applied: %s", e)
    log.debug("CPU allocator: keep freed heap memory (mmap threshold %d, no mmap blocks, trim threshold %d): %s",
              MMAP_THRESHOLD, TRIM_THRESHOLD, _done)
    return _done
