"""Expert parallelism through the MC2 path (runtime/expert_parallel_mc2.py -> ops/npu/mc2.py -> torch_npu) on CPU:
two real Gloo processes, with the torch_npu double (tests/unit/npu/double) standing in for
npu_moe_distribute_dispatch_v2 / combine_v2 and a Gloo group standing in for the HCCL communicator.

* one MoE call, per layer kind (hash-routed, score-routed) and per step shape (T not a multiple of the ranks,
  T < ranks, several dispatch calls per step): the MC2 result equals, bit for bit, the ops' documented formula
  sum_k w[t,k] * bf16(expert(x_t)) computed on one device, and matches the single-device routed output to bf16
  rounding (MC2 applies the weight after the expert, the model before w2);
* greedy decoding of the tiny model: tokens identical for one device, EP 2 over all-to-all and EP 2 over MC2;
  all-to-all logits bit-identical to one device, MC2 logits close;
* the choice MC2 / all-to-all and its one log line; argument errors naming the wrong field.

Every process runs one intra-op thread, so CPU reductions happen in the same order on every rank.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
from ascend_v4.model.args import ModelArgs
from ascend_v4.model.cache import StepBatch, new_seq_cache
from ascend_v4.model.layers import ModelOptions
from ascend_v4.model.load import load_model
from ascend_v4.model.moe import MoE
from ascend_v4.ops import OpInputError
from ascend_v4.ops.npu import mc2
from ascend_v4.runtime.distributed import ParallelContext, destroy_process_groups, init_process_groups
from ascend_v4.runtime.expert_parallel import AllToAllExperts, ExpertPlacement, attach_expert_parallel
from ascend_v4.runtime.expert_parallel_mc2 import Mc2Experts, choose_dispatcher, mc2_blocker

HERE = Path(__file__).parent
DOUBLE = HERE / "double"
OPTS = ModelOptions(dtype=torch.bfloat16, quant_sim=False, dequantize_weights=True)
WORLD = 2
MAX_BS = 5  # small, so that prefill steps need several dispatch calls per rank
COMM = "mc2-ep-test"
PROMPTS = [[0, 17, 4242, 99, 123, 5000, 77, 31, 8, 1024, 3, 3, 3, 64, 65, 66, 67, 68, 69, 70, 71], [0, 11, 12, 13]]
STEPS = 4
CALL_SHAPES = (7, 1, 23)  # tokens per MoE call: padded slice, T < ranks, several calls of MAX_BS
LAYERS = (0, 3)  # hash-routed, score-routed



@pytest.fixture(scope="module")
def ckpt():
    return ensure_dummy_checkpoint("tiny")


def greedy(model) -> tuple[list[list[int]], torch.Tensor]:
    """Prefill PROMPTS (one step), then greedy decode: (tokens per prompt, last-position logits fp32)."""
    caches = [new_seq_cache(model.args, model.opts.dtype) for _ in PROMPTS]
    feed, toks, logits = [list(p) for p in PROMPTS], [[] for _ in PROMPTS], []
    with torch.no_grad():
        for _ in range(STEPS):
            b = StepBatch.build(list(zip(caches, feed)))
            lg = model.logits(model(b))
            b.commit()
            last = torch.stack([lg[s.offset + s.n - 1] for s in b.seqs]).float()
            logits.append(last)
            feed = [[t] for t in last.argmax(-1).tolist()]
            for tk, (t,) in zip(toks, feed):
                tk.append(t)
    return toks, torch.stack(logits)


def call_inputs(model, layer: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded MoE input of `T` tokens for `layer` (same on every rank) and its routing: (x, tokens, ids, w)."""
    g = torch.Generator().manual_seed(1000 * layer + T)
    x = (torch.randn(T, model.args.dim, generator=g)).to(OPTS.dtype)
    tokens = torch.randint(3, model.args.vocab_size, (T,), generator=g)
    ids, w = model.layers[layer].ffn.gate(x, tokens)
    return x, tokens, ids, w


# -- one rank ------------------------------------------------------------------------------------------------------
def rank_main(rank: int, ckpt: str, store_path: str, torch_npu) -> dict:
    """Rank `rank` of WORLD: MoE calls and greedy decoding over MC2 (through the double) and over all-to-all.
    Leaves this process's process groups to the caller (`destroy_process_groups`)."""
    pl = ExpertPlacement(8, WORLD)
    model = load_model(ckpt, OPTS, experts=pl.experts_of(rank))
    # one batch shared by both ranks (DP 1): the token slices are taken over the TP group of all ranks
    ctx = init_process_groups(dist.FileStore(store_path, WORLD), rank, WORLD, rank, device_type="cpu", timeout_s=60,
                              tp=WORLD)
    torch_npu.register_mc2_group(COMM, dist.new_group(backend="gloo"))  # MC2's own group, as on HCCL
    # comm_alg as on an A2 (mc2.A2_LIMITS): the double accepts only the values the dispatch_v2 page lists
    mc2_ep = Mc2Experts(ctx, pl, torch_npu, mc2.Mc2Group(COMM, WORLD, rank, pl.num_experts,
                                                         mc2.A2_LIMITS.comm_alg), MAX_BS)
    a2a = AllToAllExperts(ctx, pl)
    out: dict = {"calls": {}}
    for layer in LAYERS:
        moe = model.layers[layer].ffn
        for T in CALL_SHAPES:
            x, _, ids, w = call_inputs(model, layer, T)
            out["calls"][layer, T] = (mc2_ep(x, ids, w, moe.run_local), a2a(x, ids, w, moe.run_local))
    attach_expert_parallel(model, ctx, pl, dispatcher=mc2_ep)
    out["mc2"] = greedy(model)
    attach_expert_parallel(model, ctx, pl)  # the default choice on a Gloo group: all-to-all
    assert isinstance(model.layers[0].ffn.expert_parallel, AllToAllExperts)
    out["a2a"] = greedy(model)
    out["op_calls"] = dict(torch_npu.CALLS)
    out["comm_algs"] = dict(torch_npu.COMM_ALGS_SEEN)
    return out


def child_main(rank: int, ckpt: str, store_path: str, out_path: str) -> None:
    """Entry point of a rank started as a subprocess: the double on sys.path, results saved to `out_path`."""
    torch.set_num_threads(1)
    sys.path.insert(0, str(DOUBLE))
    torch.save(rank_main(rank, ckpt, store_path, importlib.import_module("torch_npu")), out_path)
    destroy_process_groups()


def _start_child(rank: int, ckpt: str, tmp_path: Path) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_mc2_ep as t; "
            f"t.child_main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])")
    return subprocess.Popen([sys.executable, "-c", code, str(rank), ckpt, str(tmp_path / "store"),
                             str(tmp_path / f"rank{rank}.pt")], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _collect(proc: subprocess.Popen, rank: int, tmp_path: Path) -> dict:
    try:
        log = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)


def mc2_formula(moe: MoE, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What dispatch + experts + combine compute, on one device: x[t] = sum_k w[t,k] * bf16(expert(x_t)), summed
    in fp32 in slot order and rounded to bf16 (the double's documented choice). Each expert sees its tokens in
    token order, as MC2 delivers them."""
    T, k = ids.shape
    y = torch.zeros(T, k, x.shape[1])
    for e in range(moe.args.n_routed_experts):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel():
            y[tok, slot] = moe.experts[e](x[tok]).float()
    acc = torch.zeros(T, x.shape[1])
    for j in range(k):
        acc += w[:, j:j + 1] * y[:, j]
    return acc.to(x.dtype).float()


def test_mc2_ep_matches_one_device_and_all_to_all(ckpt, tmp_path, one_thread, tnpu):
    child = _start_child(1, str(ckpt), tmp_path)  # rank 1; rank 0 is this process
    try:
        full = load_model(ckpt, OPTS)  # the one-device results first, while rank 1 starts
        calls = {}
        for layer in LAYERS:
            moe = full.layers[layer].ffn
            for T in CALL_SHAPES:
                x, _, ids, w = call_inputs(full, layer, T)
                calls[layer, T] = (moe.run_local(x, ids, w), mc2_formula(moe, x, ids, w))
        ref_toks, ref_logits = greedy(full)
        rank0 = rank_main(0, str(ckpt), str(tmp_path / "store"), tnpu)
    except BaseException as e:
        child.kill()
        e.add_note(f"rank 1's output:\n{child.communicate()[0][-4000:]}")
        raise
    finally:
        destroy_process_groups()
    ranks = [rank0, _collect(child, 1, tmp_path)]

    for r in ranks:
        assert r["op_calls"]["npu_moe_distribute_dispatch_v2"] == r["op_calls"]["npu_moe_distribute_combine_v2"] > 0
        assert set(r["comm_algs"]) == {"fullmesh"}  # A2's algorithm reached both ops on every call
    for (layer, T), (one, formula) in calls.items():
        got_mc2, got_a2a = ranks[0]["calls"][layer, T]
        for r in ranks[1:]:  # the all-gather hands every rank the same [T, D]
            assert torch.equal(r["calls"][layer, T][0], got_mc2)
        assert got_mc2.shape == (T, full.args.dim) and got_mc2.dtype == torch.float32
        assert torch.equal(got_a2a, one), (layer, T)  # all-to-all: bit-identical to one device
        assert torch.equal(got_mc2, formula), (layer, T)  # MC2 routing: every row to its expert and back
        # weight after the expert and a bf16 result instead of weight before w2 and fp32: bf16 rounding apart
        torch.testing.assert_close(got_mc2, one, rtol=2 ** -7, atol=2 ** -7 * float(one.abs().max()))

    for r in ranks:
        assert r["a2a"][0] == ref_toks and torch.equal(r["a2a"][1], ref_logits)
        assert r["mc2"][0] == ref_toks
        torch.testing.assert_close(r["mc2"][1], ref_logits, rtol=0.05, atol=0.05)


# -- choice and argument checks (one process) ----------------------------------------------------------------------
def _ctx(backend: str, rank: int = 0) -> ParallelContext:
    return ParallelContext(rank, WORLD, rank, backend, "cpu", None, None, 10.0, tp_rank=rank, tp_size=WORLD)


@pytest.fixture(scope="module")
def tiny_moe(ckpt):
    with torch.device("meta"):
        return MoE(ModelArgs.from_dir(ckpt), OPTS, layer_id=3)


@pytest.mark.parametrize("soc,world,experts,dim,topk,dtype,why", [
    (-1, 16, 256, 4096, 6, torch.bfloat16, "SoC id -1 is not an Atlas A2/A3"),
    (250, 16, 256, 4096, 6, torch.bfloat16, None),  # Flash EP16 on A3
    (223, 16, 384, 7168, 6, torch.bfloat16, None),  # Pro EP16 on A2: 24 experts per rank
    (223, 8, 256, 4096, 6, torch.bfloat16, "EP size 8"),  # A2: EP 16 .. 256 (fullmesh) only
    (223, 128, 256, 4096, 6, torch.bfloat16, None),  # A2 fullmesh: EP 128 (dispatch_v2 page, op-plugin 01c0a119)
    (250, 512, 512, 4096, 6, torch.bfloat16, "EP size 512"),  # A3: 2..384 (combine_v2 page)
    (223, 16, 512, 4096, 6, torch.bfloat16, "32 experts per rank"),
    (250, 2, 8, 128, 2, torch.bfloat16, "hidden size 128"),  # the tiny preset
    (250, 16, 256, 4096, 6, torch.float32, "model dtype torch.float32"),
    (250, 16, 256, 4096, 17, torch.bfloat16, "top-k 17"),
])
def test_mc2_limits(tnpu, monkeypatch, soc, world, experts, dim, topk, dtype, why):
    monkeypatch.setattr(tnpu.npu, "get_soc_version", lambda: soc)
    lim, reason = mc2_blocker(tnpu, world, experts, dim, topk, dtype)
    if why is None:
        assert reason is None and lim is not None and lim.chip == ("A3" if soc == 250 else "A2")
    else:
        assert reason is not None and why in reason, reason


def test_choice_with_attention_dp_is_all_to_all(tnpu, caplog, tiny_moe):
    """Several DP groups hold different batches; Mc2Experts slices one shared batch: all-to-all, one line."""
    dp_ctx = ParallelContext(0, WORLD, 0, "hccl", "cpu", None, None, 10.0)  # tp_size 1: DP = WORLD groups
    with caplog.at_level(logging.INFO, logger="ascend_v4.runtime"):
        d = choose_dispatcher(dp_ctx, ExpertPlacement(8, WORLD), tiny_moe)
    assert isinstance(d, AllToAllExperts)
    assert [r.getMessage().count("attention data parallelism") for r in caplog.records] == [1]


def test_choice_falls_back_to_all_to_all_with_one_log_line(tnpu, monkeypatch, caplog, tiny_moe):
    pl = ExpertPlacement(8, WORLD)
    with caplog.at_level(logging.INFO, logger="ascend_v4.runtime"):
        assert isinstance(choose_dispatcher(_ctx("gloo"), pl, tiny_moe), AllToAllExperts)
        assert not caplog.records  # not an NPU: all-to-all is simply the path
        d = choose_dispatcher(_ctx("hccl"), pl, tiny_moe)  # the double's SoC id (-1) is no A2/A3
    assert isinstance(d, AllToAllExperts)
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert "MC2 dispatch/combine not used (SoC id -1" in caplog.records[0].getMessage()
    caplog.clear()
    monkeypatch.delattr(tnpu, "npu_moe_distribute_combine_v2")
    with caplog.at_level(logging.INFO, logger="ascend_v4.runtime"):
        choose_dispatcher(_ctx("hccl"), pl, tiny_moe)
    assert [r.getMessage().count("has no npu_moe_distribute_combine_v2") for r in caplog.records] == [1]


def test_argument_errors_name_the_field(tnpu):
    for kw, field in [({"comm_name": ""}, "comm_name"), ({"comm_name": "x" * 128}, "comm_name"),
                      ({"rank": 2}, "rank"), ({"world_size": 1, "rank": 0}, "world_size"),
                      ({"n_experts": 9}, "n_experts")]:
        with pytest.raises(ValueError, match=f"Mc2Group.{field}"):
            mc2.Mc2Group(**{"comm_name": COMM, "world_size": WORLD, "rank": 0, "n_experts": 8, **kw})
    g = mc2.Mc2Group(COMM, WORLD, 0, 8)
    x, ids = torch.zeros(3, 64, dtype=torch.bfloat16), torch.tensor([[0, 1], [2, 5], [7, 3]])
    with pytest.raises(OpInputError, match="x must be bfloat16 or float16, got torch.float32"):
        mc2.dispatch(tnpu, g, x.float(), ids)
    with pytest.raises(OpInputError, match=r"expert_ids must be \[BS=3, K\]"):
        mc2.dispatch(tnpu, g, x, ids[:2])
    with pytest.raises(OpInputError, match="K=17"):
        mc2.dispatch(tnpu, mc2.Mc2Group(COMM, WORLD, 0, 32), x, torch.arange(17).expand(3, 17))
    # the double, to the torch_npu pages: an unknown communicator, repeated ids, int64 ids
    with pytest.raises(RuntimeError, match="group_ep 'nowhere' names no communicator"):
        mc2.dispatch(tnpu, mc2.Mc2Group("nowhere", WORLD, 0, 8), x, ids)
    with pytest.raises(RuntimeError, match="distinct"):
        mc2.dispatch(tnpu, g, x, torch.tensor([[0, 1], [2, 2], [7, 3]]))
    with pytest.raises(RuntimeError, match="expert_ids must be a 2-D int32"):
        tnpu.npu_moe_distribute_dispatch_v2(x, ids, COMM, WORLD, 0, 8)
    assert tnpu.CALLS["npu_moe_distribute_dispatch_v2"] == 3  # the wrapper stopped the others before the op
    # a strategy whose group disagrees with its rank / placement
    pl = ExpertPlacement(8, WORLD)
    with pytest.raises(ValueError, match="Mc2Group.rank=0"):
        Mc2Experts(_ctx("hccl", rank=1), pl, tnpu, g, 8)
    with pytest.raises(ValueError, match="Mc2Group.n_experts=16"):
        Mc2Experts(_ctx("hccl"), pl, tnpu, mc2.Mc2Group(COMM, WORLD, 0, 16), 8)
    with pytest.raises(ValueError, match="max_bs"):
        Mc2Experts(_ctx("hccl"), pl, tnpu, g, 0)
