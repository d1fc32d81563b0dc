"""Expert parallelism on CPU with real Gloo process groups (worker processes, no mocks), tiny preset (8 experts).

* greedy outputs equal for EP 1 (plain Engine) vs 2 vs 4 ranks (attention DP over the ranks, the default
  layout), over a batch of mixed-length prompts with chunked prefill, log-probabilities within 1e-4 (a DP group's
  GEMMs run over its own sub-batch, so last bits may differ); with one TP group over 2 ranks (DP 1) every
  expert sees one device's matrix: its outputs are bit-identical;
* each rank holds exactly its E/N routed experts (ids and parameter count);
* a worker killed mid-generation (SIGKILL) or hung (SIGSTOP) makes the engine fail within the timeout, with a
  WorkerError naming the rank; AsyncEngine fails the in-flight requests and reports unhealthy;
* shutdown, interpreter exit and a killed parent leave no worker process behind.

Every rank runs one intra-op thread (the EP-1 reference too): on a shared 2-core machine more threads only
contend, and equal thread counts keep CPU reductions in the same order on every rank.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
from ascend_v4.model.layers import ModelOptions
from ascend_v4.model.load import load_model
from ascend_v4.runtime.async_engine import AsyncEngine, EngineDeadError
from ascend_v4.runtime.config import EngineConfig
from ascend_v4.runtime.dist_engine import DistEngine, WorkerError
from ascend_v4.runtime.distributed import ParallelConfig
from ascend_v4.runtime.engine import Engine
from ascend_v4.runtime.expert_parallel import ExpertPlacement
from ascend_v4.runtime.sampling import SamplingParams
from ascend_v4.tokenizer import Tokenizer

OPTS = ModelOptions(dtype=torch.float32, quant_sim=False, dequantize_weights=True)
# chunked prefill: 48-token budget, prompts up to 150 tokens; logprobs expose the logits bit for bit
CFG = EngineConfig(max_num_batched_tokens=48, max_num_seqs=4, enable_prefix_caching=False)
GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: ranks share the cores


@pytest.fixture(scope="module")
def ckpt():
    return ensure_dummy_checkpoint("tiny")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def full_model(ckpt):
    return load_model(ckpt, OPTS)


def prompts(*lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(3, 129280, (n - 1,), generator=g).tolist() for n in lens]


PROMPTS = prompts(2, 37, 150, 9, seed=3)


def results(outs):
    """Per request: (token ids, log-probabilities) over all its step outputs."""
    return [([t for o in os_ for t in o.new_token_ids], [s.logprob for o in os_ for s in o.logprobs])
            for os_ in outs]


@pytest.fixture(scope="module")
def ep1(full_model, tok):
    e = Engine(full_model, tok, CFG)
    return results(e.generate(PROMPTS, [GREEDY] * len(PROMPTS)))


def _gone(pids, within: float = 5.0) -> bool:
    t_end = time.monotonic() + within
    while time.monotonic() < t_end:
        live = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not live:
            return True
        time.sleep(0.1)
    return False


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def start(ckpt, tok, world, **kw) -> DistEngine:
    return DistEngine(ckpt, OPTS, CFG, ParallelConfig(world_size=world, **kw), tokenizer=tok)


# -- placement and loading (no processes) -------------------------------------------------------------------------
def test_placement_and_partial_model(ckpt, full_model):
    pl = ExpertPlacement(8, 4)
    assert [pl.experts_of(r) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert pl.owner(torch.tensor([0, 1, 2, 7])).tolist() == [0, 0, 1, 3]
    with pytest.raises(ValueError, match="evenly"):
        ExpertPlacement(8, 3)
    part = load_model(ckpt, OPTS, experts=pl.experts_of(2))
    names = {n for n, _ in part.named_parameters()}
    assert "layers.1.ffn.experts.4.w1.weight" in names and "mtp.0.ffn.experts.5.w2.weight" in names
    assert not any(".ffn.experts.3." in n or ".ffn.experts.6." in n for n in names)
    torch.testing.assert_close(part.layers[1].ffn.experts[4].w1.weight, full_model.layers[1].ffn.experts[4].w1.weight,
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no expert_parallel dispatcher"):
        from ascend_v4.model.cache import StepBatch, new_seq_cache
        part(StepBatch.build([(new_seq_cache(part.args, torch.float32), [0, 5, 6])]))


# -- equivalence --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
def test_ep_outputs_identical_and_experts_local(ckpt, tok, full_model, ep1, world):
    before = _children()
    eng = start(ckpt, tok, world, timeout_s=60)
    try:
        pids = eng.worker_pids
        assert len(pids) == world - 1 and set(pids) <= _children()
        got = results(eng.generate(PROMPTS, [GREEDY] * len(PROMPTS)))
        assert [t for t, _ in got] == [t for t, _ in ep1]
        assert max(abs(a - b) for (_, la), (_, lb) in zip(got, ep1) for a, b in zip(la, lb)) < 1e-4
        assert eng.stats()["steps"] > 4 and eng.stats()["blocks_used"] == 0

        # each rank holds exactly its E/N routed experts
        a = full_model.args
        per_expert = sum(p.numel() for p in full_model.layers[0].ffn.experts[0].parameters())
        n_moe = a.n_layers + a.n_mtp_layers
        full = sum(p.numel() for p in full_model.parameters())
        infos = eng.rank_info()
        pl = ExpertPlacement(a.n_routed_experts, world)
        assert [i["rank"] for i in infos] == list(range(world))
        assert [i["pid"] for i in infos[1:]] == pids
        for i in infos:
            assert i["experts"] == list(pl.experts_of(i["rank"]))
            assert i["params"] == full - (a.n_routed_experts - pl.per_rank) * per_expert * n_moe
    finally:
        eng.shutdown()
    assert _gone(pids) and _children() <= before


def test_llm_npus(ckpt):
    from ascend_v4 import LLM

    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    ref = LLM("tiny").generate(["Hello there", "A much longer prompt about experts"], sp)
    llm = LLM("tiny", npus=2)
    try:
        pids = llm.engine.worker_pids
        got = llm.generate(["Hello there", "A much longer prompt about experts"], sp)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
        assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in ref]
        assert list(llm.model.layers[0].ffn.expert_ids) == [0, 1, 2, 3]
    finally:
        llm.shutdown()
    assert _gone(pids)


# -- failures -----------------------------------------------------------------------------------------------------
def test_killed_worker_fails_requests_within_timeout(ckpt, tok):
    timeout = 10.0
    eng = start(ckpt, tok, 4, timeout_s=timeout)
    pids = eng.worker_pids
    ae = AsyncEngine(eng)
    long = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)

    async def run():
        t_kill = None
        errors, counts = [], []

        async def consume(p):
            n = 0
            try:
                async for o in ae.generate(p, long):
                    n += len(o.new_token_ids)
            except EngineDeadError as e:
                errors.append((time.monotonic(), str(e)))
            counts.append(n)

        tasks = [asyncio.create_task(consume(p)) for p in prompts(5, 30, 70)]
        while eng.stats()["generation_tokens"] < 6:  # mid-generation
            await asyncio.sleep(0.02)
        os.kill(pids[1], signal.SIGKILL)  # rank 2
        t_kill = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout + 20)
        return t_kill, errors, counts

    try:
        t_kill, errors, counts = asyncio.run(run())
        assert len(errors) == 3 and min(counts) >= 1
        assert max(t for t, _ in errors) - t_kill < timeout  # a killed peer is noticed at once, not by timeout
        msg = errors[0][1]
        assert "WorkerError" in msg and "rank 2" in msg and "SIGKILL" in msg
        h = ae.health()
        assert not h["healthy"] and "rank 2" in h["reason"]
        assert not eng.health()["healthy"]
        with pytest.raises(WorkerError, match="rank 2"):
            eng.step()
    finally:
        eng.shutdown()
        asyncio.run(ae.shutdown(drain=False))
    assert _gone(pids) and not set(pids) & _children()


def test_hung_worker_detected_by_timeout(ckpt, tok):
    timeout = 4.0
    eng = start(ckpt, tok, 2, timeout_s=timeout)
    pids = eng.worker_pids
    try:
        for i, p in enumerate(prompts(4, 20)):
            eng.add_request(f"r{i}", p, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        eng.step()
        os.kill(pids[0], signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="did not respond within timeout_s"):
            while True:
                eng.step()
        assert time.monotonic() - t0 < timeout + 3
    finally:
        eng.shutdown()  # SIGKILL also ends a stopped process
    assert _gone(pids) and not set(pids) & _children()


_SCRIPT = """
import os, sys, time, torch
from ascend_v4.model.layers import ModelOptions
from ascend_v4.runtime.config import EngineConfig
from ascend_v4.runtime.dist_engine import DistEngine
from ascend_v4.runtime.distributed import ParallelConfig
from ascend_v4.tokenizer import Tokenizer
eng = DistEngine(sys.argv[1], ModelOptions(dtype=torch.float32, quant_sim=False, dequantize_weights=True),
                 EngineConfig(), ParallelConfig(world_size=2, timeout_s=30), tokenizer=Tokenizer.default())
print("PIDS", *eng.worker_pids, flush=True)
if sys.argv[2] == "hang":
    time.sleep(600)
# "exit": leave without shutdown(): interpreter exit must stop the workers
"""


@pytest.mark.parametrize("how", ["exit", "parent-killed"])
def test_no_stray_workers_after_exit(ckpt, tmp_path, how):
    script = tmp_path / "rank0.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), "exit" if how == "exit" else "hang"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), line
        pids = [int(x) for x in line.split()[1:]]
        assert len(pids) == 1 and psutil.pid_exists(pids[0])
        if how == "parent-killed":
            proc.kill()
        assert proc.wait(60) in (0, -signal.SIGKILL)
        assert _gone(pids, within=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
