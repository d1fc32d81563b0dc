"""Lazy load of the compiled NPU op library (code-style.md §2 habit 7, §7.4).

`tools/build_npu_ops.sh` installs, under the git-ignored `ops/_lib/`:

    ops/_lib/vendors/ascend_v4/                 custom OPP package (.run installed with --install-path)
        op_api/lib/libcust_opapi.so             generated aclnnSparseAttn* / aclnnMoeGemm*
        op_impl/ai_core/tbe/...                 kernel binaries per SoC
    ops/_lib/libascend_v4_npu.so                torch binding (ops/csrc): ascend_v4::npu_sparse_attn,
                                                ascend_v4::npu_moe_gemm for PrivateUse1 + Meta

`load_op_library()` prepends the vendor directory to `ASCEND_CUSTOM_OPP_PATH` (read by CANN when the first
aclnn call resolves `libcust_opapi.so`, ascend-notes.md §3.4), then `torch.ops.load_library`s the binding.
It runs at most once per process (cached) and only from the NPU kernels, i.e. after torch_npu is imported
and a tensor is on the NPU. Failure is not an error: the caller logs one warning and falls back.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ascend_v4.ops")

LIB_DIR = Path(__file__).resolve().parents[1] / "_lib"  # <ops>/_lib, git-ignored, never in the wheel build
VENDOR = "ascend_v4"
BINDING = "libascend_v4_npu.so"
# Schemas the torch binding defines (ops/csrc/torch_binding.cpp; a test checks the strings match).
BINDING_SCHEMAS = {
    "npu_sparse_attn": "npu_sparse_attn(Tensor q, Tensor kv, Tensor idx, Tensor sink, float scale) -> Tensor",
    "npu_moe_gemm": ("npu_moe_gemm(Tensor x, Tensor[] weight, Tensor[] scale, Tensor group_list, int weight_fmt, "
                     "int scale_block_n, int scale_block_k, ScalarType out_dtype) -> Tensor"),
}
BINDING_OPS = tuple(BINDING_SCHEMAS)


@dataclass(frozen=True)
class OpLibrary:
    loaded: bool
    vendor_dir: Path
    binding: Path
    reason: str  # why it is (not) loaded, one line


def vendor_dir(lib_dir: Path = LIB_DIR) -> Path:
    return lib_dir / "vendors" / VENDOR


def find_op_library(lib_dir: Path = LIB_DIR) -> OpLibrary:
    """What is on disk, without loading anything (used by `ascend-v4 doctor`)."""
    vdir, binding = vendor_dir(lib_dir), lib_dir / BINDING
    opapi = vdir / "op_api" / "lib" / "libcust_opapi.so"
    if not opapi.is_file():
        return OpLibrary(False, vdir, binding, f"{opapi} not found (build with tools/build_npu_ops.sh)")
    if not binding.is_file():
        return OpLibrary(False, vdir, binding, f"{binding} not found (build with tools/build_npu_ops.sh)")
    return OpLibrary(False, vdir, binding, "built, not loaded yet")


def prepend_custom_opp_path(vdir: Path) -> str:
    """Put `vdir` first on ASCEND_CUSTOM_OPP_PATH (colon-separated vendor dirs); returns the new value."""
    parts = [p for p in os.environ.get("ASCEND_CUSTOM_OPP_PATH", "").split(":") if p and p != str(vdir)]
    value = ":".join([str(vdir), *parts])
    os.environ["ASCEND_CUSTOM_OPP_PATH"] = value
    return value


def custom_opp_dirs(lib_dir: Path = LIB_DIR) -> list[Path]:
    """The CANN custom-op package directories this process may call into: ours when built, vllm-ascend's
    when installed (its `_cann_ops_custom/vendors/custom_transformer`)."""
    from .vllm_ascend_ops import vendor_dir as vllm_vendor_dir

    ours = vendor_dir(lib_dir)
    dirs = [ours] if (ours / "op_api" / "lib" / "libcust_opapi.so").is_file() else []
    theirs = vllm_vendor_dir()
    return dirs + ([theirs] if theirs is not None else [])


def export_custom_opp_path(lib_dir: Path = LIB_DIR) -> list[Path]:
    """Put the custom-op package directories on ASCEND_CUSTOM_OPP_PATH at `import ascend_v4.ops`. torch_npu
    and the op bindings read the variable once, when their libraries load, so it must be set before torch_npu
    is imported: when torch_npu is already in (torch's backend autoload imports it with torch) and the
    variable lacked a directory, say so once with the fix. Returns the directories added."""
    dirs = custom_opp_dirs(lib_dir)
    before = os.environ.get("ASCEND_CUSTOM_OPP_PATH", "").split(":")
    added = [d for d in dirs if str(d) not in before]
    for d in reversed(dirs):
        prepend_custom_opp_path(d)
    if added and "torch_npu" in sys.modules:
        log.warning("torch_npu was imported before ascend-v4 could set ASCEND_CUSTOM_OPP_PATH (missing %s); "
                    "custom NPU ops may not resolve. Export ASCEND_CUSTOM_OPP_PATH=%s before starting Python "
                    "(docker/Dockerfile.npu does).", ":".join(map(str, added)), os.environ["ASCEND_CUSTOM_OPP_PATH"])
    return added


@functools.lru_cache(maxsize=1)
def load_op_library(lib_dir: Path = LIB_DIR) -> OpLibrary:
    """Load the op library once per process. Never raises; `loaded` says whether the ops are usable."""
    import torch

    found = find_op_library(lib_dir)
    if found.reason != "built, not loaded yet":
        return found
    prepend_custom_opp_path(found.vendor_dir)  # before the first aclnn call resolves libcust_opapi.so
    try:
        torch.ops.load_library(str(found.binding))
    except (OSError, RuntimeError) as e:  # undefined symbol (torch/torch_npu mismatch), missing CANN libs
        return OpLibrary(False, found.vendor_dir, found.binding, f"loading {found.binding} failed: {e}")
    missing = [op for op in BINDING_OPS if not hasattr(torch.ops.ascend_v4, op)]
    if missing:
        return OpLibrary(False, found.vendor_dir, found.binding, f"{found.binding} lacks {missing}")
    return OpLibrary(True, found.vendor_dir, found.binding, f"loaded {found.binding}")
