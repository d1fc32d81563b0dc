"""Expert parallelism through Ascend's fused MC2 ops, and the choice between MC2 and all-to-all.

`Mc2Experts` is a `MoE.expert_parallel` callable with `AllToAllExperts`' contract, `(x, ids, w, run_local) ->
routed [T, D] fp32`, built on `ops/npu/mc2.py` (`npu_moe_distribute_dispatch_v2` / `_combine_v2`):

1. rank r takes the contiguous token slice [r·⌈T/P⌉, (r+1)·⌈T/P⌉) (attention is replicated, so every rank holds
   the same x, ids, w), padded to ⌈T/P⌉ rows: the ops need the same token count BS on every rank (global_bs 0)
   and BS > 0. Padding rows are zero tokens routed to experts 0..k-1 with weight 0, whose outputs are dropped;
   x_active_mask would avoid their compute, but its support differs between A2 and A3 and between A2's
   communication algorithms, while padding is valid everywhere;
2. the slice goes out in calls of at most `max_bs` tokens (the chip's BS limit; every rank makes the same
   number of calls because every slice has the same padded length);
3. dispatch gives this rank the rows of its local experts, grouped by expert, with `expert_token_nums`; the
   local experts run on them with routing weight 1 (`MoE.run_local`) and their bf16 outputs overwrite the
   dispatched rows in place;
4. combine returns them and applies the routing weights (the ops' documented formula x[t] = sum_k w[t,k] ·
   expert(t,k)); an all-gather over the engine's group gives every rank the full [T, D].

Numerics differ from one device and from `AllToAllExperts` (which are bit-identical to each other): the routing
weight multiplies the expert's bf16 output instead of its activation before w2 (the reference order), and the
combined sum is rounded to the model dtype before the shared expert is added. Greedy tokens agree in the tests;
logits agree to bf16 rounding.

The MC2 ops may not share their HCCL communicator with other ops (torch_npu pages), so `choose_dispatcher`
creates a dedicated group for them; the all-gather runs on `ParallelContext.group`.

Evidence: checked under the CPU torch_npu double on Gloo (tests/unit/npu/test_mc2_ep.py); never run on HCCL.
"""

from __future__ import annotations

import datetime
import importlib
import logging

import torch
import torch.distributed as dist

from ascend_v4.model.moe import MoE
from ascend_v4.ops.npu import mc2

from .distributed import ParallelContext, all_gather_into
from .expert_parallel import AllToAllExperts, ExpertPlacement

log = logging.getLogger(__name__)

MC2_OPS = ("npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2")


class Mc2Experts:
    """`MoE.expert_parallel` for one rank over MC2 dispatch / combine (one instance serves every MoE layer).

    Args:
        ctx: this rank's parallel context (its `group` carries the final all-gather).
        placement: experts per rank; must match `group`.
        torch_npu: the torch_npu module (the CPU double in tests).
        group: the MC2 communicator (a group no other op uses).
        max_bs: most tokens per rank in one dispatch (`Mc2Limits.max_bs` of the chip).

    Raises:
        ValueError: `group` disagrees with `ctx` / `placement`, or max_bs < 1 (the message names the field).
    """

    def __init__(self, ctx: ParallelContext, placement: ExpertPlacement, torch_npu, group: mc2.Mc2Group,
                 max_bs: int):
        for field, got, want in (("world_size", group.world_size, ctx.world_size), ("rank", group.rank, ctx.rank),
                                 ("n_experts", group.n_experts, placement.num_experts)):
            if got != want:
                raise ValueError(f"Mc2Group.{field}={got} does not match this rank's expert parallelism ({want})")
        if max_bs < 1:
            raise ValueError(f"max_bs must be >= 1, got {max_bs}")
        self.ctx, self.placement, self.torch_npu, self.group, self.max_bs = ctx, placement, torch_npu, group, max_bs

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, run_local) -> torch.Tensor:
        """x [T, D] bf16/fp16 (same on every rank); ids [T, k] global expert ids; w [T, k] fp32 -> [T, D] fp32."""
        P, r = self.ctx.world_size, self.ctx.rank
        T, k = ids.shape
        D = x.shape[1]
        chunk = max(1, -(-T // P))
        lo = min(r * chunk, T)
        n = min(lo + chunk, T) - lo
        xs = x.new_zeros((chunk, D))
        xs[:n] = x[lo:lo + n]
        ids_s = torch.arange(k, dtype=torch.int32, device=x.device).expand(chunk, k).clone()  # valid, distinct
        ids_s[:n] = ids[lo:lo + n]
        ws = torch.zeros((chunk, k), dtype=torch.float32, device=x.device)  # padding rows weigh nothing
        ws[:n] = w[lo:lo + n]

        out = x.new_empty((chunk, D))
        for s in range(0, chunk, self.max_bs):
            e = min(s + self.max_bs, chunk)
            out[s:e] = self._one_call(xs[s:e], ids_s[s:e], ws[s:e], run_local)
        full = x.new_empty((P * chunk, D))
        all_gather_into(full, out, group=self.ctx.group)
        return full[:T].float()

    def _one_call(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, run_local) -> torch.Tensor:
        d = mc2.dispatch(self.torch_npu, self.group, x, ids)
        # local expert position of each real row; the one host sync of the call (run_local takes a row list)
        lid = torch.repeat_interleave(torch.arange(self.group.local_experts, device=x.device),
                                      d.expert_token_nums.long())
        n = lid.numel()
        if n:
            ones = torch.ones((n, 1), dtype=torch.float32, device=x.device)  # weights are applied by combine
            d.x[:n] = run_local(d.x[:n], lid[:, None], ones).to(d.x.dtype)  # rows past n are never read
        return mc2.combine(self.torch_npu, self.group, d.x, d, ids, w)


def mc2_blocker(torch_npu, world: int, n_experts: int, dim: int, topk: int, dtype: torch.dtype
                ) -> tuple[mc2.Mc2Limits | None, str | None]:
    """(chip limits, None) when MC2 can serve this EP layout, else (limits or None, why not)."""
    if torch_npu is None:
        return None, "torch_npu could not be imported"
    missing = [op for op in MC2_OPS if not hasattr(torch_npu, op)]
    if missing:
        return None, f"torch_npu {getattr(torch_npu, '__version__', '?')} has no {', '.join(missing)}"
    soc = torch_npu.npu.get_soc_version()
    lim = mc2.limits_for_soc(soc)
    if lim is None:
        return None, f"SoC id {soc} is not an Atlas A2/A3 chip (the MC2 limits are documented for those only)"
    return lim, mc2.unsupported_reason(lim, world, n_experts, dim, topk, dtype)


def _import_torch_npu():
    try:
        return importlib.import_module("torch_npu")
    except Exception:  # noqa: BLE001 - any import failure means "no MC2"; the platform module logged why
        return None


def choose_dispatcher(ctx: ParallelContext, placement: ExpertPlacement, moe: MoE):
    """The `MoE.expert_parallel` callable for this rank: `Mc2Experts` on an HCCL group when torch_npu has the
    MC2 ops and the model fits their documented limits, else `AllToAllExperts` (on NPU with one log line saying
    why). Collective on HCCL (creates the MC2 group): every rank must call it at the same point."""
    if ctx.backend != "hccl":
        return AllToAllExperts(ctx, placement)
    if ctx.tp_size != ctx.world_size:
        # Mc2Experts slices one shared batch over all ranks; with attention DP the ranks' batches differ
        log.warning("expert parallelism: MC2 dispatch/combine not used (attention data parallelism: DP %d, not "
                    "wired for MC2 yet); using all-to-all on %s", ctx.world_size // ctx.tp_size, ctx.backend)
        return AllToAllExperts(ctx, placement)
    a = moe.args
    tnpu = _import_torch_npu()
    lim, why = mc2_blocker(tnpu, ctx.world_size, placement.num_experts, a.dim, a.n_activated_experts,
                           moe.opts.dtype)
    if lim is None or why is not None:
        log.warning("expert parallelism: MC2 dispatch/combine not used (%s); using all-to-all on %s",
                    why, ctx.backend)
        return AllToAllExperts(ctx, placement)
    # MC2's own communicator: the ops allow no other op on theirs
    group = dist.new_group(backend="hccl", timeout=datetime.timedelta(seconds=ctx.timeout_s))
    name = mc2.hccl_comm_name(group, ctx.rank)
    log.info("expert parallelism: MC2 dispatch/combine on %s (communicator %s, at most %d tokens per rank "
             "per call)", lim.chip, name, lim.max_bs)
    return Mc2Experts(ctx, placement, tnpu, mc2.Mc2Group(name, ctx.world_size, ctx.rank, placement.num_experts,
                                                         lim.comm_alg), lim.max_bs)


__all__ = ["Mc2Experts", "choose_dispatcher", "mc2_blocker", "MC2_OPS"]
