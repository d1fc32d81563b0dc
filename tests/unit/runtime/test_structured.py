"""Constrained decoding on the tiny dummy (random weights: unconstrained it emits garbage, so output that
parses and validates proves the grammar mask works): JSON schemas, DSML tool calls, batching with different
grammars, n > 1, MTP drafts checked against the grammar, matcher rollback and the `</think>` trigger."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from ascend_v4.runtime.config import EngineConfig  # noqa: E402
from ascend_v4.runtime import engine as engine_mod, speculative  # noqa: E402
from ascend_v4.runtime.engine import Engine, RequestError  # noqa: E402
from ascend_v4.runtime.sampling import SamplingParams  # noqa: E402
from ascend_v4.runtime.structured import (  # noqa: E402
    GrammarSpec,
    apply_mask,
    compute_masks,
    unpack_mask,
)

from ascend_v4.chat.parsing import parse_completion  # noqa: E402
from ascend_v4.server.render import Thinking, tool_choice_prefix  # noqa: E402
from ascend_v4.server.structured import json_grammar, tool_grammar  # noqa: E402

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["color", "n"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                     "unit": {"type": "string", "enum": ["c", "f"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"]}}}
PING = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}


def _text(tok, outs) -> tuple[str, str]:
    return "".join(o.new_text for o in outs), outs[-1].finish_reason


def _prompt(tok, text="Answer in JSON."):
    return [0] + tok.encode(text)


def test_json_schema_outputs_validate_batched_with_different_schemas(model, tok):
    e = Engine(model, tok, EngineConfig())
    specs = [PERSON, COLOR, PERSON, COLOR]
    params = [SamplingParams(max_tokens=40, temperature=0 if i < 2 else 1.0, seed=i,
                             grammar=GrammarSpec(json_grammar(s))) for i, s in enumerate(specs)]
    params.append(SamplingParams(max_tokens=8, temperature=0))  # an unconstrained neighbour
    outs = e.generate([_prompt(tok)] * 5, params)
    for s, o in zip(specs, outs[:4]):
        text, reason = _text(tok, o)
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), s)
    assert e.mask_seconds > 0


def test_json_object_outputs_are_objects(model, tok):
    e = Engine(model, tok, EngineConfig())
    g = GrammarSpec(json_grammar({"type": "object"}))
    outs = e.generate([_prompt(tok, "hello")] * 4,
                      [SamplingParams(max_tokens=24, temperature=1.0, seed=s, grammar=g) for s in range(4)])
    done = 0
    for o in outs:
        text, reason = _text(tok, o)
        assert text.startswith("{")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
            done += 1
    assert done >= 1


def test_forced_tool_call_parses_and_validates(model, tok):
    """tool_choice required (named: tests/unit/server/test_structured_outputs.py); greedy and sampled."""
    choice = "required"
    tools = [WEATHER, PING]
    prefix = tool_choice_prefix(choice, ["get_weather", "ping"], Thinking(False, None))
    g = GrammarSpec(tool_grammar(tools, choice, prefix, parallel=False))
    e = Engine(model, tok, EngineConfig())
    outs = e.generate([_prompt(tok, "weather?") + tok.encode(prefix)] * 2,
                      [SamplingParams(max_tokens=80, temperature=t, seed=1, grammar=g) for t in (0, 1.0)])
    for o in outs:
        text, reason = _text(tok, o)
        assert reason == "stop", text
        msg = parse_completion(prefix + text, thinking=False)
        assert len(msg.tool_calls) == 1, prefix + text
        call = msg.tool_calls[0]
        fn = next(t["function"] for t in tools if t["function"]["name"] == call.name)
        assert isinstance(call.arguments, dict)
        jsonschema.validate(call.arguments, fn["parameters"])


def test_mtp_drafts_respect_the_grammar(model, tok, monkeypatch):
    """Random MTP drafts are nearly always outside the grammar: they are dropped before verification. To
    also exercise verification with masks after a draft, drafts are replaced by the grammar's forced next
    token when there is one (e.g. the key after `{"`)."""
    assert model.mtp, "the tiny preset has an MTP block"
    e = Engine(model, tok, EngineConfig(speculative_mtp=True))
    checked = []

    def mtp(eng, x, kept):
        speculative.mtp_propose(eng, x, kept)
        for c, _ in kept:
            sm = c.seq.matcher
            if sm is not None and not c.seq.finished:
                checked.append(c.seq.draft)
                ff = sm.m.compute_ff_tokens()
                if ff:
                    c.seq.draft = [ff[0]]
    monkeypatch.setattr(engine_mod, "mtp_propose", mtp)
    g = GrammarSpec(json_grammar(COLOR))
    outs = e.generate([_prompt(tok)] * 2, [SamplingParams(max_tokens=30, temperature=0, grammar=g),
                                           SamplingParams(max_tokens=30, temperature=1.0, seed=5, grammar=g)])
    for o in outs:
        text, reason = _text(tok, o)
        assert reason == "stop"
        jsonschema.validate(json.loads(text), COLOR)
    assert checked and e.stats()["spec_accepted"] > 0
    # greedy output is the same with and without speculation
    plain = Engine(model, tok, EngineConfig()).generate([_prompt(tok)], [SamplingParams(max_tokens=30, temperature=0,
                                                                                          grammar=g)])
    assert _text(tok, plain[0])[0] == _text(tok, outs[0])[0]


def test_bad_grammar_is_a_request_error(model, tok):
    e = Engine(model, tok, EngineConfig())
    with pytest.raises(RequestError, match="grammar"):
        e.add_request("x", _prompt(tok), SamplingParams(grammar=GrammarSpec("start: nosuchrule\n")))


def test_matcher_trigger_rollback_and_draft_masks(model, tok):
    e = Engine(model, tok, EngineConfig())
    comp = e.grammar_compiler()
    think_end = tok.encode("</think>")[0]
    sm = comp.matcher(GrammarSpec(json_grammar(COLOR), start_after=think_end))
    free = tok.encode("some reasoning")
    assert not sm.constraining and all(sm.allows(t) for t in free)
    for t in free + [think_end]:
        sm.accept(t)
    assert sm.constraining
    brace = tok.encode('{"')
    assert sm.allows(brace[0]) and not sm.allows(tok.encode("hello")[0])
    # masks: row 0 = next token, then one row after each draft token (a 2-token chain: `{"` then its next)
    assert sm.valid_prefix(brace + tok.encode("hello")) >= len(brace)
    chain = brace[:2] if len(brace) > 1 else brace + [tok.encode('"')[0]]
    n = sm.valid_prefix(chain)
    bits = unpack_mask(compute_masks(comp, [(sm, chain[:n])]), model.args.vocab_size, torch.device("cpu"))
    assert bits.shape[0] == 1 + n and bits[0, brace[0]] and not bits[0, free[0]]
    assert not bits[1, brace[0]] and bits[1].sum() >= 1 and all(bits[r].sum() >= 1 for r in range(1, 1 + n))
    logits = torch.zeros(model.args.vocab_size)
    assert int(torch.isfinite(apply_mask(logits, bits[0])).sum()) == int(bits[0].sum())
    sm.accept(brace[0])
    sm.rollback(2)  # the brace and the trigger: free again
    assert not sm.constraining and sm.history == [0] * len(free)
    sm.accept(think_end)
    assert sm.allows(brace[0])
