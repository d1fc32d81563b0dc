"""The collectives of an attention tensor-parallel group (`ascend_v4.model.tp.TPComm` on a process group) and
how a rank's model gets them. What is split and why: ascend_v4/model/tp.py; layouts: docs/parallel.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ascend_v4.model.placement import REPLICATED, ROUTED, TP, placement

from .distributed import ParallelContext, all_gather_into

class GroupComm:
    """`TPComm` over one TP process group: all-reduce (sum) and all-gather along the last dim."""

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[..., n] per rank -> [..., size * n], rank 0's columns first (vocab-parallel logits)."""
        flat = t.contiguous().reshape(-1, t.shape[-1])  # [M, n]
        out = flat.new_empty((self.size * flat.shape[0], flat.shape[1]))
        all_gather_into(out, flat, group=self.group)  # [size * M, n], rank blocks stacked
        out = out.view(self.size, flat.shape[0], flat.shape[1]).permute(1, 0, 2)  # [M, size, n]
        return out.reshape(*t.shape[:-1], self.size * t.shape[-1])


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the weights this rank holds (parameters and persistent buffers), in total and by placement
    (`ascend_v4.model.placement`): what the planner's per-card weight figure predicts."""
    out = {"weight_bytes": 0, f"{ROUTED}_bytes": 0, f"{TP}_bytes": 0, f"{REPLICATED}_bytes": 0}
    for name, t in model.state_dict(keep_vars=True).items():
        if t is None or t.is_meta:
            continue
        n = t.numel() * t.element_size()
        out["weight_bytes"] += n
        out[f"{placement(name)}_bytes"] += n
    return out


def attach_tensor_parallel(model: nn.Module, ctx: ParallelContext) -> None:
    """Give the model (built with `TPShard(ctx.tp_rank, ctx.tp_size)`) its TP group's collectives."""
    tp = getattr(model, "tp", None)
    if tp is None or (tp.rank, tp.size) != (ctx.tp_rank, ctx.tp_size):
        raise ValueError(f"rank {ctx.rank}: model built for TP {getattr(tp, 'rank', None)}/{getattr(tp, 'size', None)}"
                         f", process groups say {ctx.tp_rank}/{ctx.tp_size}")
    model.set_tp_comm(GroupComm(ctx.tp_group, ctx.tp_size) if ctx.tp_size > 1 else None)


__all__ = ["GroupComm", "attach_tensor_parallel", "resident_bytes"]
