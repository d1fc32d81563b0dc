"""MC2 expert-parallel dispatch / combine on Ascend (ascend-notes.md §0.9, §7.2): typed, checked wrappers over
`torch_npu.npu_moe_distribute_dispatch_v2` / `npu_moe_distribute_combine_v2`, plus the documented size limits
per chip. Called by runtime/expert_parallel_mc2.py (the MC2 strategy of expert parallelism).

Source of every fact below: the torch_npu API pages `docs/context/torch_npu-npu_moe_distribute_dispatch_v2.md`
(Ascend/op-plugin at 01c0a119) and `..._combine_v2.md` (the stored version, op-plugin at 0576042b, older); both
ops must accept a call, so where the pages differ the intersection is used: A2 EP sizes 16..256 with
`comm_alg="fullmesh"` (dispatch page; 16..64 with "hierarchy", which `comm_alg=""` picks when
HCCL_INTRA_PCIE_ENABLE=1 and HCCL_INTRA_ROCE_ENABLE=0, so A2 passes "fullmesh" explicitly), A3 EP 2..384 and
H 1024..7168 (combine page; the dispatch page allows 2..768 and 1024..8192), experts <= 512 (combine; dispatch
1024). A2 EP sizes below 16 appear in neither page.

  dispatch_v2(x [BS, H] bf16/fp16, expert_ids [BS, K] int32 (distinct per row, in [0, moe_expert_num)),
      group_ep: str, ep_world_size, ep_rank_id, moe_expert_num, *, x_active_mask, expert_scales, quant_mode=0,
      global_bs=0, expert_token_nums_type=1, ...)
    -> (expand_x [A, H]: rows received for this rank's local experts, grouped by local expert,
        dynamic_scales (quant_mode 2 only, else None), assist_info_for_combine [A*128] int32 (internal),
        expert_token_nums [local experts] int64 (counts with expert_token_nums_type=1), ep_recv_counts int32
        (internal), tp_recv_counts (internal, A3), expand_scales (internal; A2 only, None on A3))
    A >= BS * ep_world_size * min(local experts, K) when global_bs = 0 (every rank sends the same BS).
  combine_v2(expand_x [A, H], expert_ids, assist_info_for_combine, ep_send_counts (= dispatch's
      ep_recv_counts), expert_scales [BS, K] fp32, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *,
      expand_scales (required on A2, absent on A3), ...) -> x [BS, H] in expand_x's dtype:
    x[t] = sum_k expert_scales[t, k] * (expert output row of (t, k)): the routing weights are applied HERE.

The pages state that assist_info_for_combine, ep_recv_counts, tp_recv_counts and expand_scales differ between
chips, algorithms and versions and must only be handed to combine; nothing here reads them. quant_mode 0 only:
the expert path consumes bf16 rows (dynamic int8 dispatch, quant_mode 2, would need int8-input experts).

Evidence: the wrappers and the strategy run under the CPU torch_npu double on Gloo
(tests/unit/npu/test_mc2_ep.py); never run on HCCL or an NPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import OpInputError

MC2_DTYPES = (torch.bfloat16, torch.float16)  # x / expand_x
MAX_COMM_NAME = 127  # group_ep: string length in [1, 128)
MAX_TOPK = 16  # K in (0, 16] on A2 and A3
MAX_EXPERTS = 512  # moe_expert_num in [1, 512] (combine_v2 page; dispatch_v2 allows 1024)


def _check(cond: bool, fn: str, msg: str) -> None:
    if not cond:
        raise OpInputError(f"ascend_v4.ops.npu.mc2.{fn}: {msg}")


@dataclass(frozen=True)
class Mc2Limits:
    """Documented size limits of dispatch_v2 + combine_v2 on one chip family (no shared-expert ranks, no TP).

    Attributes:
        chip: "A2" (910B) or "A3" (910C; a rank is one die).
        max_bs: tokens one rank sends per call (BS).
        ep_world_sizes: allowed EP group sizes.
        h_min / h_max / h_multiple: hidden size H range and granularity.
        max_local_experts: routed experts per rank (None: no extra limit).
        comm_alg: the `comm_alg` both ops are called with (the EP sizes depend on it on A2).
    """

    chip: str
    max_bs: int
    ep_world_sizes: tuple[int, ...] | range
    h_min: int
    h_max: int
    h_multiple: int
    max_local_experts: int | None
    comm_alg: str = ""


A2_LIMITS = Mc2Limits("A2", max_bs=256, ep_world_sizes=(16, 32, 64, 128, 256), h_min=32, h_max=7168,
                      h_multiple=32, max_local_experts=24, comm_alg="fullmesh")
A3_LIMITS = Mc2Limits("A3", max_bs=512, ep_world_sizes=range(2, 385), h_min=1024, h_max=7168, h_multiple=1,
                      max_local_experts=None, comm_alg="")
# torch_npu.npu.get_soc_version() ids (ascend-notes.md §1). Ascend 950 (260) is absent on purpose: the
# dispatch_v2 / combine_v2 pages list A2 and A3 only, so its limits are not documented.
_SOC_FAMILIES = ((range(220, 226), A2_LIMITS), (range(250, 256), A3_LIMITS))


def limits_for_soc(soc: int) -> Mc2Limits | None:
    """The MC2 limits for a `torch_npu.npu.get_soc_version()` id, or None when MC2 is not documented there."""
    for ids, lim in _SOC_FAMILIES:
        if soc in ids:
            return lim
    return None


def unsupported_reason(lim: Mc2Limits, world: int, n_experts: int, dim: int, topk: int,
                       dtype: torch.dtype) -> str | None:
    """Why a model / EP layout cannot use MC2 on this chip (None: it can). The per-call token count (BS) is
    not checked here: the strategy splits a step into calls of at most `lim.max_bs` tokens per rank."""
    if dtype not in MC2_DTYPES:
        return f"model dtype {dtype} (MC2 moves bfloat16/float16 rows only)"
    if world not in lim.ep_world_sizes:
        return f"EP size {world} not supported by MC2 on {lim.chip} (allowed: {_span(lim.ep_world_sizes)})"
    if n_experts % world or not 1 <= n_experts <= MAX_EXPERTS:
        return f"{n_experts} routed experts (MC2 needs 1..{MAX_EXPERTS}, divisible by EP size {world})"
    if lim.max_local_experts is not None and n_experts // world > lim.max_local_experts:
        return (f"{n_experts // world} experts per rank (MC2 on {lim.chip} allows at most "
                f"{lim.max_local_experts})")
    if not (lim.h_min <= dim <= lim.h_max and dim % lim.h_multiple == 0):
        return (f"hidden size {dim} (MC2 on {lim.chip} needs {lim.h_min}..{lim.h_max}"
                + (f", a multiple of {lim.h_multiple})" if lim.h_multiple > 1 else ")"))
    if not 0 < topk <= min(MAX_TOPK, n_experts):
        return f"top-k {topk} (MC2 needs 1..{min(MAX_TOPK, n_experts)})"
    return None


def _span(sizes: tuple[int, ...] | range) -> str:
    return f"{sizes.start}..{sizes.stop - 1}" if isinstance(sizes, range) else ", ".join(map(str, sizes))


@dataclass(frozen=True)
class Mc2Group:
    """What the MC2 ops need to know about the expert-parallel group.

    Attributes:
        comm_name: HCCL communicator name of a group used by MC2 only (the pages forbid other ops on it).
        world_size / rank: EP group size and this rank's index in it.
        n_experts: global routed experts (moe_expert_num), split evenly over the ranks.
        comm_alg: passed to both ops (A2: "fullmesh", the algorithm whose EP sizes the limits list).

    Raises:
        ValueError: a field violates the ops' documented ranges (the message names the field).
    """

    comm_name: str
    world_size: int
    rank: int
    n_experts: int
    comm_alg: str = ""  # the chip's `Mc2Limits.comm_alg`

    def __post_init__(self) -> None:
        if not isinstance(self.comm_name, str) or not 1 <= len(self.comm_name) <= MAX_COMM_NAME:
            raise ValueError(f"Mc2Group.comm_name must be a string of 1..{MAX_COMM_NAME} characters, "
                             f"got {self.comm_name!r}")
        if self.world_size < 2:
            raise ValueError(f"Mc2Group.world_size must be >= 2 (MC2 is for expert parallelism), got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"Mc2Group.rank must be in [0, {self.world_size}), got {self.rank}")
        if self.n_experts < 1 or self.n_experts % self.world_size:
            raise ValueError(f"Mc2Group.n_experts={self.n_experts} must be a positive multiple of "
                             f"world_size={self.world_size}")

    @property
    def local_experts(self) -> int:
        return self.n_experts // self.world_size


def hccl_comm_name(group, rank: int) -> str:
    """HCCL communicator name of a torch.distributed group created with the hccl backend (torch_npu API)."""
    backend = group._get_backend(torch.device("npu"))
    return backend.get_hccl_comm_name(rank)


@dataclass
class Dispatched:
    """dispatch_v2's seven outputs. Only `x` and `expert_token_nums` may be read; the rest go to combine."""

    x: torch.Tensor  # [A, H]: the first sum(expert_token_nums) rows are real, grouped by local expert
    dynamic_scales: torch.Tensor | None  # quant_mode 2 only
    assist_info: torch.Tensor  # opaque
    expert_token_nums: torch.Tensor  # [local experts] int64: rows per local expert
    ep_recv_counts: torch.Tensor  # opaque
    tp_recv_counts: torch.Tensor | None  # opaque
    expand_scales: torch.Tensor | None  # opaque (A2: a required combine input)


def _check_ids(fn: str, g: Mc2Group, x: torch.Tensor, expert_ids: torch.Tensor) -> None:
    _check(x.dim() == 2, fn, f"x must be 2-D [BS, H], got shape {tuple(x.shape)}")
    _check(x.dtype in MC2_DTYPES, fn, f"x must be bfloat16 or float16, got {x.dtype}")
    _check(expert_ids.dim() == 2 and expert_ids.shape[0] == x.shape[0], fn,
           f"expert_ids must be [BS={x.shape[0]}, K], got shape {tuple(expert_ids.shape)}")
    _check(not expert_ids.dtype.is_floating_point and expert_ids.dtype != torch.bool, fn,
           f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
    _check(x.shape[0] > 0, fn, "x must hold at least one token (BS > 0)")
    k = expert_ids.shape[1]
    _check(0 < k <= min(MAX_TOPK, g.n_experts), fn, f"expert_ids has K={k} columns; MC2 needs 1..{MAX_TOPK} "
           f"and at most n_experts={g.n_experts}")


def dispatch(torch_npu, g: Mc2Group, x: torch.Tensor, expert_ids: torch.Tensor) -> Dispatched:
    """Send each token's row to the ranks owning its K experts (no quantisation).

    Args:
        torch_npu: the torch_npu module (a test double on CPU).
        g: the MC2 group.
        x: [BS, H] bfloat16/float16 rows of this rank; every rank must pass the same BS (global_bs = 0).
        expert_ids: [BS, K] global expert ids, distinct within a row (cast to int32 here).
    Returns:
        `Dispatched`; rows per local expert in `expert_token_nums` (counts, not a cumulative sum).
    """
    _check_ids("dispatch", g, x, expert_ids)
    out = torch_npu.npu_moe_distribute_dispatch_v2(
        x, expert_ids.to(torch.int32), g.comm_name, g.world_size, g.rank, g.n_experts,
        quant_mode=0, global_bs=0, expert_token_nums_type=1, comm_alg=g.comm_alg)
    return Dispatched(*out[:7])


def combine(torch_npu, g: Mc2Group, expert_out: torch.Tensor, d: Dispatched, expert_ids: torch.Tensor,
            expert_scales: torch.Tensor) -> torch.Tensor:
    """Return the experts' rows to their tokens' ranks and sum them weighted: [BS, H] in expert_out's dtype.

    Args:
        expert_out: [A, H] (dispatch's `x` shape and dtype) expert outputs, row i for dispatched row i;
            rows past sum(expert_token_nums) are ignored.
        d: this call's `dispatch` result.
        expert_ids: the [BS, K] ids given to `dispatch`.
        expert_scales: [BS, K] routing weights (fp32 after the cast here), applied by the op.
    """
    fn = "combine"
    _check(expert_out.shape == d.x.shape, fn,
           f"expert_out must have dispatch's expand_x shape {tuple(d.x.shape)}, got {tuple(expert_out.shape)}")
    _check(expert_out.dtype in MC2_DTYPES, fn, f"expert_out must be bfloat16 or float16, got {expert_out.dtype}")
    _check(expert_ids.dim() == 2 and expert_scales.shape == expert_ids.shape, fn,
           f"expert_scales must be [BS, K] like expert_ids {tuple(expert_ids.shape)}, got "
           f"{tuple(expert_scales.shape)}")
    _check(expert_scales.is_floating_point(), fn, f"expert_scales must be floating point, got {expert_scales.dtype}")
    return torch_npu.npu_moe_distribute_combine_v2(
        expert_out, expert_ids.to(torch.int32), d.assist_info, d.ep_recv_counts, expert_scales.float(),
        g.comm_name, g.world_size, g.rank, g.n_experts, expand_scales=d.expand_scales, global_bs=0,
        comm_alg=g.comm_alg)


__all__ = ["Mc2Limits", "A2_LIMITS", "A3_LIMITS", "limits_for_soc", "unsupported_reason", "Mc2Group",
           "hccl_comm_name", "Dispatched", "dispatch", "combine", "MC2_DTYPES"]
