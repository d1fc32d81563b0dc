"""Structured outputs over HTTP with the real engine on the tiny dummy (random weights: only the grammar mask
makes its output valid JSON / a valid DSML tool call): response_format json_object / json_schema,
tool_choice required / named, streaming, n=2, concurrent requests with different schemas, the OpenAI SDK's
`chat.completions.parse` helper with a pydantic model, and the grammar builder against the encoder."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Literal

import pytest
import torch

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from ascend_v4.runtime.async_engine import AsyncEngine  # noqa: E402
from ascend_v4.runtime.config import EngineConfig  # noqa: E402
from ascend_v4.runtime.engine import Engine  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from ascend_v4.chat.encoding import render_tool_calls  # noqa: E402
from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint  # noqa: E402
from ascend_v4.model.layers import ModelOptions  # noqa: E402
from ascend_v4.model.load import load_model  # noqa: E402
from ascend_v4.server.app import create_app  # noqa: E402
from ascend_v4.server.errors import APIError  # noqa: E402
from ascend_v4.server.render import Thinking, tool_choice_prefix  # noqa: E402
from ascend_v4.server.serving import ServerConfig  # noqa: E402
from ascend_v4.server.structured import chat_grammar, tool_grammar  # noqa: E402
from ascend_v4.tokenizer import Tokenizer  # noqa: E402

MODEL = "ascend-v4"
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["color", "n"], "additionalProperties": False}
SIZE = {"type": "object", "properties": {"size": {"enum": ["s", "m", "l"]}, "ok": {"type": "boolean"}},
        "required": ["size", "ok"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                     "unit": {"type": "string", "enum": ["c", "f"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"]}}}
PING = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
CHAT = {"thinking": {"type": "disabled"}}
MSGS = [{"role": "user", "content": "Answer in JSON."}]


def fmt(schema, name="out"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def url(live):
    model = load_model(ensure_dummy_checkpoint("tiny"),
                       ModelOptions(dtype=torch.float32, quant_sim=False, dequantize_weights=True))
    eng = AsyncEngine(Engine(model, Tokenizer.default(), EngineConfig(max_num_seqs=8)))
    with live(create_app(eng, ServerConfig(model_names=[MODEL]))) as u:
        yield u


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)


def test_json_schema_n2_and_json_object(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, response_format=fmt(COLOR), n=2, max_tokens=30,
                                       seed=3, extra_body=CHAT)
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), COLOR)
    r = client.chat.completions.create(model=MODEL, messages=MSGS, response_format={"type": "json_object"},
                                       max_tokens=40, temperature=0, extra_body=CHAT)
    assert r.choices[0].message.content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_streaming_and_concurrent_schemas(url):
    async def one(ac, schema, stream):
        if not stream:
            r = await ac.chat.completions.create(model=MODEL, messages=MSGS, response_format=fmt(schema),
                                                 max_tokens=30, temperature=1.0, seed=7, extra_body=CHAT)
            return r.choices[0].message.content, r.choices[0].finish_reason
        text, reason = "", None
        async for ch in await ac.chat.completions.create(model=MODEL, messages=MSGS, response_format=fmt(schema),
                                                         max_tokens=30, temperature=0, stream=True,
                                                         extra_body=CHAT):
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                reason = ch.choices[0].finish_reason or reason
        return text, reason

    async def main():
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        return await asyncio.gather(one(ac, COLOR, True), one(ac, SIZE, False), one(ac, SIZE, True))
    for (text, reason), schema in zip(asyncio.run(main()), (COLOR, SIZE, SIZE)):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_validates(client, choice):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=[WEATHER, PING], tool_choice=choice, parallel_tool_calls=False,
                                       max_tokens=120, temperature=0, extra_body=CHAT)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    (call,) = c.message.tool_calls
    fn = {"get_weather": WEATHER, "ping": PING}[call.function.name]["function"]
    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])


def test_anthropic_tool_choice_any(url):
    anthropic = pytest.importorskip("anthropic")
    c = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=300)
    w = WEATHER["function"]
    r = c.messages.create(model=MODEL, max_tokens=120, thinking={"type": "disabled"},
                          messages=[{"role": "user", "content": "Weather in Paris?"}],
                          tools=[{"name": w["name"], "input_schema": w["parameters"]}],
                          tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert r.stop_reason == "tool_use", r
    (block,) = [b for b in r.content if b.type == "tool_use"]
    jsonschema.validate(block.input, w["parameters"])


class Pick(BaseModel):
    color: Literal["red", "green", "blue"]
    n: int = Field(ge=0, le=9)


def test_openai_sdk_parse_helper(client):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model=MODEL, messages=MSGS, response_format=Pick, max_tokens=30, temperature=0, extra_body=CHAT)
    got = r.choices[0].message.parsed
    assert isinstance(got, Pick), r.choices[0].message.content


def test_bad_schema_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, extra_body=CHAT,
                                       response_format=fmt({"type": "no-such-type"}))


# -- grammar builder (no model) ----------------------------------------------------------------------------
@functools.cache
def _ll_tokenizer():
    import llguidance
    tok = Tokenizer.default()
    return llguidance.LLTokenizer(tok._tk.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_id)


def _accepts(grammar: str, text: str) -> bool:
    import llguidance
    tok = Tokenizer.default()
    m = llguidance.LLMatcher(_ll_tokenizer(), grammar, log_level=0)
    ids = tok.encode(text) + [tok.eos_id]
    return m.try_consume_tokens(ids) >= len(ids) - 1 and not m.is_error()


@pytest.mark.parametrize("calls,choice", [
    ([("get_weather", {"city": "Paris", "unit": "c", "days": 3})], "required"),
    ([("get_weather", {"city": "a<b>", "unit": "f", "days": 1}), ("ping", {})], "required"),
    ([("get_weather", {"city": "Rome", "unit": "c", "days": 7})],
     {"type": "function", "function": {"name": "get_weather"}}),
    ([("ping", {})], {"type": "function", "function": {"name": "ping"}}),
])
def test_tool_grammar_accepts_what_the_encoder_renders(calls, choice):
    prefix = tool_choice_prefix(choice, ["get_weather", "ping"], Thinking(False, None))
    text = render_tool_calls(calls)
    assert _accepts(tool_grammar([WEATHER, PING], choice, prefix), text[len(prefix):])
    assert _accepts(tool_grammar([WEATHER, PING], choice, ""), text)  # no forced prefix (e.g. thinking mode)


def test_strict_auto_allows_content_or_a_strict_call():
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    g = tool_grammar([strict], "auto", "")
    assert _accepts(g, "Just text.")
    assert _accepts(g, "Sure." + render_tool_calls([("get_weather", {"city": "Oslo", "unit": "c", "days": 2})]))
    assert not _accepts(g, render_tool_calls([("get_weather", {"city": "Oslo", "unit": "k", "days": 2})]))
    assert tool_grammar([WEATHER], "auto", "") is None  # not strict: unconstrained


def test_auto_tools_with_response_format_allow_json_or_calls():
    spec = chat_grammar(response_format={"type": "json_schema", "json_schema": {"schema": COLOR}},
                        tools=[WEATHER, PING], tool_choice="auto", forced_prefix="", thinking=False, think_end_id=None)
    call = render_tool_calls([("get_weather", {"city": "anything, any length", "unit": "x", "days": "?"})])
    assert _accepts(spec.grammar, '{"color":"red","n":3}')
    assert _accepts(spec.grammar, call)  # get_weather is not strict: its arguments are free
    assert _accepts(spec.grammar, '{"color":"blue","n":0}' + call)
    assert not _accepts(spec.grammar, "plain text")


def test_chat_grammar_thinking_starts_after_think_end():
    spec = chat_grammar(response_format={"type": "json_object"}, tools=None, tool_choice=None, forced_prefix="",
                        thinking=True, think_end_id=128822)
    assert spec.start_after == 128822
    with pytest.raises(APIError):
        chat_grammar(response_format={"type": "json_schema", "json_schema": {"schema": 3}}, tools=None,
                     tool_choice=None, forced_prefix="", thinking=False, think_end_id=None)
