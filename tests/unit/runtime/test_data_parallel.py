"""Attention data parallelism (runtime/dist_engine.py, runtime/layout.py) on CPU with real Gloo process groups
(worker processes, no mocks), tiny preset:

* DP 2 and TP 2 x DP 2 (4 processes) give the greedy tokens of one process over a mixed batch with chunked
  prefill, prefix-cache hits and MTP speculation, quant simulation off and on; log-probabilities within 1e-4
  with the simulation off, 0.05 with it on. A DP group batches other requests together than one process does,
  and with the FP8 / FP4 round-trips a last-bit difference can move a value across a rounding boundary: one
  process alone shows the same 0.0167 on request 4 when it shares its prefill batch with request 2 instead of
  running alone (measured), so this is batch composition under the simulation, not DP;
* requests are routed to the least loaded group (or, with prefix caching, to the group that took the same first
  blocks, within a slack), and a group with nothing to do steps an empty batch through the expert exchange: one
  request on DP 2 decodes to the end while the other group idles (no hang);
* a killed or stopped rank of a DP group (and of a TP group inside DP) fails the step within the timeout,
  naming the rank; no process is left behind;
* two "nodes" on loopback: the same `generate --nnodes 2` command run twice (node ranks 0 and 1), or node 1 as
  torchrun-style worker processes, give the same tokens as one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ascend_v4.model.layers import ModelOptions
from ascend_v4.model.load import load_model
from ascend_v4.runtime.config import EngineConfig
from ascend_v4.runtime.dist_engine import DistEngine, WorkerError
from ascend_v4.runtime.distributed import ParallelConfig
from ascend_v4.runtime.engine import Engine
from ascend_v4.runtime.sampling import SamplingParams

from .test_expert_parallel import _children, _gone, ckpt, tok  # noqa: F401 - fixtures
from .test_tensor_parallel import _batch, _results

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: ranks share the cores

CFG = EngineConfig(max_num_batched_tokens=48, max_num_seqs=4, enable_prefix_caching=True, speculative_mtp=True)
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)


def test_router_keeps_a_shared_prefix_in_one_group_within_the_slack():
    from ascend_v4.runtime.dp_router import DPRouter

    B = 128
    system = list(range(3, 3 + 2 * B))  # two full blocks shared by every prompt
    ask = lambda k: system + [1000 + k] * 5  # noqa: E731
    r = DPRouter(2, B, prefix_aware=True, slack=2)
    assert r.route(ask(0), [0, 0]) == 0  # nothing known: least loaded
    assert r.route(ask(1), [1, 0]) == 0  # group 0 took the prefix; 1 busier is within the slack
    assert r.route(ask(2), [2, 0]) == 0
    assert r.route(ask(3), [3, 0]) == 1  # 3 busier: load wins, and group 1 now owns the prefix
    assert r.route(ask(4), [1, 2]) == 1 and r.prefix_routed == 3  # group 1 owns it now, 1 busier
    assert r.route([0, 5, 6], [3, 1]) == 1 and r.route([0, 5, 6], [0, 1]) == 0  # no full block: least loaded
    plain = DPRouter(2, B, prefix_aware=False, slack=2)
    assert [plain.route(ask(k), load) for k, load in enumerate(([0, 0], [1, 0], [1, 1]))] == [0, 1, 0]
    small = DPRouter(2, B, prefix_aware=True, slack=8, capacity=2)
    small.route(ask(0), [0, 0])
    small.route(list(range(500, 800)), [1, 0])  # two other blocks push the first prompt's out
    assert len(small.owner) == 2 and small.route(ask(1), [1, 1]) == 0


def _opts(quant_sim: bool) -> ModelOptions:
    return ModelOptions(dtype=torch.float32, quant_sim=quant_sim, dequantize_weights=True)


@pytest.mark.parametrize("world,tp,quant_sim", [(2, 1, False), (2, 1, True), (4, 2, False)])
def test_dp_greedy_tokens_equal_one_process(ckpt, tok, world, tp, quant_sim):
    prompts = _batch()
    ref = _results(Engine(load_model(ckpt, _opts(quant_sim)), tok, CFG).generate(prompts, [GREEDY] * len(prompts)))
    before = _children()
    eng = DistEngine(ckpt, _opts(quant_sim), CFG, ParallelConfig(world_size=world, tp=tp, timeout_s=60), tokenizer=tok)
    try:
        pids = eng.worker_pids
        outs = eng.generate(prompts, [GREEDY] * len(prompts))
        got = _results(outs)
        assert [t for t, _ in got] == [t for t, _ in ref]
        assert outs[4][-1].cached_tokens >= 128  # routed to the group holding request 2's first block
        assert max(abs(a - b) for (_, la), (_, lb) in zip(got, ref) for a, b in zip(la, lb)) < (
            0.05 if quant_sim else 1e-4)
        st = eng.stats()
        assert (st["tp"], st["dp"]) == (tp, world // tp) and st["unfinished_per_dp_group"] == [0] * (world // tp)
        # the server's counters cover every DP group (each leader's stats ride on the step's gather)
        groups = st["per_dp_group"]
        assert len(groups) == world // tp and all(g["finished"] > 0 for g in groups)
        assert st["finished"] == len(prompts) == sum(g["finished"] for g in groups)
        assert st["generation_tokens"] == sum(len(t) for t, _ in got)
        assert st["blocks_total"] == sum(g["blocks_total"] for g in groups)
        assert st["cache_usage"] == st["blocks_used"] / st["blocks_total"]
        assert st["spec_proposed"] > 0  # group 0's MTP drafts were verified
        info = eng.rank_info()
        assert [i["tp_rank"] for i in info] == [r % tp for r in range(world)]
    finally:
        eng.shutdown()
    assert _gone(pids) and _children() <= before


def test_an_idle_group_steps_empty_batches_and_routing_balances(ckpt, tok):
    opts = _opts(False)
    model = load_model(ckpt, opts)
    long_p, short_p = _batch()[2], _batch()[3]
    one = _results(Engine(model, tok, CFG).generate([long_p], [SamplingParams(max_tokens=12, temperature=0,
                                                                               ignore_eos=True, logprobs=0)]))
    eng = DistEngine(ckpt, opts, CFG, ParallelConfig(world_size=2, tp=1, timeout_s=20), tokenizer=tok)
    try:
        eng.add_request("a", long_p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0))
        assert eng.stats()["unfinished_per_dp_group"] == [1, 0]
        outs, steps = [], 0
        while eng.has_unfinished():  # group 1 has nothing: every step it joins the exchange with 0 tokens
            outs += eng.step()
            steps += 1
        assert _results([outs]) == one and steps >= 12
        # two at once: one per group; then a third goes to the group that is free again
        eng.add_request("b", long_p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        eng.add_request("c", short_p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        assert eng.stats()["unfinished_per_dp_group"] == [1, 1]
        while eng.stats()["unfinished_per_dp_group"][1]:  # "c" (2 tokens) ends first; "b" keeps group 0 busy
            eng.step()
        eng.add_request("d", short_p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        assert eng.stats()["unfinished_per_dp_group"] == [1, 1]
        ab = eng.abort("d")  # group 1's, not stepped yet: its usage comes from rank 0's bookkeeping
        assert ab.finish_reason == "abort" and eng.stats()["unfinished_per_dp_group"] == [1, 0]
        assert (ab.prompt_tokens, ab.completion_tokens) == (len(short_p), 0)
        fresh = [0] + list(range(3000, 3040))  # no shared prefix: the least loaded group (1) takes it
        eng.add_request("e", fresh, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        assert eng.stats()["unfinished_per_dp_group"] == [1, 1]
        for _ in range(3):
            eng.step()
        ab = eng.abort("e")  # mid-generation in the other group: the tokens it already produced are counted
        assert ab.prompt_tokens == len(fresh) and ab.completion_tokens >= 2, ab
        while eng.has_unfinished():
            eng.step()
    finally:
        eng.shutdown()


@pytest.mark.parametrize("world,tp,victim,how", [(2, 1, 1, "kill"), (2, 1, 1, "stop"), (4, 2, 3, "kill")])
def test_dead_or_hung_rank_of_a_dp_group_fails_the_step(ckpt, tok, world, tp, victim, how):
    timeout = 6.0
    eng = DistEngine(ckpt, _opts(False), CFG, ParallelConfig(world_size=world, tp=tp, timeout_s=timeout),
                     tokenizer=tok)
    pids = eng.worker_pids
    try:
        for i, p in enumerate(_batch()[:3]):
            eng.add_request(f"r{i}", p, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        eng.step()
        os.kill(pids[victim - 1], signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=f"rank {victim}") as e:
            for _ in range(100):
                eng.step()
        assert time.monotonic() - t0 < timeout + 5
        assert ("SIGKILL" in str(e.value)) if how == "kill" else ("did not respond" in str(e.value))
    finally:
        eng.shutdown()
    assert _gone(pids)


@pytest.mark.parametrize("how", ["cli", "worker"])
def test_two_nodes_on_loopback_equal_one_process(ckpt, tmp_path, how):
    """Node 0: `ascend-v4 generate --npus 4 --tp 2 --nnodes 2 --node-rank 0`; node 1: the same command with
    --node-rank 1 (`cli`), or one `python -m ascend_v4.runtime.worker` per rank with torchrun-style variables
    (`worker`). Both "nodes" are separate process trees on this machine, meeting over loopback TCP."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--model", "tiny", "--prompt-ids", "0,1000,2000,3000", "--max-tokens", "4", "--json"]
    one = subprocess.run(["ascend-v4", "generate", *args], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = [*args, "--npus", "4", "--tp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port",
             str(port)]
    head = subprocess.Popen(["ascend-v4", "generate", *multi, "--node-rank", "0"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    if how == "cli":
        node1 = [subprocess.Popen(["ascend-v4", "generate", *multi, "--node-rank", "1"], env=env,
                                  stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    else:
        wenv = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "4",
                "LOCAL_WORLD_SIZE": "2"}
        node1 = [subprocess.Popen([sys.executable, "-m", "ascend_v4.runtime.worker"], cwd=tmp_path,
                                  env={**wenv, "RANK": str(r), "LOCAL_RANK": str(r - 2)}, stdin=subprocess.DEVNULL)
                 for r in (2, 3)]
    try:
        out, err = head.communicate(timeout=300)
        assert head.returncode == 0, err
        got = json.loads(out)
        assert got["token_ids"] == json.loads(one.stdout)["token_ids"]
        assert got["layout"]["tp"] == 2 and got["layout"]["dp"] == 2 and len(got["ranks"]) == 4
        assert [r["experts"] for r in got["ranks"]] == [[0, 1], [2, 3], [4, 5], [6, 7]]
        for p in node1:
            assert p.wait(60) == 0
        if how == "cli":
            assert "[node 1] ranks 2..3 of 4" in node1[0].stderr.read()
    finally:
        for p in [head, *node1]:
            if p.poll() is None:
                p.kill()
