"""The NPU backend of a process: what it has (torch_npu, vllm-ascend's op library, ours, triton-ascend, the SoC,
the self-check's verdicts) and the choice of implementation per op and call (`Backend.run`, over the candidate
lists of `candidates.py`). Resolved once, at the first NPU call (`backend()`); tests swap in a backend built on a
torch_npu test double with `use_backend`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from . import tiling as _tiling
from ._loader import OpLibrary, load_op_library

if TYPE_CHECKING:
    from .vllm_ascend_ops import VllmAscendLib

log = logging.getLogger("ascend_v4.ops")

TRITON_OPS = ("sparse_attn", "indexer_topk", "compress_kv", "quant_gemm", "hc_pre", "hc_post", "hc_head")
# torch_npu.npu.get_soc_version() ids: A2 220-225, A3 250-255, the Ascend 950 family from 260 on
# (ascend-notes.md §1; torch_npu's SocVersion enum, Ascend950 = 260)
SOC_ASCEND950 = 260
# The switch of the 950 native MX grouped GEMM. Ledger: read here with os.environ because ascend_v4.ops imports
# nothing else from the project; the variable belongs in ascend_v4/envs.py's registry like ASCEND_V4_OP_BACKEND.
MX_GEMM_ENV = "ASCEND_V4_NPU_MX_GEMM"


def mx_gemm_requested() -> bool:
    """ASCEND_V4_NPU_MX_GEMM: "1" = use the 950 native MX grouped GEMM, "0" = do not; unset or blank =
    `tiling.MX_KERNEL_READY` (False while the kernel is written only). Anything else is an error."""
    raw = os.environ.get(MX_GEMM_ENV, "").strip()
    if not raw:
        return _tiling.MX_KERNEL_READY
    if raw not in ("0", "1"):
        raise ValueError(f"{MX_GEMM_ENV}={raw!r} is not one of 0, 1")
    return raw == "1"


def soc_version(torch_npu: object) -> int:
    """torch_npu.npu.get_soc_version(), or -1 when it cannot say (no device, an old torch_npu)."""
    try:
        return int(torch_npu.npu.get_soc_version())  # type: ignore[attr-defined]
    except Exception:  # AttributeError, or the runtime's own error without a device
        return -1


@dataclass
class Backend:
    """What this process uses on the NPU; resolved once, at the first NPU call (see `backend()`).

    `mx_gemm`: FP8/FP4 GEMMs through the op library ask for its 950 native MX variant (see `make_backend`).
    `vllm`: vllm-ascend's compiled op library (`vllm_ascend_ops.VllmAscendLib`), absent by default.
    `verdicts`: the self-check's {(op, backend): passed} (`selfcheck.check_backend`); a candidate that failed
    it is never used. Without a self-check every usable candidate is trusted."""

    torch_npu: object
    lib: OpLibrary
    triton: dict[str, Callable] = field(default_factory=dict)
    soc_version: int = -1
    mx_gemm: bool = False
    vllm: "VllmAscendLib" = field(default_factory=lambda: _vllm_ops().VllmAscendLib.absent())
    verdicts: dict[tuple[str, str], bool] = field(default_factory=dict)
    device: str = "npu"  # where the self-check puts its inputs (tests with a torch_npu double: "cpu")
    _ranked: dict[str, list] = field(default_factory=dict, repr=False)

    def candidates(self, op: str) -> list:
        """The candidates of `op` this process can run, most preferred first: usable here and not failed by
        the self-check (`candidates.py`)."""
        if op not in self._ranked:
            from .candidates import table

            self._ranked[op] = [c for c in table()[op] if c.usable(self) is None
                                and self.verdicts.get((op, c.backend), True)]
        return self._ranked[op]

    def run(self, op: str, *args):
        """Run `op` on the first ranked candidate that accepts these inputs."""
        for c in self.candidates(op):
            if c.accepts(*args):
                return c.run(*args)
        raise RuntimeError(f"ascend_v4::{op}: no NPU implementation accepts these inputs "
                           f"({', '.join(c.backend for c in self.candidates(op)) or 'none usable'})")

    def choice(self, op: str) -> str:
        """The backend `op` runs on for bf16 inputs (the first ranked candidate)."""
        ranked = self.candidates(op)
        return ranked[0].backend if ranked else "none"

    def describe(self) -> dict[str, str]:
        from .candidates import table

        return {op: self.choice(op) for op in table()}


def _vllm_ops():
    from . import vllm_ascend_ops

    return vllm_ascend_ops


def _triton_ascend_launchers() -> dict[str, Callable]:
    """The ops/triton launchers when triton-ascend is installed (never upstream triton on an NPU box)."""
    try:
        importlib.metadata.distribution("triton-ascend")
    except importlib.metadata.PackageNotFoundError:
        return {}
    try:
        from ..triton import launchers

        fns = launchers()
    except Exception as e:  # ImportError, or triton's own errors when no Ascend driver is active
        log.warning("triton-ascend is installed but the ascend-v4 Triton kernels do not load (%s)", e)
        return {}
    return {op: fn for op, fn in fns.items() if op in TRITON_OPS}


def make_backend(torch_npu: object, lib: OpLibrary, triton: dict[str, Callable] | None = None, *,
                 soc: int | None = None, mx_requested: bool | None = None,
                 vllm: "VllmAscendLib | None" = None) -> Backend:
    """The backend for `torch_npu`, our op library `lib` and vllm-ascend's (`vllm`, default: absent).
    `soc` defaults to `soc_version(torch_npu)`, `mx_requested` to `mx_gemm_requested()`; the MX variant is
    used when it is requested, the op library is loaded and the SoC is a 950."""
    soc = soc_version(torch_npu) if soc is None else soc
    want = mx_gemm_requested() if mx_requested is None else mx_requested
    b = Backend(torch_npu, lib, dict(triton or {}), soc, bool(want and lib.loaded and soc >= SOC_ASCEND950),
                vllm or _vllm_ops().VllmAscendLib.absent())
    if not lib.loaded and not b.vllm.loaded:
        fallback = "triton-ascend kernels" if b.triton else "reference ops"
        log.warning("ascend-v4 NPU op library unavailable: %s. sparse_attn / quant_gemm use %s, moe_experts uses "
                    "torch_npu routing + npu_grouped_matmul on BF16-decoded experts (slower). Run "
                    "`ascend-v4 doctor` for details.", lib.reason, fallback)
    elif want and not b.mx_gemm:
        log.warning("%s=1 asks for the Ascend 950 native MX grouped GEMM, but this SoC (id %d) is not a 950; "
                    "the FP8/FP4 GEMMs use the vector-dequant kernel", MX_GEMM_ENV, soc)
    elif b.mx_gemm:
        log.warning("%s=1: FP8/FP4 GEMMs use the Ascend 950 native MX kernel, which has never been run "
                    "(written only, docs/npu.md); unset the variable if results look wrong", MX_GEMM_ENV)
    return b


def build_backend() -> Backend:
    """A backend for this process, not yet self-checked: imports torch_npu, loads our op library and vllm-ascend's
    (triton-ascend launchers only where ours is missing). `backend()` caches one; the doctor's check builds its own."""
    tnpu = importlib.import_module("torch_npu")
    lib = load_op_library()
    return make_backend(tnpu, lib, {} if lib.loaded else _triton_ascend_launchers(),
                        vllm=_vllm_ops().load_vllm_ascend_ops())


@functools.lru_cache(maxsize=1)
def backend() -> Backend:
    """Resolve the NPU backend once per process: torch_npu (already imported, the tensors are on the NPU),
    vllm-ascend's op library and ours (loaded here, warning once if neither is there), triton-ascend
    launchers as the next fallback, the SoC id and ASCEND_V4_NPU_MX_GEMM (the 950 native MX GEMM switch);
    then the device self-check (`selfcheck.py`, unless ASCEND_V4_NPU_SELFCHECK=0) on every op."""
    b = build_backend()
    from .selfcheck import self_check_enabled, check_backend

    if self_check_enabled():
        check_backend(b)  # logs every failure; failed candidates are dropped from b's ranking
    return b


# The backend the kernels below use; tests swap it (torch_npu test double) with `use_backend`.
_active: list[Backend] = []


def current() -> Backend:
    return _active[-1] if _active else backend()


class use_backend:
    """Context manager: run the NPU kernels against `b` (e.g. a torch_npu test double) instead of `backend()`."""

    def __init__(self, b: Backend):
        self.b = b

    def __enter__(self) -> Backend:
        _active.append(self.b)
        return self.b

    def __exit__(self, *exc) -> None:
        _active.remove(self.b)



__all__ = ["Backend", "backend", "build_backend", "make_backend", "current", "use_backend", "mx_gemm_requested", "soc_version",
           "SOC_ASCEND950", "MX_GEMM_ENV", "TRITON_OPS"]
