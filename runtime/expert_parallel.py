"""Expert parallelism: which rank owns which routed experts, and the all-to-all dispatch / combine that the
runtime injects into every `MoE` as `MoE.expert_parallel` (the model never imports this module).

Placement (model-spec §6, reference EP): rank r owns experts [r·E/P, (r+1)·E/P).

Dispatch / combine, for a step's tokens. The ranks of one attention TP group hold the same T tokens (x, ids,
weights); different attention-DP groups hold different ones (an idle group: none). With TP size t and TP rank j:
1. the rank takes the contiguous token slice [j·⌈T/t⌉, (j+1)·⌈T/t⌉) of its group's tokens (t = 1: all of them)
   and sorts its (token, slot) pairs by global expert id (stable), which groups them by owner;
2. per-owner pair counts go out first (`all_to_all_single` on a [P] tensor), then the token rows and a
   [n, 2] int32 tensor (expert id, routing weight bits) with those counts as splits;
3. each owner runs its local experts on what it received (`MoE.run_local`, local ids = global - first);
4. the per-pair outputs go back with the reverse splits (combine), and each rank sums each token's k outputs
   in ascending expert-id order, as the single-device loop does;
5. an all-gather over the TP group of the per-slice results gives every rank of it the full [T, D] routed output
   (t = 1: nothing to gather).

With one group (DP 1) the slices are contiguous and concatenated in rank order, so an owner sees each expert's
tokens in global token order, i.e. the very matrix the single-device loop feeds that expert, and the combine adds
in the same order: EP outputs are bit-identical to one device (given deterministic kernels). With DP > 1 an
expert's matrix holds the rows of several groups' batches: each row's result is the same computation, but the
GEMM over other rows may round its last bit differently.

Gloo's `all_to_all_single` rejects fp8 (model-spec §16), so one-byte float payloads travel as uint8 views.
On an HCCL group `attach_expert_parallel` uses the fused MC2 ops instead where they apply
(runtime/expert_parallel_mc2.py; docs/parallel.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ascend_v4.model.moe import MoE

from .distributed import ParallelContext, all_gather_into

@dataclass(frozen=True)
class ExpertPlacement:
    """Contiguous blocks of routed experts per rank."""

    num_experts: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.num_experts % self.world_size:
            raise ValueError(f"{self.num_experts} routed experts cannot be split evenly over {self.world_size} "
                             f"ranks (expert parallelism needs world_size to divide n_routed_experts)")

    @property
    def per_rank(self) -> int:
        return self.num_experts // self.world_size

    def experts_of(self, rank: int) -> range:
        return range(rank * self.per_rank, (rank + 1) * self.per_rank)

    def owner(self, expert_ids: torch.Tensor) -> torch.Tensor:
        return torch.div(expert_ids, self.per_rank, rounding_mode="floor")


def _wire(t: torch.Tensor) -> torch.Tensor:
    """What goes over the wire: one-byte floats as uint8 (Gloo has no fp8 all_to_all)."""
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group) -> None:
    dist.all_to_all_single(_wire(out), _wire(inp.contiguous()), out_splits, in_splits, group=group)


class AllToAllExperts:
    """`MoE.expert_parallel` for one rank: slice, dispatch to owners, run local experts, combine, all-gather."""

    def __init__(self, ctx: ParallelContext, placement: ExpertPlacement):
        self.ctx, self.placement = ctx, placement
        self.first = placement.experts_of(ctx.rank).start

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, run_local) -> torch.Tensor:
        """x [T, D] (same on the ranks of a TP group); ids [T, k] global expert ids; w [T, k] fp32 -> routed
        [T, D] fp32. T may be 0 (an idle DP group still joins the exchange)."""
        P, g = self.ctx.world_size, self.ctx.group
        t, j = self.ctx.tp_size, self.ctx.tp_rank
        T, k = ids.shape
        D = x.shape[1]
        chunk = -(-T // t)
        lo, hi = min(j * chunk, T), min((j + 1) * chunk, T)
        n_tok = hi - lo
        ids_s = ids[lo:hi]
        flat = ids_s.reshape(-1)  # [n_tok * k]
        order = torch.argsort(flat, stable=True)  # pairs by expert id, token order within: grouped by owner
        gid = flat[order]
        send_counts = torch.bincount(self.placement.owner(gid), minlength=P)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=g)
        counts = torch.cat([send_counts, recv_counts]).tolist()  # one sync
        sc, rc = counts[:P], counts[P:]
        n_recv = sum(rc)

        # dispatch: token rows, then (expert id, weight bits) per pair
        send_x = x[lo:hi][order // k]  # [n, D]
        meta = torch.stack([gid.to(torch.int32), w[lo:hi].reshape(-1)[order].float().view(torch.int32)], 1)
        recv_x = x.new_empty((n_recv, D))
        recv_meta = meta.new_empty((n_recv, 2))
        _all_to_all(recv_x, send_x, rc, sc, g)
        _all_to_all(recv_meta, meta, rc, sc, g)

        # local experts on the received rows (ids relative to this rank's first expert)
        if n_recv:
            lid = recv_meta[:, 0].long() - self.first
            rw = recv_meta[:, 1].contiguous().view(torch.float32)
            y = run_local(recv_x, lid[:, None], rw[:, None]).float()
        else:
            y = torch.zeros((0, D), dtype=torch.float32, device=x.device)

        # combine: outputs back to the pairs' source ranks
        back = y.new_empty((len(gid), D))
        _all_to_all(back, y, sc, rc, g)
        pair_out = torch.empty((n_tok * k, D), dtype=torch.float32, device=x.device)
        pair_out[order] = back
        slot = torch.argsort(ids_s, dim=1, stable=True)  # each token's slots in ascending expert id
        pair_out = pair_out.view(n_tok, k, D).gather(1, slot[..., None].expand(-1, -1, D))
        out = torch.zeros((chunk, D), dtype=torch.float32, device=x.device)
        for slot in range(k):  # 0 + y_a + y_b + ...: the single-device accumulation order
            out[:n_tok] += pair_out[:, slot]
        if t == 1:
            return out[:T]
        full = torch.empty((t * chunk, D), dtype=torch.float32, device=x.device)
        all_gather_into(full, out, group=self.ctx.tp_group)
        return full[:T]


def moe_modules(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def attach_expert_parallel(model: nn.Module, ctx: ParallelContext, placement: ExpertPlacement,
                           dispatcher=None) -> int:
    """Inject the dispatcher into every MoE of `model` (built with `placement.experts_of(ctx.rank)`).
    Returns the number of MoE modules.

    `dispatcher`: the `(x, ids, w, run_local) -> [T, D]` callable shared by all layers; by default MC2 on an
    HCCL group where it applies, else `AllToAllExperts` (`expert_parallel_mc2.choose_dispatcher`).

    Raises:
        ValueError: a MoE holds other experts than this rank owns.
    """
    mine = list(placement.experts_of(ctx.rank))
    mods = moe_modules(model)
    for m in mods:
        if m.expert_ids != mine:
            raise ValueError(f"rank {ctx.rank} must hold experts {mine[0]}..{mine[-1]}, a MoE holds "
                             f"{m.expert_ids[:3]}... ({len(m.expert_ids)})")
    if ctx.world_size > 1 and dispatcher is None and mods:
        from .expert_parallel_mc2 import choose_dispatcher  # lazy: that module imports this one

        dispatcher = choose_dispatcher(ctx, placement, mods[0])
    for m in mods:
        m.expert_parallel = dispatcher if ctx.world_size > 1 else None
    return len(mods)


__all__ = ["ExpertPlacement", "AllToAllExperts", "attach_expert_parallel", "moe_modules"]
