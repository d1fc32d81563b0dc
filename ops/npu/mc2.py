"""MC2 expert-parallel dispatch / combine on Ascend (ascend-notes.md §0.9, §7.2): thin, typed wrappers over
`torch_npu.npu_moe_distribute_dispatch_v2` / `npu_moe_distribute_combine_v2`, for runtime/expert_parallel.py
to plug in where it now uses all_to_all on the HCCL group. Not called by anything yet.

Signatures as registered by torch_npu 2.13.0 (libtorch_npu.so schemas):
  npu_moe_distribute_dispatch_v2(Tensor x, Tensor expert_ids, str group_ep, int ep_world_size, int ep_rank_id,
      int moe_expert_num, *, Tensor? scales=None, Tensor? x_active_mask=None, Tensor? expert_scales=None, ...,
      str group_tp="", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1,
      int shared_expert_rank_num=0, int quant_mode=0, int global_bs=0, int expert_token_nums_type=1, ...)
      -> (expand_x, dynamic_scales, assist_info_for_combine, expert_token_nums, ep_recv_counts, tp_recv_counts,
          expand_scales)
  npu_moe_distribute_combine_v2(Tensor expand_x, Tensor expert_ids, Tensor assist_info_for_combine,
      Tensor ep_send_counts, Tensor expert_scales, str group_ep, int ep_world_size, int ep_rank_id,
      int moe_expert_num, *, ..., int shared_expert_num=1, int shared_expert_rank_num=0, int global_bs=0,
      int comm_quant_mode=0, ...) -> Tensor [bs, h]
The group is addressed by its HCCL communicator *name*. quant_mode 0 = no quantisation (bf16 payload),
2 = dynamic int8 (A2/A3), 4 = MXFP (950). Evidence: written only (needs HCCL and NPUs; the assist-info layout is
internal to the op, so a CPU double could only check argument plumbing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mc2Group:
    """What the MC2 ops need to know about the expert-parallel group."""

    comm_name: str  # HCCL communicator name of the EP group
    world_size: int
    rank: int
    n_experts: int  # global routed experts (moe_expert_num)


def hccl_comm_name(group, rank: int) -> str:
    """HCCL communicator name of a torch.distributed group created with the hccl backend (torch_npu API)."""
    backend = group._get_backend(torch.device("npu"))
    return backend.get_hccl_comm_name(rank)


@dataclass
class Dispatched:
    x: torch.Tensor  # rows for this rank's local experts, grouped by expert
    scales: torch.Tensor  # dynamic quantisation scales (quant_mode 2 / 4), else unused
    assist_info: torch.Tensor  # opaque: hand back to combine
    expert_token_nums: torch.Tensor  # [local experts] int64: rows per local expert (a group_list for the GEMMs)
    ep_recv_counts: torch.Tensor
    tp_recv_counts: torch.Tensor
    expand_scales: torch.Tensor


def dispatch(torch_npu, g: Mc2Group, x: torch.Tensor, expert_ids: torch.Tensor, expert_scales: torch.Tensor,
             quant_mode: int = 0) -> Dispatched:
    """x [bs, h] bf16, expert_ids [bs, k] int32 (global ids), expert_scales [bs, k] fp32 routing weights."""
    out = torch_npu.npu_moe_distribute_dispatch_v2(
        x, expert_ids.to(torch.int32), g.comm_name, g.world_size, g.rank, g.n_experts,
        expert_scales=expert_scales.float(), shared_expert_num=0, quant_mode=quant_mode,
        expert_token_nums_type=1)
    return Dispatched(*out)


def combine(torch_npu, g: Mc2Group, expert_out: torch.Tensor, d: Dispatched, expert_ids: torch.Tensor,
            expert_scales: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the experts' rows back on the tokens' ranks: [bs, h]. ascend-v4 multiplies the routing
    weight in before w2 (the reference's order), so pass `expert_scales` of ones here to avoid applying it twice."""
    return torch_npu.npu_moe_distribute_combine_v2(
        expert_out, expert_ids.to(torch.int32), d.assist_info, d.ep_recv_counts, expert_scales.float(),
        g.comm_name, g.world_size, g.rank, g.n_experts, tp_send_counts=d.tp_recv_counts, shared_expert_num=0)


__all__ = ["Mc2Group", "Dispatched", "hccl_comm_name", "dispatch", "combine"]
