"""Python API smoke and behaviour tests on the tiny dummy checkpoint."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ascend_v4 import LLM, SamplingParams
from ascend_v4.runtime.generate import generate_ids


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny")


def test_defaults_on_cpu(llm):
    assert llm.options.dtype == torch.float32  # auto dtype on CPU
    assert llm.options.quant_sim and llm.options.dequantize_weights
    assert llm.tokenizer.vocab_size == llm.args.vocab_size == 129280


def test_generate_greedy_is_deterministic_and_batch_independent(llm):
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    a = llm.generate(["The capital of France is", "def fib(n):"], sp)
    b = llm.generate(["def fib(n):"], sp)
    assert len(a) == 2 and all(len(r.outputs[0].token_ids) == 6 for r in a)
    assert a[1].outputs[0].token_ids == b[0].outputs[0].token_ids
    assert a[0].prompt_token_ids[0] == 0  # BOS prepended for text prompts
    assert a[0].outputs[0].finish_reason == "length"
    assert a[0].outputs[0].text == llm.tokenizer.decode(a[0].outputs[0].token_ids)


def test_seeded_sampling_reproducible_and_seed_sensitive(llm):
    def run(seed):
        sp = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True)
        return llm.generate([[0, 100, 200, 300]], sp)[0].outputs[0].token_ids
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_prompt_ids_used_verbatim(llm):
    r = llm.generate([[0, 5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))[0]
    assert r.prompt_token_ids == [0, 5, 6, 7] and r.prompt is None


def test_stop_on_eos_and_stop_tokens(llm):
    ids = [0, 11, 12, 13]
    first = llm.generate([ids], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].outputs[0]
    # a stop token ends generation and is not part of the text
    out = llm.generate([ids], SamplingParams(max_tokens=4, temperature=0,
                                             stop_token_ids=[first.token_ids[1]]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == first.token_ids[:2]
    # EOS: make the model's EOS id the first greedy token
    model = llm.model
    saved = model.args
    try:
        model.args = dataclasses.replace(saved, eos_token_id=first.token_ids[0])
        c = generate_ids(model, [ids], [SamplingParams(max_tokens=4, temperature=0)])[0]
        assert c.finish_reason == "stop" and c.token_ids == first.token_ids[:1]
    finally:
        model.args = saved


def test_chat_thinking_modes_render_official_prompt(llm):
    msgs = [{"role": "user", "content": "hi"}]
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    tok = llm.tokenizer
    none = llm.chat(msgs, sp, thinking="none")[0]
    high = llm.chat(msgs, sp, thinking="high")[0]
    mx = llm.chat(msgs, sp, thinking="max")[0]
    assert none.prompt_token_ids[-2:] == [tok.token_to_id("<｜Assistant｜>"), tok.token_to_id("</think>")]
    assert high.prompt_token_ids[-2:] == [tok.token_to_id("<｜Assistant｜>"), tok.token_to_id("<think>")]
    assert len(mx.prompt_token_ids) > len(high.prompt_token_ids)  # max-effort preamble after BOS
    assert none.prompt_token_ids[0] == 0
    # thinking mode: with no </think> in the output the whole completion is reasoning
    out = high.outputs[0]
    if tok.token_to_id("</think>") not in out.token_ids:
        assert out.reasoning_content == tok.decode(out.token_ids) and out.text == ""


def test_bad_inputs_name_the_problem(llm):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="outside"):
        llm.generate([[0, 10**7]])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="dtype"):
        LLM("tiny", dtype="fp8")
