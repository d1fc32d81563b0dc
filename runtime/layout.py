"""The parallel layout of a run: `--npus N [--tp T]`, or, without `--tp`, the planner's choice among the layouts
the engine runs, printed at start (`Layout.describe`).

N ranks = TP x DP; the routed experts are split over all N (EP = N). The engine runs today:
* TP = N (DP 1): one attention tensor-parallel group over every rank (ascend_v4/model/tp.py);
* TP = 1 with N > 1: attention replicated, every rank computing every sequence (the first EP layout; it has the
  memory of DP N, not its throughput).
Attention data parallelism (DP > 1 with its own schedulers) is not built yet: `engine_tps` is the one place that
says which TP sizes run, for `ParallelConfig`, `plan` and `serve`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ascend_v4.model.tp import check_tp


def engine_tps(npus: int, args=None) -> tuple[int, ...]:
    """Attention TP sizes the engine runs on `npus` ranks (for model `args` when given), largest first."""
    out = []
    for t in ((npus, 1) if npus > 1 else (1,)):
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
        attn = (f"attention TP {self.tp} (heads, output groups and vocab split; KV cache, indexer and compressors "
                f"whole on every rank)" if self.tp > 1 else "attention replicated on every rank")
        return f"{self.npus} ranks: {attn}, routed experts EP {self.npus} [{self.source}]"

    def as_dict(self) -> dict[str, Any]:
        return {"npus": self.npus, "tp": self.tp, "dp": self.dp, "ep": self.npus, "source": self.source}


def check_engine_tp(args, npus: int, tp: int) -> None:
    """ValueError unless the engine runs attention TP `tp` on `npus` ranks for this model."""
    if npus < 1:
        raise ValueError(f"--npus must be >= 1, got {npus}")
    if tp < 1 or npus % tp:
        raise ValueError(f"--tp {tp} must divide --npus {npus}")
    if tp not in engine_tps(npus):  # the model's own limits: check_tp below
        raise ValueError(f"--tp {tp} with --npus {npus} needs attention data parallelism (DP {npus // tp} groups of "
                         f"TP {tp}), which the engine does not run yet: use --tp {' or --tp '.join(map(str, engine_tps(npus)))}")
    if args is not None:
        check_tp(args, tp)


def choose_layout(args, npus: int, tp: int | None = None, *, hardware: str | None = None,
                  output_format: str = "native", context: int = 131072, kv=None, model: str = "model") -> Layout:
    """The layout to run. `tp` given: checked (and, with `hardware`, fitted by the planner). Otherwise, with
    `hardware`: the largest engine TP that the planner says fits (TP 1 computes every sequence on every rank);
    without: the largest engine TP this model divides into.

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
        return Layout(npus, cands[0], "default: the largest attention TP the engine runs for this model")
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


__all__ = ["Layout", "choose_layout", "check_engine_tp", "engine_tps"]
