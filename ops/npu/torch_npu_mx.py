"""`quant_gemm` on the Ascend 950 through torch_npu's MX built-ins (no op library of ours): MXFP8 x MXFP8 with
`npu_dynamic_mx_quant` + `npu_quant_matmul`, the form vllm-ascend runs its W8A8_MXFP8 linears in on the 950.

Facts used (each read, not guessed):
* Schemas, torch_npu 2.10.0.post4 wheel (`torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`):
  `npu_dynamic_mx_quant(Tensor input, *, int axis=-1, str round_mode="rint", int dst_type=296, int block_size=32,
  int? scale_alg=0, float dst_type_max=0.0) -> (Tensor, Tensor)` and `npu_quant_matmul(Tensor x1, Tensor x2,
  Tensor scale, *, Tensor? offset=None, Tensor? pertoken_scale=None, Tensor? bias=None, int? output_dtype=None,
  int? x1_dtype=None, int? x2_dtype=None, int? pertoken_scale_dtype=None, int? scale_dtype=None,
  int[]? group_sizes=None, Tensor? y_scale=None) -> Tensor`.
* Maths of the quantisation, ops-nn `quant/dynamic_mx_quant/docs/aclnnDynamicMxQuant.md` (950 only):
  scaleAlg 1 = the block scale 2^E with E the exponent of amax / 448 rounded up (no element saturates), which
  is V4's activation rule (model-spec §8.5) at 32 elements; scaleAlg 0 (the default) is OCP's
  floor(log2(amax)) - 8, under which a block's largest values can exceed 448 and saturate: hence scale_alg=1.
  The scale comes back as [..., ceil(K / 32 / 2), 2] e8m0 (pairs of 32-blocks; `mxscale` shape rule).
* The call, vllm-ascend 0.23.0.post1 `vllm_ascend/quantization/methods/w8a8_mxfp8.py` (`apply`,
  `process_weights_after_loading`): x quantised with `npu_dynamic_mx_quant(x, dst_type=torch.float8_e4m3fn)`,
  weight e4m3 as a contiguous [K, N], weight scale e8m0 bytes [N, K/32] -> [N, K/64, 2] -> transposed to
  [K/64, N, 2], `scale_dtype` = `pertoken_scale_dtype` = float8_e8m0fnu, `group_sizes=[1, 1, 32]`, output the
  activation dtype.

Mapping onto our contract (`quant_gemm(x, w, s, act_quant)`, FP8 128x128 or FP4 1x32 weights): the weight is
given to the cube as MXFP8 losslessly (`reference.mx.mx_weight`: FP8 bytes kept with the block scales repeated
per 1x32; FP4 codes widened to e4m3), converted once per weight and kept; the activations first take V4's 1x128
round trip (what `act_quant` means), which the 1x32 quantisation with scale_alg 1 then reproduces exactly
(`reference/mx.py` docstring), so the result equals the reference up to fp32 summation order. `act_quant=False`
(quantisation simulation off) is declined: the MX product always quantises the activations.
"""

from __future__ import annotations

import weakref

import torch

from ..reference import mx as _mx
from . import kernels
from .backend import SOC_ASCEND950, current

HALF = (torch.bfloat16, torch.float16)
SCALE_ALG_CEIL = 1  # aclnnDynamicMxQuant scaleAlg 1: scale exponent rounded up (no saturation)
# K a multiple of 128: V4's activation blocks (the round trip) and whole pairs of 32-blocks (no scale padding)
K_ALIGN = 128

# (K, N) e4m3 weight and (K/64, N, 2) e8m0 scale per checkpoint weight, built at its first call; keyed by the
# weight's id, validated through a weak reference (the model passes the same tensors every step) and dropped
# when the weight is freed. MEMORY: this is a second copy of every FP8 linear weight on the device (FP4 weights
# widened: 2x their size), as long as the model lives; vllm-ascend converts in place at load instead (a
# load-time conversion is the follow-up, docs/npu.md §7).
_prepared: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor]] = {}


def usable(b) -> str | None:
    """Only on a 950 whose torch_npu has the MX quantisation (the MX cube does not exist on A2/A3)."""
    if b.soc_version < SOC_ASCEND950:
        return f"not an Ascend 950 (SoC id {b.soc_version}): no MX matmul"
    missing = [n for n in ("npu_dynamic_mx_quant", "npu_quant_matmul", "float8_e8m0fnu") if not hasattr(b.torch_npu, n)]
    return f"torch_npu lacks {', '.join(missing)}" if missing else None


def accepts(x, w, s, act_quant) -> bool:
    k = x.shape[-1] if x.dim() == 2 else -1
    return (bool(act_quant) and x.dtype in HALF and x.dim() == 2 and k % K_ALIGN == 0
            and w.dtype in (torch.float8_e4m3fn, torch.int8) and w.dim() == 2)


def prepared_weight(w: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [K, N] contiguous, e8m0 bytes [K/64, N, 2]) of a checkpoint weight, built once."""
    hit = _prepared.get(id(w))
    if hit is not None and hit[0]() is w:
        return hit[1], hit[2]
    q, sb = _mx.mx_weight(w, s)  # [N, K] e4m3, [N, K/32] bytes, exactly
    n, kb = sb.shape
    wt = q.t().contiguous()
    st = sb.reshape(n, kb // 2, 2).transpose(0, 1).contiguous()
    key = id(w)
    _prepared[key] = (weakref.ref(w), wt, st)
    weakref.finalize(w, _prepared.pop, key, None)
    return wt, st


def quant_gemm_mx(x, w, s, act_quant):
    tnpu = current().torch_npu
    # the 1x128 activation round trip first (without float8 casts), so the 1x32 quantisation is exact
    xq, xs = tnpu.npu_dynamic_mx_quant(kernels.fp8_roundtrip(x, 128), dst_type=torch.float8_e4m3fn,
                                       scale_alg=SCALE_ALG_CEIL)
    wt, st = prepared_weight(w, s)
    return tnpu.npu_quant_matmul(xq, wt, st, scale_dtype=tnpu.float8_e8m0fnu, pertoken_scale=xs,
                                 pertoken_scale_dtype=tnpu.float8_e8m0fnu, output_dtype=x.dtype,
                                 group_sizes=[1, 1, _mx.MX_BLOCK])
