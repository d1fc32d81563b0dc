"""Native CPU kernels (`cpu_native.c`), compiled with the system C compiler at first use and loaded with ctypes.

Why: some ops are many small torch operations on the CPU, each a dispatch and a fresh temporary: the FP8 / FP4
QAT round-trips (8-12 ops, and the fp8 -> fp32 cast among them is not vectorised, ~2 ns a value; ~50 calls per
decode step), mHC's Sinkhorn (~120 ops a call), the Hadamard rotation and RoPE; and MKL runs the LM head's few-row
GEMM below both the memory and the FMA limit (docs/perf.md, fourth pass). The C file does each in one pass.
Round-trip scales are computed in torch with the reference's own ops between two C passes, so every result but
the head's equals its reference bit for bit (tests/unit/ops/test_cpu_native.py); the head GEMM sums the same
fp32 products in its own, row-count-independent order.

torch.compile (Inductor's C++ backend) fuses the same element-wise ops, also bit for bit, but costs ~8 s of
compilation per function in each new process and its guards cost as much as the ops they replace at decode
sizes; this file builds once per machine in ~0.5 s and is cached.

Build: `$CC` (default `cc`) with -O3 -march=native -fopenmp, no fast-math, no FMA contraction, into
`$ASCEND_V4_CACHE_DIR/cpu_native/` (default ~/.cache/ascend_v4), keyed by the source, the flags, the compiler
and the CPU's feature flags (a -march=native build must never be loaded on another CPU). Without a working
compiler, `load()` returns None once, with one warning, and the ops run their torch references. The loaded
library is a process-wide cache (like a loaded extension): it holds no device or parallel state.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-fast-math", "-fno-trapping-math", "-ffp-contract=off", "-shared",
         "-fPIC")
_I64, _INT, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {  # every exported function's arguments (the last one: OpenMP threads) and result
    "block_amax": ((_P, _P, _I64, _I64, _INT), None),  # x, out, n_blocks, block
    "fp8_apply": ((_P, _P, _P, _I64, _I64, _INT), None),  # x, scale, out, n_blocks, block
    "fp4_apply": ((_P, _P, _P, _I64, _I64, _INT), None),
    "sinkhorn": ((_P, _I64, _I64, ctypes.c_float, _I64, _INT), None),  # comb (in place), T, n, eps, iters
    "hadamard": ((_P, _P, _I64, _I64, ctypes.c_float, _INT), None),  # x, out, rows, n, n^-1/2
    "rope_": ((_P, _P, _P, _I64, _I64, _I64, _I64, _INT, _INT), None),  # x (in place), cos, sin, T, H, D, rd, inv
    "rows_gemm": ((_P, _P, _P, _I64, _I64, _I64, _INT), None),  # y, w, out, M, K, V
    "rows_gemm_available": ((), _INT),  # 1 where the build has the AVX-512 tiles
}

_lib: ctypes.CDLL | None = None
_tried = False
_why = ""  # why `load()` returned None (for `ascend-v4 doctor`)
_lock = threading.Lock()


def _cache_dir() -> Path:
    # ops may import nothing else of the project: ASCEND_V4_CACHE_DIR is read here as ascend_v4.envs does
    root = os.environ.get("ASCEND_V4_CACHE_DIR", "").strip() or "~/.cache/ascend_v4"
    return Path(root).expanduser() / "cpu_native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> list[str]:
    return (os.environ.get("CC") or "cc").split()


def _key(cc: list[str]) -> str:
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), " ".join(cc).encode(), version.encode(),
                 platform.machine().encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _build(cc: list[str], out: Path) -> None:
    """Compile into a temporary file beside `out` and rename it into place (concurrent builders are safe)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([*cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} exited with {r.returncode}: {r.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> ctypes.CDLL | None:
    """The compiled kernels (built on the first call of the process if not cached), or None without a C compiler
    or on a failed build (logged once)."""
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            _load()
    return _lib


def _load() -> None:
    global _lib, _tried, _why
    _tried = True
    cc = _compiler()
    if shutil.which(cc[0]) is None:
        _why = f"no C compiler ({cc[0]})"
        log.warning("no C compiler (%s): the CPU runs the torch versions of its C kernels (slower; the same "
                    "results but for the LM head's summation order); set CC to enable them", cc[0])
        return
    path = _cache_dir() / f"cpu_native-{_key(cc)}.so"
    try:
        if not path.exists():
            log.info("building the native CPU kernels: %s", path)
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
        for name, (args, res) in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = list(args), res
    except (OSError, RuntimeError, subprocess.TimeoutExpired, AttributeError) as e:
        _why = f"build or load failed: {e}"
        log.warning("native CPU kernels unavailable (%s): the CPU runs the torch references", e)
        return
    _lib = lib


def status() -> tuple[bool, str]:
    """(usable, what): the library's path and whether it has the AVX-512 head tiles, or why it is not usable."""
    lib = load()
    if lib is None:
        return False, _why
    tiles = "with" if has_rows_gemm(lib) else "without (no AVX-512)"
    return True, f"{lib._name}, {tiles} the few-rows GEMM tiles"


def block_amax(lib: ctypes.CDLL, x: torch.Tensor, block: int) -> torch.Tensor:
    """max |x| per run of `block` values of a contiguous fp32 CPU tensor -> [numel / block] (NaN propagates)."""
    out = torch.empty(x.numel() // block, dtype=torch.float32)
    lib.block_amax(x.data_ptr(), out.data_ptr(), out.numel(), block, torch.get_num_threads())
    return out


def sinkhorn_(lib: ctypes.CDLL, comb: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """In-place Sinkhorn of a contiguous fp32 CPU comb [T, n, n]; returns it."""
    lib.sinkhorn(comb.data_ptr(), comb.shape[0], comb.shape[1], eps, iters, torch.get_num_threads())
    return comb


def hadamard(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """Walsh-Hadamard rotation of the last dim (a power of two, at most 4096) of a contiguous fp32 CPU tensor."""
    n = x.shape[-1]
    y = torch.empty_like(x)
    lib.hadamard(x.data_ptr(), y.data_ptr(), x.numel() // n, n, n ** -0.5, torch.get_num_threads())
    return y


def rope_(lib: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """In-place interleaved RoPE of contiguous fp32 x [T, ..., D] with [T, rd] factors; returns x."""
    T, D, rd = x.shape[0], x.shape[-1], cos.shape[-1]
    lib.rope_(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), T, x.numel() // (T * D), D, rd, int(inverse),
              torch.get_num_threads())
    return x


def has_rows_gemm(lib: ctypes.CDLL) -> bool:
    """Whether this build has the few-rows GEMM (its AVX-512 tiles); asked once per library."""
    if not hasattr(lib, "_has_rows_gemm"):
        lib._has_rows_gemm = bool(lib.rows_gemm_available())
    return lib._has_rows_gemm


def rows_gemm(lib: ctypes.CDLL, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 y [M, K] @ w[V, K]^T for contiguous CPU tensors with K % 16 == 0 and V % 4 == 0 (see the C file)."""
    out = torch.empty(y.shape[0], w.shape[0], dtype=torch.float32)
    lib.rows_gemm(y.data_ptr(), w.data_ptr(), out.data_ptr(), y.shape[0], y.shape[1], w.shape[0],
                  torch.get_num_threads())
    return out


def apply_scaled(lib: ctypes.CDLL, kind: str, x: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """`kind` ("fp8" | "fp4") quantise-dequantise of each run of `block` values of x with its fp32 scale."""
    y = torch.empty_like(x)
    getattr(lib, f"{kind}_apply")(x.data_ptr(), scale.data_ptr(), y.data_ptr(), scale.numel(), block,
                                  torch.get_num_threads())
    return y
