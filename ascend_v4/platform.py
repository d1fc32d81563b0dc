"""Detect the device once: Ascend NPU, CUDA GPU or CPU, and the matching comm / op backends.

Import hygiene (ascend-notes.md §0.6, §9): importing this module imports neither torch_npu nor torch.
`detect_platform()` probes for torch_npu with `importlib.util.find_spec` first and imports it only
when present, inside a try/except: torch_npu without CANN raises on import (`libhccl.so` missing), and
then we log one warning and fall back to CUDA or CPU. The result is cached by `functools.lru_cache`
(call `detect_platform.cache_clear()` after changing `ASCEND_V4_DEVICE`, e.g. in tests).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Literal

from ascend_v4 import envs

log = logging.getLogger(__name__)

DeviceType = Literal["npu", "cuda", "cpu"]
CommBackend = Literal["hccl", "nccl", "gloo"]
OpBackend = Literal["npu", "triton", "reference"]

COMM_BACKENDS: dict[str, CommBackend] = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


@dataclass(frozen=True)
class Platform:
    """Where this process runs.

    Attributes:
        device_type: "npu", "cuda" or "cpu".
        device: torch device string, e.g. "cpu", "cuda", "npu:1" (index only when ASCEND_V4_DEVICE gave one).
        comm_backend: torch.distributed backend for this device: hccl, nccl or gloo.
        op_backend: preferred kernels for the ascend_v4:: ops: "npu" (Ascend C), "triton" or "reference".
            This is the intent; `ascend_v4.ops` falls back to the reference per op when a kernel is missing.
        reason: one line on how the choice was made (shown by `ascend-v4 doctor`).
    """

    device_type: DeviceType
    device: str
    comm_backend: CommBackend
    op_backend: OpBackend
    reason: str


def _npu_available() -> tuple[bool, str]:
    """(usable, why). Imports torch_npu only if it is installed; never raises."""
    if importlib.util.find_spec("torch_npu") is None:
        return False, "torch_npu is not installed"
    try:
        importlib.import_module("torch_npu")  # registers torch.npu; needs CANN (libhccl.so, libascendcl.so)
        import torch

        if not torch.npu.is_available():  # type: ignore[attr-defined]
            return False, "torch_npu imported but torch.npu.is_available() is False"
        return True, "torch_npu imported and an NPU is visible"
    except Exception as e:  # ImportError / OSError without CANN, RuntimeError from a mismatched torch
        log.warning("torch_npu is installed but unusable (%s: %s); falling back to CUDA/CPU. "
                    "Install CANN or set ASCEND_V4_DEVICE=cpu to silence this.", type(e).__name__, e)
        return False, f"torch_npu failed to import ({type(e).__name__})"


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _op_backend(device_type: DeviceType) -> OpBackend:
    forced = envs.op_backend()
    if forced != "auto":
        return forced  # type: ignore[return-value]
    if device_type == "npu":
        return "npu"
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "reference"


def _make(device_type: DeviceType, device: str, reason: str) -> Platform:
    return Platform(device_type, device, COMM_BACKENDS[device_type], _op_backend(device_type), reason)


@functools.lru_cache(maxsize=1)
def detect_platform() -> Platform:
    """Detect the platform once per process (cached). Honours ASCEND_V4_DEVICE and ASCEND_V4_OP_BACKEND.

    Raises:
        RuntimeError: ASCEND_V4_DEVICE names a device that is not usable here (no silent fallback
            when the user asked for a device explicitly).
    """
    forced = envs.device()
    if forced is not None:
        kind: DeviceType = forced.partition(":")[0]  # type: ignore[assignment]
        if kind == "npu":
            ok, why = _npu_available()
            if not ok:
                raise RuntimeError(f"ASCEND_V4_DEVICE={forced} but the NPU is not usable: {why}")
        elif kind == "cuda" and not _cuda_available():
            raise RuntimeError(f"ASCEND_V4_DEVICE={forced} but torch.cuda.is_available() is False")
        return _make(kind, forced, f"ASCEND_V4_DEVICE={forced}")

    ok, why = _npu_available()
    if ok:
        return _make("npu", "npu", why)
    if _cuda_available():
        return _make("cuda", "cuda", f"CUDA is available ({why})")
    return _make("cpu", "cpu", f"no accelerator found ({why}; CUDA not available)")


__all__ = ["Platform", "detect_platform", "COMM_BACKENDS"]
