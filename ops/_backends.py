"""Choose device kernels for the ascend_v4:: ops, once per process.

The reference registered in `_library.py` is the default for every device. On top of it:
* CPU: the bit-identical CPU kernels of `cpu.py` where they exist (backend name "cpu");
* CUDA: Triton kernels (`ops/triton/`), when triton imports and CUDA is available;
* NPU (PrivateUse1): the compiled Ascend C op library, else triton-ascend kernels (not built yet).
`ASCEND_V4_OP_BACKEND` = auto (default) | reference | triton | npu forces a choice for debugging.
The outcome is cached in the returned dict, not in mutable module state read elsewhere.
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger("ascend_v4.ops")


@functools.lru_cache(maxsize=1)
def register_device_kernels() -> dict[str, str]:
    """Register device kernels per the backend choice; returns {device_type: backend name}."""
    choice = os.environ.get("ASCEND_V4_OP_BACKEND", "auto").lower()
    chosen = {"cpu": "reference"}
    if choice == "reference":
        return chosen
    chosen["cpu"] = "cpu"
    if choice in ("auto", "triton"):
        try:
            from .triton import register as _register_triton  # type: ignore[import-not-found]
        except ImportError as e:
            if choice == "triton":
                log.warning("ASCEND_V4_OP_BACKEND=triton but the Triton kernels are unavailable (%s); "
                            "using the reference ops", e)
        else:
            chosen.update(_register_triton())
            if chosen.get("cuda") == "triton":  # CUDA is up and triton imports: add the FP8-KV attention
                from .triton.sparse_attn_fp8 import register as _register_triton_fp8_kv

                _register_triton_fp8_kv()
    if choice in ("auto", "npu"):
        # Registers PrivateUse1 kernels only; torch_npu itself is imported lazily when an NPU tensor arrives.
        from .npu import register as _register_npu

        npu = _register_npu()
        # The FP8 KV-cache ops (kv_pack_fp8, kv_unpack_fp8, sparse_attn_fp8) have their own NPU module;
        # like the above it only installs PrivateUse1 entries and imports nothing NPU-specific.
        from .npu.sparse_attn_fp8 import register as _register_npu_fp8_kv

        _register_npu_fp8_kv()
        if choice == "npu" and not npu:
            log.warning("ASCEND_V4_OP_BACKEND=npu but no NPU is visible; the NPU kernels are registered and run "
                        "only for tensors on an NPU")
        chosen.update(npu)
    return chosen


def active_backends() -> dict[str, str]:
    """{device_type: backend} actually in use, e.g. {'cpu': 'reference', 'cuda': 'triton'}."""
    return dict(register_device_kernels())
