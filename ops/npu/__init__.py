"""NPU backend of the ascend_v4:: ops (Ascend, dispatch key PrivateUse1, device "npu" once torch_npu is loaded).

Ledger: importing this package imports neither torch_npu nor the op library. `register()` is called once per
process by `ops/_backends.py` (unless ASCEND_V4_OP_BACKEND=reference) and only installs dispatcher entries:
PrivateUse1 kernels for the ascend_v4:: ops, taken from `kernels.kernel_table()`. Those functions run only for
tensors on an NPU, i.e. after torch_npu has been imported; the first one resolves the backend (`kernels.backend()`):
it loads the op library from ops/_lib (setting ASCEND_CUSTOM_OPP_PATH first), and when that is missing logs ONE
warning and falls back to triton-ascend kernels, then to the references (per op; see kernels.py). It also reads
the SoC id and ASCEND_V4_NPU_MX_GEMM once: on an Ascend 950 with the library loaded, "1" sends the FP8/FP4
GEMMs to the native MX kernel variant (written only, so off by default; docs/npu.md).

Pieces: `tiling.py` (host tiling rules, no CANN), `_loader.py` (op library), `kernels.py` (NPU impls),
`ops/ascendc/` (Ascend C sources), `ops/csrc/` (torch binding). Evidence levels: docs/npu.md.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

log = logging.getLogger("ascend_v4.ops")

NS = "ascend_v4"


def privateuse1_name() -> str:
    """'npu' after torch_npu renamed the PrivateUse1 backend, 'privateuseone' before."""
    return torch._C._get_privateuse1_backend_name()


def npu_present() -> bool:
    """True when torch_npu is already imported and sees a device. Never imports torch_npu itself (import
    hygiene: `import ascend_v4.ops` must not import it; the platform module or torch's autoload does)."""
    if "torch_npu" not in sys.modules:
        return False
    npu = getattr(torch, "npu", None)
    try:
        return bool(npu is not None and npu.is_available())
    except Exception:  # a half-initialised torch_npu (no driver) raises here
        return False


def register(force: bool = False) -> dict[str, str]:
    """Register the NPU kernels for PrivateUse1.

    Registration is cheap and import-free, so it is always done; the return value reports the device only
    when an NPU is present (or `force`), e.g. {"npu": "npu"}, otherwise {}. Which implementation each op uses
    is decided at the first NPU call (`status()["ops"]` then lists it).
    """
    from . import kernels
    from ._loader import export_custom_opp_path

    export_custom_opp_path()  # before torch_npu loads, where it has not yet (see its docstring)
    dev = privateuse1_name()
    for op, fn in kernels.kernel_table().items():
        torch.library.register_kernel(f"{NS}::{op}", dev, fn)
    return {"npu": "npu"} if force or npu_present() else {}


def status() -> dict[str, object]:
    """What the NPU backend would use, without importing torch_npu (for `ascend-v4 doctor`)."""
    from . import kernels
    from ._loader import find_op_library

    lib = find_op_library()
    out: dict[str, object] = {"op_library": str(lib.vendor_dir), "op_library_state": lib.reason,
                              "binding": str(lib.binding), "npu_present": npu_present(),
                              "mx_gemm_switch": os.environ.get(kernels.MX_GEMM_ENV) or "unset (off)"}
    if kernels.backend.cache_info().currsize:  # resolved already (an NPU op ran): report the real choice
        out["ops"] = kernels.backend().describe()
    return out


__all__ = ["register", "status", "npu_present", "privateuse1_name"]
