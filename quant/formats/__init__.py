"""Built-in tensor formats. Importing this package registers them (see each module for its scale layout):

| name | stored tensors per linear | Linear fmt |
|---|---|---|
| `fp8_block` | e4m3 weight + UE8M0 128x128 block scales (official) | fp8 |
| `fp4_mx` | packed e2m1 weight + UE8M0 1x32 scales (official routed experts) | fp4 |
| `bf16` | bfloat16 weight | dense |
| `int8_channel` | int8 weight + fp32 per-channel scale/offset (ascendV1 W8A8_DYNAMIC) | int8 |
| `int4_channel` | int4 packed along out + fp32 scale/offset/scale_bias (ascendV1 W4A8_DYNAMIC) | int4 |

`fp8_recast` is the lossless FP4 -> `fp8_block` conversion.
"""

from . import bf16, fp4_mx, fp8_block, int4_channel, int8_channel  # noqa: F401
from .base import ST_DTYPE, TORCH_DTYPE, TensorFormat, TensorLayout, out_in

__all__ = ["TensorFormat", "TensorLayout", "ST_DTYPE", "TORCH_DTYPE", "out_in"]
