"""Worker process of an expert-parallel engine: rank r > 0, one per device.

The ranks of an attention TP group run the same `Engine` (SPMD); each attention DP group has its own. A worker:
1. connects to rank 0's store (MASTER_ADDR:MASTER_PORT), reads the run spec (`RankSpec`);
2. builds the model with only its routed experts and loads them (other experts' tensors are skipped), then
   reports "ready" (or the error) in the store;
3. joins the process groups, injects the all-to-all dispatcher into every MoE, builds its `Engine`;
4. loops: receive rank 0's message (broadcast); "step" = apply the add/abort commands rank 0 took since the
   last step for this rank's DP group, then `engine.step()` (the MoE collectives pair up with every rank's step,
   the sampled-token broadcast with the TP group's) and, with several DP groups, send the group's outputs to
   rank 0; "ping" = idle heartbeat; "info" = send `rank_info` to rank 0; "stop" = leave.
Any error (a dead peer, a timeout) ends the process with a non-zero status; rank 0 reports it. A locally
started worker also exits when its parent dies (`--watch-parent`).

Started by `DistEngine` on this node; on other nodes run one per rank, with torchrun-style variables:

    MASTER_ADDR=<rank-0 host> MASTER_PORT=<port> WORLD_SIZE=16 RANK=8 LOCAL_RANK=0 \\
        python -m ascend_v4.runtime.worker      # from a directory other than the repository root
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ascend_v4.model.args import ModelArgs
from ascend_v4.model.layers import ModelOptions
from ascend_v4.model.load import load_model
from ascend_v4.model.tp import TPShard
from ascend_v4.model.transformer import Transformer
from ascend_v4.tokenizer import Tokenizer

from .config import EngineConfig
from .distributed import (SPEC_KEY, ParallelConfig, ParallelContext, broadcast_in_tp_group, broadcast_object,
                          create_store, destroy_process_groups, gather_to_driver, get_object, init_process_groups,
                          rank_device, ready_key)
from .engine import Engine
from .expert_parallel import ExpertPlacement, attach_expert_parallel
from .tensor_parallel import attach_tensor_parallel, resident_bytes
from .sampling import Sampled

# collective errors caused by another rank (dead peer, timeout): reported in one line
def _debug() -> bool:
    from ascend_v4 import envs

    try:
        return envs.debug()
    except ValueError:  # a malformed ASCEND_V4_DEBUG must not hide the worker's own error
        return False


_PEER_ERRORS = ("Connection closed", "Connection reset", "Timed out", "Broken pipe", "Connection refused")
# messages from rank 0, one per broadcast
STEP, PING, INFO, STOP = "step", "ping", "info", "stop"


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs to build its part of the engine (rank 0 puts it in the store)."""

    model_path: str
    options: ModelOptions
    engine_config: EngineConfig
    parallel: ParallelConfig
    device_type: str  # cpu / cuda / npu
    tokenizer_dir: str | None = None  # None = the default V4 tokenizer


def build_rank_model(spec: RankSpec, rank: int, local_rank: int) -> Transformer:
    """This rank's model: routed experts `placement.experts_of(rank)` only; with attention TP its slice of the
    TP-split tensors (model/tp.py), the rest whole. Reads only those bytes of the checkpoint."""
    args = ModelArgs.from_dir(spec.model_path)
    placement = ExpertPlacement(args.n_routed_experts, spec.parallel.world_size)
    tp = spec.parallel.tp
    return load_model(spec.model_path, spec.options, device=rank_device(spec.device_type, local_rank),
                      experts=placement.experts_of(rank), tp=TPShard(rank % tp, tp))


def load_tokenizer(spec: RankSpec) -> Tokenizer:
    return Tokenizer.from_dir(spec.tokenizer_dir) if spec.tokenizer_dir else Tokenizer.default()


def make_engine(model: Transformer, tokenizer: Tokenizer, spec: RankSpec, ctx: ParallelContext) -> Engine:
    """Inject expert (and attention tensor) parallelism and build the rank's Engine: within a TP group the
    leader's sampled tokens are the truth; with several DP groups every engine steps in lockstep."""
    attach_expert_parallel(model, ctx, ExpertPlacement(model.args.n_routed_experts, ctx.world_size))
    attach_tensor_parallel(model, ctx)

    def token_sync(sampled: list[Sampled]) -> list[Sampled]:
        return broadcast_in_tp_group(ctx, sampled if ctx.tp_rank == 0 else None)

    return Engine(model, tokenizer, spec.engine_config, token_sync=token_sync if ctx.tp_size > 1 else None,
                  lockstep=ctx.dp_size > 1)


def rank_info(model: Transformer, rank: int) -> dict:
    """What this rank holds: routed expert ids (first MoE), TP place, parameter counts and resident weight
    bytes (all, and by placement: routed experts, TP-split attention / vocab tensors, replicated)."""
    moe = next(m for m in model.modules() if hasattr(m, "expert_ids"))
    return {"rank": rank, "pid": os.getpid(), "experts": list(moe.expert_ids),
            "tp_rank": model.tp.rank, "tp_size": model.tp.size,
            "params": sum(p.numel() for p in model.parameters()),
            "tensors": sum(1 for _ in model.named_parameters()), **resident_bytes(model)}


def apply_commands(engine: Engine, cmds: list[tuple], group: int) -> None:
    """Apply rank 0's ("add", group, id, prompt, params) / ("abort", group, id) commands meant for DP `group`."""
    for cmd in cmds:
        if cmd[1] != group:
            continue
        if cmd[0] == "add":
            engine.add_request(cmd[2], cmd[3], cmd[4])
        elif cmd[0] == "abort":
            engine.abort(cmd[2])
        else:
            raise ValueError(f"unknown engine command {cmd[0]!r}")


def step_group(engine: Engine, ctx: ParallelContext, cmds: list[tuple]) -> tuple[list, list[dict] | None] | None:
    """One step of this rank's DP group. On rank 0: (the step's outputs, in group order; every group's engine
    stats after the step, in group order, or None with one group, where rank 0's engine is the group). With
    several groups the leaders' outputs and stats ride on one gather; None on the other ranks."""
    apply_commands(engine, cmds, ctx.dp_rank)
    outs = engine.step()
    if ctx.dp_size == 1:
        return (outs, None) if ctx.is_driver else None
    got = gather_to_driver(ctx, (outs, engine.stats()) if ctx.tp_rank == 0 else None)
    if got is None:
        return None
    leaders = [got[r] for r in range(0, ctx.world_size, ctx.tp_size)]
    return [o for outs_g, _ in leaders for o in outs_g], [st for _, st in leaders]


def _watch_parent(ppid: int) -> None:
    """Exit at once when the process that started us is gone (it may have been killed: no shutdown)."""
    def run() -> None:
        while True:
            if os.getppid() != ppid:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=run, name="ascend-v4-parent-watch", daemon=True).start()


def run_worker(rank: int, world_size: int, local_rank: int, master_addr: str, master_port: int,
               init_timeout_s: float = 900.0) -> int:
    store = create_store(rank, world_size, master_addr, master_port, init_timeout_s)
    spec: RankSpec = get_object(store, SPEC_KEY)
    if spec.parallel.world_size != world_size:
        raise RuntimeError(f"WORLD_SIZE={world_size} but rank 0 runs {spec.parallel.world_size} ranks")
    if spec.device_type == "cpu":
        torch.set_num_threads(spec.parallel.cpu_threads())
    try:
        model = build_rank_model(spec, rank, local_rank)
        tokenizer = load_tokenizer(spec)
    except BaseException as e:  # report to rank 0, which raises it as a start-up WorkerError
        store.set(ready_key(rank), f"error: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise
    store.set(ready_key(rank), "ok")
    ctx = init_process_groups(store, rank, world_size, local_rank, device_type=spec.device_type,
                              timeout_s=spec.parallel.timeout_s, tp=spec.parallel.tp)
    engine = make_engine(model, tokenizer, spec, ctx)
    while True:
        msg = broadcast_object(ctx)
        if msg[0] == STOP:
            break
        if msg[0] == STEP:
            step_group(engine, ctx, msg[1])
        elif msg[0] == INFO:
            dist.gather_object(rank_info(model, rank), None, dst=0, group=ctx.cpu_group)
    destroy_process_groups()
    return 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ascend_v4.runtime.worker",
                                 description="ascend-v4 expert-parallel worker (one rank); reads RANK, WORLD_SIZE, "
                                             "LOCAL_RANK, MASTER_ADDR, MASTER_PORT")
    ap.add_argument("--watch-parent", type=int, default=None, help="exit when this parent pid is gone")
    ap.add_argument("--init-timeout", type=float, default=900.0, help="seconds to wait for rank 0 at start-up")
    a = ap.parse_args(argv)
    if a.watch_parent is not None:
        _watch_parent(a.watch_parent)
    env = os.environ
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    except (KeyError, ValueError) as e:
        sys.exit(f"ascend-v4 worker: set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK): {e}")
    if rank < 1:
        sys.exit("ascend-v4 worker: RANK must be >= 1 (rank 0 is the engine process)")
    try:
        code = run_worker(rank, world, local_rank, addr, port, a.init_timeout)
    except BaseException as e:  # noqa: BLE001 - a worker never outlives a failed run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, RuntimeError) and any(s in first for s in _PEER_ERRORS):  # a consequence, not a cause
            print(f"ascend-v4 worker rank {rank}: collective failed ({first}); exiting", file=sys.stderr, flush=True)
        else:  # one line that names the error; the traceback only when asked for (ASCEND_V4_DEBUG=1)
            print(f"ascend-v4 worker rank {rank} failed: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
            if _debug():
                print(traceback.format_exc(), file=sys.stderr, flush=True)
        os._exit(1)  # skip destructors that could block on a broken process group
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
