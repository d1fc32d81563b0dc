"""vllm-ascend's compiled V4 op library as a backend of the ascend_v4:: ops (preferred where it maps an op).

Facts (vllm-ascend 0.23.0.post1 source distribution; docs/npu.md "vllm-ascend ops" cites file and line):
* `vllm_ascend/vllm_ascend_C*.so` registers every `torch.ops._C_ascend.*` schema, its NPU kernel and its fake
  impl from static initialisers (`TORCH_LIBRARY(_C_ascend, ...)` in csrc/torch_binding.cpp and
  csrc/torch_binding_meta.cpp) the moment it is loaded; it links torch, torch_npu and CANN, not vllm.
  `import vllm_ascend...` would import vllm (vllm_ascend/__init__.py -> logger.py), so we never import the
  package: we locate it with `importlib.util.find_spec` and `torch.ops.load_library` the .so.
* The aclnn kernels behind those ops are a CANN custom-op package in
  `vllm_ascend/_cann_ops_custom/vendors/custom_transformer`; the binding resolves `libcust_opapi.so` through
  ASCEND_CUSTOM_OPP_PATH read when the .so loads, so that directory goes on the variable first
  (`_loader.export_custom_opp_path` also does it at `import ascend_v4.ops`, before torch_npu loads).

Mapped so far (our contract -> theirs; each candidate's `accepts` is the op's documented input limits):
| our op  | theirs | limits (csrc/torch_binding.cpp checks) |
|---------|--------|----------------------------------------|
| hc_pre  | `npu_hc_pre_v2(x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps)` -> (y, post, comb) | x bf16 [T, 4, D], D in {4096, 7168}, fn/scale/base fp32 |
| hc_post | `npu_hc_post(x, residual, post, comb)` on [1, T, ...] views -> [1, T, 4, D] | x and residual one dtype (fp32/fp16/bf16), post and comb one dtype |
| moe_gate | `moe_gating_top_k_hash(logits, k, bias=, input_ids=, tid2eid=, ..., norm_type=2)` -> (weights, ids int32, _) | logits fp16/fp32/bf16 [T, E], E <= 2048, bias of the logits' dtype |
| sparse_attn_paged | `npu_sparse_attn_sharedkv` + its `_metadata` op (`vllm_ascend_attn.py`) | q bf16/fp16 [T, H, 512] (H a multiple or divisor of 64), window 128, pages of 16..1024 rows (multiples of 16), CSA top-k <= 512 |
Not mapped yet: `compressor`, `npu_vllm_quant_lightning_indexer`, `grouped_matmul_swiglu_quant*`, the 950's
`npu_kv_quant_sparse_attn_sharedkv` (docs/npu.md §8 says what each needs).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ._loader import prepend_custom_opp_path

log = logging.getLogger("ascend_v4.ops")

PACKAGE = "vllm_ascend"
VENDOR = Path("_cann_ops_custom") / "vendors" / "custom_transformer"
# our op -> the _C_ascend op it needs
NEEDS = {"hc_pre": ("npu_hc_pre_v2",), "hc_post": ("npu_hc_post",), "moe_gate": ("moe_gating_top_k_hash",),
         "sparse_attn_paged": ("npu_sparse_attn_sharedkv", "npu_sparse_attn_sharedkv_metadata")}
GATE_MAX_EXPERTS = 2048  # moe_gating_top_k_hash: E <= 2048 (its host checks)
SQRT_SOFTPLUS = 2  # its norm_type for sqrt(softplus(x)) (op_kernel/moe_gating_top_k_hash_without_group.h)
HC_MULT, HC_DIMS = 4, (4096, 7168)


@dataclass(frozen=True)
class VllmAscendLib:
    """What this process has of vllm-ascend's op library: loaded or not (and why), which _C_ascend ops."""

    loaded: bool
    reason: str
    ops: frozenset[str] = field(default_factory=frozenset)
    so: Path | None = None

    @classmethod
    def absent(cls, reason: str = "not loaded") -> "VllmAscendLib":
        return cls(False, reason)

    def missing(self, op: str) -> str | None:
        """Why our `op` cannot run on vllm-ascend here, or None."""
        if not self.loaded:
            return f"vllm-ascend ops: {self.reason}"
        lacks = [n for n in NEEDS[op] if n not in self.ops]
        return f"vllm-ascend library lacks _C_ascend.{lacks[0]}" if lacks else None


def package_dir() -> Path | None:
    """The installed vllm_ascend package directory, found without importing it (that would import vllm)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    locs = list(spec.submodule_search_locations or []) if spec else []
    return Path(locs[0]) if locs else None


def vendor_dir(pkg: Path | None = None) -> Path | None:
    """vllm-ascend's CANN custom-op package directory (for ASCEND_CUSTOM_OPP_PATH), when installed."""
    pkg = package_dir() if pkg is None else pkg
    return pkg / VENDOR if pkg is not None and (pkg / VENDOR).is_dir() else None


def find_library(pkg: Path | None = None) -> Path | None:
    pkg = package_dir() if pkg is None else pkg
    hits = sorted(pkg.glob("vllm_ascend_C*.so")) if pkg is not None else []
    return hits[0] if hits else None


@functools.lru_cache(maxsize=1)
def load_vllm_ascend_ops() -> VllmAscendLib:
    """Load vllm-ascend's op library once per process (after torch_npu is imported). Never raises: a missing
    package, a load error (torch / torch_npu / CANN mismatch) or missing ops come back as `reason`."""
    pkg = package_dir()
    if pkg is None:
        return VllmAscendLib.absent("vllm-ascend is not installed")
    so = find_library(pkg)
    if so is None:
        return VllmAscendLib.absent(f"no vllm_ascend_C*.so in {pkg} (a source checkout without a build?)")
    vdir = vendor_dir(pkg)
    if vdir is not None:
        prepend_custom_opp_path(vdir)  # before the load: the binding reads it once (module docstring)
    try:
        torch.ops.load_library(str(so))
    except (OSError, RuntimeError) as e:
        return VllmAscendLib(False, f"loading {so} failed: {str(e).splitlines()[0][:300]}", so=so)
    return VllmAscendLib(True, f"loaded {so}", present_ops(), so)


def present_ops() -> frozenset[str]:
    """The _C_ascend ops we use that the loaded library registered."""
    return frozenset(n for names in NEEDS.values() for n in names if hasattr(torch.ops._C_ascend, n))


# ---------------------------------------------------------------------------------------------- mappings
def hc_pre(x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters):
    # ours: (x, fn, base, scale, ...); theirs: (x, hc_fn, hc_scale, hc_base, hc_mult, iters, norm_eps, hc_eps)
    y, post, comb = torch.ops._C_ascend.npu_hc_pre_v2(x.contiguous(), fn.float().contiguous(),
                                                      scale.float().contiguous(), base.float().contiguous(),
                                                      x.shape[1], int(sinkhorn_iters), float(norm_eps),
                                                      float(hc_eps))
    return y.to(x.dtype), post.float(), comb.float()


def _hc_pre_accepts(x, fn, *_rest) -> bool:
    return x.dtype == torch.bfloat16 and x.dim() == 3 and x.shape[1] == HC_MULT and x.shape[2] in HC_DIMS


def hc_post(f, residual, post, comb):
    # ours: X'_j = post_j f + sum_i comb[i, j] X_i; theirs (hc_post kernel): out_i = post_i x + sum_j comb[j, i]
    # residual_j: the same sum. Their op takes [b, s, ...]: one batch of T tokens.
    out = torch.ops._C_ascend.npu_hc_post(f[None].contiguous(), residual[None].contiguous(),
                                          post[None].float().contiguous(), comb[None].float().contiguous())
    return out[0]


def _hc_post_accepts(f, residual, post, comb) -> bool:
    return (f.dtype == residual.dtype and f.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and residual.dim() == 3)


def moe_gate(logits, bias, tid2eid, tokens, topk, route_scale):
    # Arguments as vllm-ascend's experts_selector.py passes them for scoring_func "sqrtsoftplus" (one expert group,
    # group_select_mode 1, renorm 0, eps 1e-20); a hash-routed layer passes the token ids and the table instead
    # of the bias. Their weights: chosen scores / (sum + eps) * routed_scaling_factor (eps 1e-20 is below fp32's
    # resolution of the sums here), in the logits' dtype.
    hashed = tid2eid is not None
    y, ids, _ = torch.ops._C_ascend.moe_gating_top_k_hash(
        logits.contiguous(), int(topk), bias=None if hashed else bias.to(logits.dtype).contiguous(),
        input_ids=tokens.long().contiguous() if hashed else None,
        tid2eid=tid2eid.to(torch.int32).contiguous() if hashed else None, k_group=1, group_count=1,
        routed_scaling_factor=float(route_scale), eps=1e-20, group_select_mode=1, renorm=0,
        norm_type=SQRT_SOFTPLUS, out_flag=False)
    return ids.long(), y.float()


def _moe_gate_accepts(logits, *_rest) -> bool:
    return logits.dtype in (torch.float32, torch.float16, torch.bfloat16) and logits.shape[1] <= GATE_MAX_EXPERTS


@dataclass(frozen=True)
class Mapping:
    run: Callable
    accepts: Callable
    usable: Callable | None = None  # (backend) -> why it cannot run here, beyond the library having the op


def candidates() -> dict[str, Mapping]:
    """{our op: its vllm-ascend mapping} (candidates.py puts them first)."""
    from . import vllm_ascend_attn as attn

    return {"hc_pre": Mapping(hc_pre, _hc_pre_accepts), "hc_post": Mapping(hc_post, _hc_post_accepts),
            "moe_gate": Mapping(moe_gate, _moe_gate_accepts),
            "sparse_attn_paged": Mapping(attn.sparse_attn_paged, attn.accepts, attn.usable)}
