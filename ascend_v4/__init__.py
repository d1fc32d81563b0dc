"""ascend-v4: DeepSeek-V4 inference on Ascend NPUs, with a CPU/CUDA fallback running the same code.

Public API: `LLM`, `SamplingParams`, `ModelArgs`. Heavy modules load lazily so `import ascend_v4` is cheap.
"""

import os

# torch-npu installed without CANN breaks `import torch` through the device-backend autoload; ascend_v4 imports
# torch_npu explicitly where it needs it (platform.detect_platform), so autoload is never required.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "ModelArgs", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from ascend_v4.api import LLM
        return LLM
    if name == "SamplingParams":
        from ascend_v4.runtime.sampling import SamplingParams
        return SamplingParams
    if name == "ModelArgs":
        from ascend_v4.model.args import ModelArgs
        return ModelArgs
    raise AttributeError(f"module 'ascend_v4' has no attribute {name!r}")
