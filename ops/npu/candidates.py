"""Which implementations each ascend_v4:: op has on the NPU, in order of preference, and when each can run.

Order of preference (issue 12): (a) vllm-ascend's compiled V4 op library (`vllm_ascend_ops.py`), (b) torch_npu
built-ins, (c) our own Ascend C op library (`_loader.py`), then triton-ascend kernels, then (d) the reference
(or its FP8-free twin where the reference would cast to a float8 dtype A2/A3 lack). A candidate has:

* `usable(backend)`: None when it can run in this process, else the reason (library not loaded, symbol
  missing, wrong SoC): evaluated once, when the backend is resolved;
* `accepts(*args)`: per call, whether it takes these inputs (most device kernels take bf16/fp16 only); a call
  it does not accept goes to the next usable candidate, ending at one that accepts everything;
* `run(*args)`: the op with the reference's arguments and result.

`kernels.Backend.rank` filters this table by `usable` and, when the self-check ran (`selfcheck.py`), by its
verdict; `Backend.run(op, *args)` takes the first ranked candidate that accepts the call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .._library import REFERENCE as _REFERENCE_TABLE
from .backend import TRITON_OPS

if TYPE_CHECKING:
    from .backend import Backend

HALF = (torch.bfloat16, torch.float16)
# The references as registered, taken when this module is first imported (at `import ascend_v4.ops`): tests route
# `_library.REFERENCE[op]` itself through the NPU kernels, which must still end at the real reference.
REFERENCE = dict(_REFERENCE_TABLE)


def _always(*_args: Any) -> bool:
    return True


def _usable_always(_b: "Backend") -> str | None:
    return None


@dataclass(frozen=True)
class Candidate:
    """One implementation of one op on the NPU (see the module docstring)."""

    backend: str
    run: Callable[..., Any]
    usable: Callable[["Backend"], str | None] = _usable_always
    accepts: Callable[..., bool] = _always
    checked: bool = True  # the self-check runs it (False: the reference itself, the golden, or a delegate)
    delegates_to: str | None = None  # runs another op's chosen candidate (checked as that op)


def _lib(b: "Backend") -> str | None:
    return None if b.lib.loaded else f"ascend-v4 op library not loaded ({b.lib.reason})"


def _lib_mx(b: "Backend") -> str | None:
    return _lib(b) or (None if b.mx_gemm else "950 MX GEMM not selected (ASCEND_V4_NPU_MX_GEMM, SoC)")


def _triton(op: str) -> Callable[["Backend"], str | None]:
    def usable(b: "Backend") -> str | None:
        return None if op in b.triton else "triton-ascend kernels not loaded"
    return usable


def _vllm(op: str, extra: Callable[["Backend"], str | None] | None = None) -> Callable[["Backend"], str | None]:
    def usable(b: "Backend") -> str | None:
        return b.vllm.missing(op) or (extra(b) if extra is not None else None)
    return usable


def _half_q(q, kv, *_rest) -> bool:
    return q.dtype in HALF and kv.dtype == q.dtype


def _half_x(x, *_rest) -> bool:
    return x.dtype in HALF


def _rows_via_sparse_attn(q, kv, idx, sink, scale, *_paged):
    from .kernels import current

    return current().run("sparse_attn", q, kv, idx, sink, scale)


@functools.lru_cache(maxsize=1)
def table() -> dict[str, list[Candidate]]:
    """{op: candidates, most preferred first} for every op the NPU backend registers."""
    from . import kernels as k
    from . import torch_npu_mx as tm
    from . import vllm_ascend_ops as va

    def triton_or(op: str) -> list[Candidate]:
        return [Candidate("triton-ascend", lambda *a, _op=op: k.current().triton[_op](*a), _triton(op)),
                Candidate("reference", REFERENCE[op], checked=False)]

    t: dict[str, list[Candidate]] = {
        "sparse_attn": [Candidate("ascendc", k.sparse_attn_lib, _lib, _half_q), *triton_or("sparse_attn")],
        "quant_gemm": [Candidate("torch_npu-mx", tm.quant_gemm_mx, tm.usable, tm.accepts),
                       Candidate("ascendc-mx", k.quant_gemm_lib, _lib_mx, _half_x),
                       Candidate("ascendc", k.quant_gemm_lib, _lib, _half_x),
                       Candidate("triton-ascend", k.quant_gemm_triton, _triton("quant_gemm")),
                       Candidate("fp8-free-reference", k.quant_gemm_fp8_free)],
        "moe_experts": [Candidate("torch_npu+ascendc-mx", k.moe_experts_lib, _lib_mx, _half_x),
                        Candidate("torch_npu+ascendc", k.moe_experts_lib, _lib, _half_x),
                        Candidate("torch_npu+grouped_matmul", k.moe_experts_gmm)],
        "fp8_roundtrip": [Candidate("fp8-free", k.fp8_roundtrip)],
    }
    for op, fn in (("w8a8_gemm", k.w8a8_gemm_npu), ("w4a8_gemm", k.w4a8_gemm_npu),
                   ("int8_act_roundtrip", k.int8_act_roundtrip_npu)):
        if op in REFERENCE:  # registered only where ops/_library.py defines the op
            t[op] = [Candidate("torch_npu", fn, accepts=_half_x), Candidate("reference", REFERENCE[op], checked=False)]
    if "moe_experts_int" in REFERENCE:
        t["moe_experts_int"] = [Candidate("torch_npu+grouped_matmul", k.moe_experts_int_gmm, accepts=_half_x),
                                Candidate("reference", REFERENCE["moe_experts_int"], checked=False)]
    for op in TRITON_OPS:
        t.setdefault(op, triton_or(op))
    t["moe_gate"] = [Candidate("reference", REFERENCE["moe_gate"], checked=False)]  # plain torch ops run anywhere
    # the paged form's fallback reads the row list through sparse_attn's own chosen candidate
    t["sparse_attn_paged"] = [Candidate("row list (sparse_attn)", _rows_via_sparse_attn, checked=False,
                                        delegates_to="sparse_attn")]
    for op, cand in va.candidates().items():  # vllm-ascend first wherever it maps one of our ops
        t[op] = [Candidate("vllm-ascend", cand.run, _vllm(op, cand.usable), cand.accepts), *t[op]]
    return t
