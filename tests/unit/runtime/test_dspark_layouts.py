"""DSpark speculative decoding under the parallel layouts (issue 15 with issue 11's runtime): TP 2, DP 2 and
TP 2 x DP 2 on real worker processes and Gloo groups, `tiny-dspark`. Every rank runs the draft forward each step (an idle DP group an empty
one, so the draft stages' expert exchange matches); a TP group verifies the drafts of its leader. Greedy tokens
equal one process without drafts (quant simulation off: with it on, this random model's near-ties can break on
any fp32 reordering; tests/unit/runtime/test_tensor_parallel.py measures that)."""

from __future__ import annotations

import pytest
import torch

from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
from ascend_v4.model.layers import ModelOptions
from ascend_v4.model.load import load_model
from ascend_v4.runtime.config import EngineConfig
from ascend_v4.runtime.dist_engine import DistEngine
from ascend_v4.runtime.distributed import ParallelConfig
from ascend_v4.runtime.engine import Engine
from ascend_v4.runtime.sampling import SamplingParams

from .test_expert_parallel import _children, _gone, tok  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
OPTS = ModelOptions(dtype=torch.float32, quant_sim=False, dequantize_weights=True)


def _prompts():
    g = torch.Generator().manual_seed(6)
    base = torch.randint(3, 129280, (140,), generator=g).tolist()
    return [[0] + base[:n] for n in (1, 36, 140)] + [[0] + base[:130] + [5, 6, 7]]


@pytest.mark.parametrize("world,tp", [(2, 2), (2, 1), (4, 2)], ids=["tp2", "dp2", "tp2xdp2"])
def test_dspark_in_a_parallel_layout_equals_one_process(tok, world, tp):
    ckpt = ensure_dummy_checkpoint("tiny-dspark")
    cfg = dict(max_num_batched_tokens=48, max_num_seqs=4, enable_prefix_caching=True)
    prompts = _prompts()
    one = Engine(load_model(ckpt, OPTS), tok, EngineConfig(**cfg))
    ref = [[t for o in os for t in o.new_token_ids] for os in one.generate(prompts, [GREEDY] * len(prompts))]
    before = _children()
    eng = DistEngine(ckpt, OPTS, EngineConfig(speculative="dspark", **cfg),
                     ParallelConfig(world_size=world, tp=tp, timeout_s=60), tokenizer=tok)
    try:
        pids = eng.worker_pids
        outs = eng.generate(prompts, [GREEDY] * len(prompts))
        assert [[t for o in os for t in o.new_token_ids] for os in outs] == ref
        st = eng.stats()
        assert st["spec_proposed"] > 0 and len(st["spec_acceptance_per_position"]) == 5
        assert st["blocks_used"] == 0
    finally:
        eng.shutdown()
    assert _gone(pids) and _children() <= before
