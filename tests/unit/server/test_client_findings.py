"""Issue 14, "serving for real clients": what the official SDKs ran into against `ascend-v4 serve --model tiny`.

* text the tokenizer cannot take (a lone UTF-16 surrogate, valid JSON) -> 400 naming the field, on every route;
* `n` (prompts x n) beyond the server's capacity -> 400 naming `n` and the capacity, not a 429 loop;
* tool parameter schemas meta-validated -> 400 naming the tool (OpenAI `parameters`, Anthropic `input_schema`);
* `skip_special_tokens` (default true) with the real tokenizer and a real engine whose output is forced:
  placeholders dropped, `</think>` / DSML still parsed;
* Anthropic: streamed (SDK accumulation) and non-streamed replies carry the same blocks;
* thinking mode ignores temperature / top_p / penalties (logged once per request) unless the server honours them.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx2 = pytest.importorskip("httpx2")

from ascend_v4.server.errors import APIError, error_payload, find_unencodable  # noqa: E402
from ascend_v4.server.launch import ServeOptions, build_app  # noqa: E402
from ascend_v4.server.render import check_tool_schema  # noqa: E402
from ascend_v4.server.serving import ServerConfig  # noqa: E402
from ascend_v4.tokenizer import UnencodableTextError  # noqa: E402

MODEL = "deepseek-v4-flash"
KEY = "sk-test"
USER = [{"role": "user", "content": "hi"}]
CALL = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">'
        'Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]
PH16, PH17 = "<｜place▁holder▁no▁16｜>", "<｜place▁holder▁no▁17｜>"


def oa(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def an(url):
    return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=60)


def raw_post(url, path, body):
    """POST a body as JSON text with `\\ud800`-style escapes: the Python SDKs cannot even encode a lone
    surrogate, other clients (JS, curl) send it as valid JSON."""
    return httpx2.post(url + path, content=json.dumps(body), trust_env=False, timeout=60,
                       headers={"content-type": "application/json", "Authorization": f"Bearer {KEY}"})


# ============================================================================ 1. untokenizable text -> 400
def test_tokenizer_raises_a_typed_error_at_the_bad_character(tokenizer):
    with pytest.raises(UnencodableTextError, match=r"U\+D800\) at character 1") as e:
        tokenizer.encode("a\ud800b")
    assert isinstance(e.value, ValueError) and e.value.offset == 1
    assert tokenizer.encode("a\U0001F600b")  # a proper surrogate *pair* (astral char) is fine


def test_error_bodies_stay_encodable():
    body = error_payload(404, "The model `m\ud800` does not exist", anthropic=False, param="x\ud800")
    assert body["error"]["message"] == "The model `m\\ud800` does not exist" and body["error"]["param"] == "x\\ud800"
    json.dumps(body, ensure_ascii=False).encode("utf-8")


def test_find_unencodable_paths():
    body = {"model": "m", "messages": [{"role": "user", "content": "ok"},
                                       {"role": "user", "content": [{"type": "text", "text": "x\udfff"}]}]}
    assert find_unencodable(body) == ("messages[1].content[0].text", "text", 1, "\udfff")
    assert find_unencodable({"tools": [{"p": {"a-b": {"\ud800k": 1}}}]}) == ('tools[0].p["a-b"]', "a key", 0, "\ud800")
    assert find_unencodable({"prompt": ["a", "b"]}) is None


SURROGATE_CASES = [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a\ud800b"}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "system", "content": "s"},
                                                           {"role": "user", "content": [{"type": "text",
                                                                                         "text": "\udc00"}]}]},
     "messages[1].content[0].text"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER,
                              "tools": [TOOLS[0], {"type": "function", "function": {"name": "f",
                                                                                    "description": "d\ud800"}}]},
     "tools[1].function.description"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"c\ud800": {"type": "string"}}}}}]},
     "tools[0].function.parameters.properties"),
    ("/v1/completions", {"model": MODEL, "prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["fine", "a\ud800b"]}, "prompt[1]"),
    ("/tokenize", {"prompt": "a\ud800b"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
]
ANTHROPIC_SURROGATE_CASES = [
    ("/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "a\ud800b"}]},
     "messages[0].content"),
    ("/v1/messages", {"model": MODEL, "max_tokens": 4, "system": "x\udbff", "messages": USER}, "system"),
    ("/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": USER,
                      "tools": [{"name": "t", "description": "\ud800", "input_schema": {"type": "object"}}]},
     "tools[0].description"),
    ("/v1/messages/count_tokens", {"model": MODEL, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "r\ud800"}]}]},
     "messages[2].content[0].content"),
]


def test_lone_surrogate_is_a_400_naming_the_field_on_every_route(served):
    eng, ctx = served()
    with ctx as url:
        for path, body, field in SURROGATE_CASES:
            r = raw_post(url, path, body)
            assert r.status_code == 400, (path, field, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == field, (path, err)
            assert err["message"].startswith(f"{field}: ") and "lone UTF-16 surrogate" in err["message"]
        for path, body, field in ANTHROPIC_SURROGATE_CASES:
            r = raw_post(url, path, body)
            assert r.status_code == 400, (path, field, r.text)
            assert r.json()["type"] == "error", r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["message"].startswith(f"{field}: "), (path, err)
        # the model name is echoed in responses: checked when the request is parsed
        r = raw_post(url, "/v1/chat/completions", {"model": "m\ud800", "messages": USER})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = raw_post(url, "/v1/messages", {"model": "claude\ud800", "max_tokens": 4, "messages": USER})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("model: ")
        assert eng.requests == []  # nothing reached the engine
        # the same texts without the surrogate are fine
        assert raw_post(url, "/v1/completions", {"model": MODEL, "prompt": "a\U0001F600b",
                                                 "max_tokens": 2}).status_code == 200


# ============================================================================ 2. n beyond capacity -> 400
def test_n_beyond_capacity_is_a_400_not_a_retry_loop(served):
    _, ctx = served(max_num_seqs=1, max_queue=1)  # capacity 2
    with ctx as url:
        c = oa(url)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=USER, n=3)
        assert e.value.status_code == 400 and e.value.body["param"] == "n"
        assert "capacity of 2" in e.value.body["message"] and "n=3" in e.value.body["message"]
        assert "retry-after" not in e.value.response.headers
        assert len(c.chat.completions.create(model=MODEL, messages=USER, n=2).choices) == 2  # at capacity: fine
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, prompt=["a", "b"], n=2)
        assert e.value.body["param"] == "n" and "2 prompts x n=2 needs 4 engine slots" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, prompt=["a", "b", "c"])
        assert e.value.body["param"] == "prompt" and "capacity of 2" in e.value.body["message"]
        assert len(c.completions.create(model=MODEL, prompt=["a", "b"]).choices) == 2


# ============================================================================ 3. tool schemas meta-validated
def test_check_tool_schema_unit():
    check_tool_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {}}}, "x")
    check_tool_schema({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                       "definitions": {"a": {"type": "string"}}}, "x")
    check_tool_schema(None, "x")
    for bad, why in [({"type": 123, "properties": "x"}, "not a valid JSON Schema"),
                     ({"type": "object", "required": "a"}, "(at $.required)"),
                     ({"type": "string", "pattern": "["}, "regex"),
                     ({"$schema": "http://json-schema.org/draft-07/schema#", "type": "objectx"}, "$.type"),
                     ({"$schema": 5}, "$schema")]:
        with pytest.raises(APIError) as e:
            check_tool_schema(bad, "tools[0].function.parameters")
        assert e.value.status == 400 and e.value.param == "tools[0].function.parameters"
        assert why in e.value.message and e.value.message.startswith("tools[0].function.parameters: "), e.value.message


def test_invalid_tool_schemas_are_a_400_naming_the_tool(served):
    bad = {"type": 123, "properties": "x"}
    eng, ctx = served()
    with ctx as url:
        tools = [TOOLS[0], {"type": "function", "function": {"name": "b"}},
                 {"type": "function", "function": {"name": "c", "parameters": bad}}]
        with pytest.raises(openai.BadRequestError) as e:
            oa(url).chat.completions.create(model=MODEL, messages=USER, tools=tools)
        assert e.value.body["param"] == "tools[2].function.parameters"
        assert e.value.body["message"].startswith("tools[2].function.parameters: not a valid JSON Schema: ")
        r = raw_post(url, "/tokenize", {"messages": USER, "tools": tools})  # rendered like chat: same check
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools[2].function.parameters"
        # Anthropic: the index counts server tools too (they are skipped, not renumbered)
        a_tools = [{"type": "web_search_20250305", "name": "web_search"},
                   {"name": "ok", "input_schema": {"type": "object"}},
                   {"name": "broken", "input_schema": {"type": "object", "properties": "x"}}]
        with pytest.raises(anthropic.BadRequestError) as e2:
            an(url).messages.create(model=MODEL, max_tokens=4, messages=USER, tools=a_tools)
        assert e2.value.body["error"]["message"].startswith("tools[2].input_schema: not a valid JSON Schema: ")
        with pytest.raises(anthropic.BadRequestError, match=r"tools\[2\]\.input_schema"):
            an(url).messages.count_tokens(model=MODEL, messages=USER, tools=a_tools)
        assert eng.requests == []
        assert oa(url).chat.completions.create(model=MODEL, messages=USER, tools=TOOLS).choices


# ============================================================================ 4. skip_special_tokens, real engine
@pytest.fixture(scope="module")
def real_app():
    """The app over the real tiny engine (build_app, as `serve` runs it), with `--honor-sampling-in-thinking`
    on, and its model's logits replaceable by a forced token script (one row per step: no speculative decoding,
    whose verify steps would take several rows of the script at once)."""
    app, _ = build_app(ServeOptions(model="tiny", cache_gib=0.05, honor_sampling_in_thinking=True,
                                    speculative="none"))
    st = app.state.server
    model = st.engine.engine.model
    orig = model.logits
    forced: dict = {"script": None, "i": 0}

    def logits(h):
        out = orig(h)
        if forced["script"] is None:
            return out
        one_hot = torch.full_like(out, float("-inf"))
        for r in range(out.shape[0]):
            s = forced["script"]
            one_hot[r, s[min(forced["i"], len(s) - 1)]] = 0.0
            forced["i"] += 1
        return one_hot

    model.logits = logits

    def force(ids):
        forced["script"], forced["i"] = list(ids), 0
    yield app, force
    asyncio.run(st.engine.shutdown(drain=False))


def test_honor_flag_reaches_the_server_config(real_app):
    app, _ = real_app
    assert app.state.server.config.honor_sampling_in_thinking is True
    assert ServerConfig().honor_sampling_in_thinking is False
    from click.testing import CliRunner

    from ascend_v4.cli import main
    assert "--honor-sampling-in-thinking" in CliRunner().invoke(main, ["serve", "--help"]).output


def test_skip_special_tokens_with_the_real_tokenizer_and_engine(real_app, live, tokenizer):
    app, force = real_app
    tok = tokenizer
    ph16, ph17 = tok.encode(PH16), tok.encode(PH17)
    assert len(ph16) == len(ph17) == 1 and tok.is_special(ph16[0])
    for structural in ("</think>", "｜DSML｜", "<｜User｜>"):  # carry structure: not flagged special, never skipped
        assert not any(tok.is_special(i) for i in tok.encode(structural))
    think = [*ph16, *tok.encode("Hello"), *tok.encode("</think>"), *tok.encode(" world"), *ph17, tok.eos_id]
    with live(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        force(think)
        m = c.chat.completions.create(model="tiny", messages=USER, max_tokens=16).choices[0].message
        assert (m.reasoning_content, m.content) == ("Hello", " world")
        force(think)
        m = c.chat.completions.create(model="tiny", messages=USER, max_tokens=16,
                                      extra_body={"skip_special_tokens": False}).choices[0].message
        assert (m.reasoning_content, m.content) == (PH16 + "Hello", " world" + PH17)
        force(think)
        reasoning, content = "", ""
        for ch in c.chat.completions.create(model="tiny", messages=USER, max_tokens=16, stream=True,
                                            extra_body={"spaces_between_special_tokens": False}):
            for choice in ch.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                content += choice.delta.content or ""
        assert (reasoning, content) == ("Hello", " world")
        # a DSML tool call with a placeholder inside the content: the call is still parsed
        force([*tok.encode("Need it</think>Sure."), *ph16, *tok.encode(CALL), tok.eos_id])
        ch = c.chat.completions.create(model="tiny", messages=USER, max_tokens=64, tools=TOOLS).choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content == "Sure."
        assert json.loads(ch.message.tool_calls[0].function.arguments) == {"city": "Paris"}
        # completions, and the Anthropic route (default on)
        force([*ph16, *tok.encode("Hi"), *ph17, tok.eos_id])
        assert c.completions.create(model="tiny", prompt="x", max_tokens=8).choices[0].text == "Hi"
        force([*ph16, *tok.encode("Hi"), *ph17, tok.eos_id])
        assert c.completions.create(model="tiny", prompt="x", max_tokens=8,
                                    extra_body={"skip_special_tokens": False}).choices[0].text == PH16 + "Hi" + PH17
        force(think)
        msg = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120).messages.create(
            model="tiny", max_tokens=16, messages=USER)
        assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in msg.content] == \
            [("thinking", "Hello"), ("text", " world")]


# ============================================================================ 5. Anthropic stream == non-stream
def _blocks(message) -> list[dict]:
    out = []
    for b in message.content:
        d = b.model_dump(exclude_none=True)
        if d.get("type") == "tool_use":
            d.pop("id")
        out.append(d)
    return out


@pytest.mark.parametrize("script, thinking, expected", [
    (["Need", " the", " weather"], None, ["thinking"]),  # cut during thinking (no </think>)
    (["Need", " the weather", "</think>"], None, ["thinking"]),  # thinking, then an empty answer
    (["Need it", "</think>", "Let me", " check.", CALL], None, ["thinking", "text", "tool_use"]),
    (["Need it", "</think>", CALL], None, ["thinking", "tool_use"]),
    (["Hello", " there"], {"type": "disabled"}, ["text"]),
    ([""], {"type": "disabled"}, []),  # nothing at all: content [] as Anthropic's API answers
])
def test_anthropic_streamed_and_non_streamed_replies_carry_the_same_blocks(served, script, thinking, expected):
    _, ctx = served(lambda ids, p: list(script))
    kw = {"thinking": thinking} if thinking else {}
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    with ctx as url:
        c = an(url)
        plain = c.messages.create(model=MODEL, max_tokens=64, messages=USER, tools=tools, **kw)
        with c.messages.stream(model=MODEL, max_tokens=64, messages=USER, tools=tools, **kw) as s:
            final = s.get_final_message()
    assert [b.type for b in plain.content] == expected
    assert _blocks(final) == _blocks(plain)
    assert not any(b.type == "text" and not b.text for b in plain.content)  # never an empty text block
    assert final.stop_reason == plain.stop_reason


# ============================================================================ 6. thinking-mode sampling
SAMPLING = {"temperature": 0.2, "top_p": 0.5, "presence_penalty": 1.5, "frequency_penalty": -1.0}


def _sampling(params) -> dict:
    return {k: getattr(params, k) for k in SAMPLING}


def test_thinking_mode_ignores_sampling_fields_and_logs_once(served, caplog):
    caplog.set_level(logging.INFO, logger="ascend_v4.server.render")
    eng, ctx = served()
    with ctx as url:
        c = oa(url)
        c.chat.completions.create(model=MODEL, messages=USER, n=2, seed=3, extra_body={"top_k": 7}, **SAMPLING)
        for _, p in eng.requests[-2:]:
            assert _sampling(p) == {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0,
                                    "frequency_penalty": 0.0}
            assert p.top_k == 7  # not among DeepSeek's ignored fields: applied
        logged = [r for r in caplog.records if "thinking mode ignores" in r.getMessage()]
        assert len(logged) == 1 and logged[0].levelno == logging.INFO  # once per request, not per choice
        for name in ("temperature=0.2", "top_p=0.5", "presence_penalty=1.5", "frequency_penalty=-1"):
            assert name in logged[0].getMessage()
        assert logged[0].getMessage().startswith("chatcmpl-")
        caplog.clear()
        c.chat.completions.create(model=MODEL, messages=USER, temperature=1.0, top_p=1)  # the defaults: no log
        assert not [r for r in caplog.records if "thinking mode ignores" in r.getMessage()]
        # thinking off (by field or alias): applied
        c.chat.completions.create(model=MODEL, messages=USER, extra_body={"thinking": {"type": "disabled"}},
                                  **SAMPLING)
        assert _sampling(eng.requests[-1][1]) == SAMPLING
        c.chat.completions.create(model="deepseek-chat", messages=USER, **SAMPLING)
        assert _sampling(eng.requests[-1][1]) == SAMPLING
        # out-of-range values are still a 400 in thinking mode ("accepted" = validated, then not applied)
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=MODEL, messages=USER, temperature=5)
        caplog.clear()
        an(url).messages.create(model=MODEL, max_tokens=4, messages=USER,
                                extra_body={"temperature": 0.1, "top_p": 0.3, "top_k": 4})
        p = eng.requests[-1][1]
        assert (p.temperature, p.top_p, p.top_k) == (1.0, 1.0, 4)
        logged = [r for r in caplog.records if "thinking mode ignores temperature=0.1, top_p=0.3" in r.getMessage()]
        assert len(logged) == 1
        an(url).messages.create(model=MODEL, max_tokens=4, messages=USER, thinking={"type": "disabled"},
                                extra_body={"temperature": 0.1})
        assert eng.requests[-1][1].temperature == 0.1


def test_honor_sampling_in_thinking_applies_client_values(served, caplog):
    caplog.set_level(logging.INFO, logger="ascend_v4.server.render")
    eng, ctx = served(config=ServerConfig(model_names=[MODEL], api_key=KEY, honor_sampling_in_thinking=True))
    with ctx as url:
        oa(url).chat.completions.create(model=MODEL, messages=USER, **SAMPLING)
        assert _sampling(eng.requests[-1][1]) == SAMPLING
        an(url).messages.create(model=MODEL, max_tokens=4, messages=USER, extra_body={"temperature": 0.1})
        assert eng.requests[-1][1].temperature == 0.1
    assert not [r for r in caplog.records if "thinking mode ignores" in r.getMessage()]
