"""The parallel layout of a run: `--npus N [--tp T]`, or, without `--tp`, the planner's choice among the layouts
the engine runs, printed at start (`Layout.describe`).

N ranks = TP x DP; the routed experts are split over all N (EP = N). Each of the DP groups of TP consecutive ranks
has its own scheduler, cache and requests (rank 0 routes each request to the least loaded group); within a group
the T ranks split the attention heads, output groups and vocab (ascend_v4/model/tp.py). Any TP that divides N
and that the model divides into runs (`engine_tps`: the one place `ParallelConfig`, `plan` and `serve` ask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ascend_v4.model.tp import check_tp


def engine_tps(npus: int, args=None) -> tuple[int, ...]:
    """Attention TP sizes the engine runs on `npus` ranks (for model `args` when given), smallest first (the
    most DP groups: the planner's preference when several fit)."""
    out = []
    for t in (d for d in range(1, npus + 1) if npus % d == 0):
        try:
            check_tp(args, t) if args is not None else None
        except ValueError:
            continue
        out.append(t)
    return tuple(out)


@dataclass(frozen=True)
class Layout:
    npus: int
    tp: int
    source: str  # why this layout: "--tp", "planner (910c)", "default"

    @property
    def dp(self) -> int:
        return self.npus // self.tp

    def describe(self) -> str:
        if self.npus == 1:
            return "1 device"
        what = []
        if self.dp > 1:
            what.append(f"{self.dp} groups with their own scheduler and requests")
        if self.tp > 1:
            what.append(f"heads, output groups and vocab split over {self.tp} ranks per group")
        return (f"{self.npus} ranks: attention DP {self.dp} x TP {self.tp} ({'; '.join(what)}), routed experts "
                f"EP {self.npus} [{self.source}]")

    def as_dict(self) -> dict[str, Any]:
        return {"npus": self.npus, "tp": self.tp, "dp": self.dp, "ep": self.npus, "source": self.source}


def check_engine_tp(args, npus: int, tp: int) -> None:
    """ValueError unless the engine runs attention TP `tp` on `npus` ranks (for this model when given)."""
    if npus < 1:
        raise ValueError(f"--npus must be >= 1, got {npus}")
    if tp < 1 or npus % tp:
        raise ValueError(f"--tp {tp} must divide --npus {npus}")
    if args is not None:
        check_tp(args, tp)


def resolve_tp(npus: int, tp: int | None, dp: int | None) -> int | None:
    """The TP size `--npus/--tp/--dp` name (None: let `choose_layout` pick). ValueError when they disagree."""
    if dp is None:
        return tp
    if dp < 1 or npus % dp:
        raise ValueError(f"--dp {dp} must divide --npus {npus}")
    if tp is not None and tp * dp != npus:
        raise ValueError(f"--tp {tp} x --dp {dp} must equal --npus {npus}")
    return npus // dp


def choose_layout(args, npus: int, tp: int | None = None, *, hardware: str | None = None,
                  output_format: str = "native", context: int = 131072, kv=None, model: str = "model") -> Layout:
    """The layout to run. `tp` given: checked (and, with `hardware`, fitted by the planner). Otherwise, with
    `hardware`: the smallest TP (most DP groups) the planner says fits; without: TP 1, DP = npus.

    Raises:
        ValueError: a TP the engine or the model cannot run.
        runtime.planner.DeploymentError: no engine layout fits `hardware` (the planner's numbers).
    """
    if tp is not None:
        check_engine_tp(args, npus, tp)
        if hardware:
            from .planner import check_deployment

            check_deployment(args, output_format, hardware, npus, tp=tp, context=context, kv=kv, model=model)
        return Layout(npus, tp, "--tp")
    check_engine_tp(args, npus, 1)
    cands = engine_tps(npus, args)
    if not hardware:
        return Layout(npus, cands[0], "default: attention DP over every rank")
    from .planner import DeploymentError, check_deployment

    first: DeploymentError | None = None
    for t in cands:
        try:
            check_deployment(args, output_format, hardware, npus, tp=t, context=context, kv=kv, model=model)
        except DeploymentError as e:
            first = first or e
            continue
        return Layout(npus, t, f"planner: fits {hardware}")
    raise first


__all__ = ["Layout", "choose_layout", "check_engine_tp", "engine_tps", "resolve_tp"]
