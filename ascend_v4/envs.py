"""Every `ASCEND_V4_*` environment variable, in one registry, with one getter each.

Read variables through these getters only (never `os.environ["ASCEND_V4_..."]` elsewhere), so that
`ascend-v4 doctor` can list them all and a new switch cannot hide. Getters read the environment on
every call: nothing is cached here (callers that cache, like `platform.detect_platform`, say so).

Ledger: `ascend_v4.ops` may import nothing else from the project (tests/unit/test_imports.py), so
`ops/_backends.py` reads `ASCEND_V4_OP_BACKEND` and `ops/triton/_interpret.py` reads
`ASCEND_V4_TRITON_RERUN` directly; they are registered here all the same (a test checks that every
`ASCEND_V4_*` name in the sources is), so keep names and values in sync.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

OP_BACKENDS = ("auto", "reference", "triton", "npu")
DEVICE_TYPES = ("cpu", "cuda", "npu")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class EnvVar:
    """One registered variable: its name, default (None = unset means "not given") and meaning."""

    name: str
    default: str | None
    help: str
    internal: bool = False  # set by the toolkit itself, not by users


ENV_VARS: dict[str, EnvVar] = {
    v.name: v
    for v in (
        EnvVar("ASCEND_V4_CACHE_DIR", "~/.cache/ascend_v4",
               "where dummy checkpoints and other generated files are cached"),
        EnvVar("ASCEND_V4_MODEL_DIR", None,
               "directory searched for real checkpoints (e.g. flash, pro) when --model is not a path"),
        EnvVar("ASCEND_V4_OP_BACKEND", "auto",
               "force the op backend for debugging: auto | reference | triton | npu"),
        EnvVar("ASCEND_V4_NPU_MX_GEMM", "0",
               "1 = FP8/FP4 expert GEMMs on Ascend 950 use the native MX kernel (written only, never run); "
               "0 = dequantise to BF16 in the vector unit first"),
        EnvVar("ASCEND_V4_NPU_SELFCHECK", "1",
               "1 = at the first NPU call, run every usable backend of every op against the CPU reference and "
               "drop those that fail (ops/npu/selfcheck.py); 0 = trust every usable backend"),
        EnvVar("ASCEND_V4_NPU_SELFCHECK_DEVICE", "npu",
               "internal: device of the self-check's inputs (tests run it on cpu through a torch_npu test double)",
               internal=True),
        EnvVar("ASCEND_V4_CPU_MALLOC", "1",
               "1 = an engine on a CPU device keeps freed heap memory for reuse (glibc mallopt; "
               "runtime/cpu_alloc.py); 0 = leave glibc's defaults"),
        EnvVar("ASCEND_V4_DEVICE", None,
               "override device detection: cpu | cuda | npu (optionally with an index, e.g. npu:1)"),
        EnvVar("ASCEND_V4_LOG_LEVEL", "WARNING",
               "log level of the ascend_v4 loggers: DEBUG | INFO | WARNING | ERROR | CRITICAL"),
        EnvVar("ASCEND_V4_DEBUG", "0",
               "1 = the CLI shows the Python traceback of an error (as `ascend-v4 --debug`); "
               "0 = one `error: ...` line"),
        EnvVar("ASCEND_V4_TRITON_RERUN", None,
               "internal: marks the child pytest process that reruns Triton tests in interpreter mode",
               internal=True),
    )
}


def _raw(name: str) -> str | None:
    """The variable's value, or None when unset or blank (blank counts as unset)."""
    assert name in ENV_VARS, f"{name} is not registered in ascend_v4.envs.ENV_VARS"
    value = os.environ.get(name, "").strip()
    return value or None


def _choice(name: str, allowed: tuple[str, ...], value: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    return value


# Root of generated files (dummy checkpoints, ...); default ~/.cache/ascend_v4.
def cache_dir() -> Path:
    return Path(_raw("ASCEND_V4_CACHE_DIR") or ENV_VARS["ASCEND_V4_CACHE_DIR"].default or "").expanduser()


# Directory holding real checkpoints, looked up by name when --model is not a path; None when unset.
def model_dir() -> Path | None:
    value = _raw("ASCEND_V4_MODEL_DIR")
    return Path(value).expanduser() if value else None


# Forced op backend (auto | reference | triton | npu); "auto" lets the ops layer choose per device.
def op_backend() -> str:
    return _choice("ASCEND_V4_OP_BACKEND", OP_BACKENDS, (_raw("ASCEND_V4_OP_BACKEND") or "auto").lower())


# The 950 native MX grouped GEMM switch ("0" | "1"). ops/npu/kernels.py reads the variable itself (ops imports
# nothing from the rest of the project); this getter validates it for `doctor` and the docs.
def npu_mx_gemm() -> bool:
    return _choice("ASCEND_V4_NPU_MX_GEMM", ("0", "1"), _raw("ASCEND_V4_NPU_MX_GEMM") or "0") == "1"


# The NPU op self-check switch ("1" | "0"); ops/npu/selfcheck.py reads it itself, like the MX switch above.
def npu_selfcheck() -> bool:
    return _choice("ASCEND_V4_NPU_SELFCHECK", ("0", "1"), _raw("ASCEND_V4_NPU_SELFCHECK") or "1") == "1"


# Device of the self-check's inputs (internal: "cpu" in tests that run it through a torch_npu double).
def npu_selfcheck_device() -> str:
    return _raw("ASCEND_V4_NPU_SELFCHECK_DEVICE") or "npu"


# The CPU allocator tuning switch ("1" | "0"), read by runtime/cpu_alloc.py; default on.
def cpu_malloc() -> bool:
    return _choice("ASCEND_V4_CPU_MALLOC", ("0", "1"), _raw("ASCEND_V4_CPU_MALLOC") or "1") == "1"


# Device override ("cpu", "cuda", "npu", "npu:1", ...); None = detect.
def device() -> str | None:
    value = _raw("ASCEND_V4_DEVICE")
    if value is None:
        return None
    value = value.lower()
    kind, _, index = value.partition(":")
    _choice("ASCEND_V4_DEVICE", DEVICE_TYPES, kind)
    if index and not index.isdigit():
        raise ValueError(f"ASCEND_V4_DEVICE={value!r}: the device index after ':' must be a number")
    return value


# Log level name for the ascend_v4 loggers; default WARNING.
def log_level() -> str:
    return _choice("ASCEND_V4_LOG_LEVEL", LOG_LEVELS, (_raw("ASCEND_V4_LOG_LEVEL") or "WARNING").upper())


# CLI tracebacks switch ("0" | "1"), same as `ascend-v4 --debug`; default 0 (one `error: ...` line per error).
def debug() -> bool:
    return _choice("ASCEND_V4_DEBUG", ("0", "1"), _raw("ASCEND_V4_DEBUG") or "0") == "1"


# Internal: true inside the Triton interpreter-mode child test process (read directly by ops/triton/_interpret.py).
def triton_rerun() -> bool:
    return _raw("ASCEND_V4_TRITON_RERUN") is not None


def list_env_vars() -> list[dict[str, str | bool | None]]:
    """Every registered variable with its current raw value, default and meaning (for `doctor`)."""
    return [{"name": v.name, "value": os.environ.get(v.name), "default": v.default, "help": v.help,
             "internal": v.internal} for v in ENV_VARS.values()]


__all__ = ["EnvVar", "ENV_VARS", "OP_BACKENDS", "DEVICE_TYPES", "LOG_LEVELS", "cache_dir", "model_dir",
           "op_backend", "device", "log_level", "debug", "triton_rerun", "list_env_vars"]
