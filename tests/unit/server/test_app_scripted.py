"""The app over a scripted engine (forced output), served by uvicorn on 127.0.0.1, driven by the official
`openai` and `anthropic` SDKs: tool calls parsed batch and streaming, thinking split, stop sequences, n,
logprobs, the pass-back switch, engine failure (503 + clean error event), and schema fuzzing (no 5xx)."""

from __future__ import annotations

import json
import time

import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx2 = pytest.importorskip("httpx2")

from ascend_v4.server.serving import ServerConfig  # noqa: E402

MODEL = "deepseek-v4-flash"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]
CALL_PIECES = ["\n\n", "<｜DSML｜tool", "_calls>\n<｜DSML｜invoke name=\"get", "_weather\">\n<｜DSML｜parameter name=",
               "\"city\" string=\"true\">Par", "is</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DS", "ML｜tool_calls>"]


def thinking_tool_script(ids, params):
    return ["Need", " the weather", "</think>", "Let me", " check.", *CALL_PIECES]


def oa(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=30, **kw)


def an(url):
    return anthropic.Anthropic(base_url=url, api_key="sk-test", max_retries=0, timeout=30)


def test_tool_calls_batch_and_streaming_openai(served):
    eng, ctx = served(thinking_tool_script)
    with ctx as url:
        c = oa(url)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather in Paris?"}],
                                      tools=TOOLS)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls"
        assert ch.message.content == "Let me check."
        assert ch.message.reasoning_content == "Need the weather"
        (call,) = ch.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        assert r.usage.completion_tokens_details.reasoning_tokens >= 3
        assert r.usage.prompt_cache_hit_tokens + r.usage.prompt_cache_miss_tokens == r.usage.prompt_tokens

        stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather?"}],
                                           tools=TOOLS, stream=True, stream_options={"include_usage": True})
        content, reasoning, calls, finish, usage, order = "", "", {}, None, None, []
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                d = choice.delta
                if getattr(d, "reasoning_content", None):
                    reasoning += d.reasoning_content
                    order.append("r")
                if d.content:
                    content += d.content
                    order.append("c")
                for tc in d.tool_calls or []:
                    calls.setdefault(tc.index, {"name": "", "args": ""})
                    calls[tc.index]["name"] += tc.function.name or ""
                    calls[tc.index]["args"] += tc.function.arguments or ""
                    order.append("t")
                finish = choice.finish_reason or finish
        assert (reasoning, content, finish) == ("Need the weather", "Let me check.", "tool_calls")
        assert "DSML" not in content and "<｜" not in content
        assert order == sorted(order, key="rct".index)
        assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["args"]) == {"city": "Paris"}
        assert usage.completion_tokens > 0 and usage.completion_tokens_details.reasoning_tokens > 0
        # the next turn passes the call and its reasoning back; the encoder accepts it
        msgs = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": ch.message.content, "reasoning_content": "Need the weather",
                 "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        c.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=2)


def test_anthropic_tool_use_thinking_and_stream_events(served):
    eng, ctx = served(thinking_tool_script)
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}]
    with ctx as url:
        c = an(url)
        m = c.messages.create(model="claude-test-model", max_tokens=64, tools=tools,
                              messages=[{"role": "user", "content": "weather?"}])
        assert [b.type for b in m.content] == ["thinking", "text", "tool_use"]
        assert m.stop_reason == "tool_use" and m.content[2].input == {"city": "Paris"}
        assert m.content[0].thinking == "Need the weather" and m.content[0].signature
        assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0

        with c.messages.stream(model=MODEL, max_tokens=64, tools=tools,
                               messages=[{"role": "user", "content": "weather?"}]) as s:
            types = [e.type for e in s]
            final = s.get_final_message()
        assert types[0] == "message_start" and types[-1] == "message_stop"
        assert "message_delta" in types and types.index("message_delta") == len(types) - 2
        assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
        assert final.content[2].input == {"city": "Paris"} and final.stop_reason == "tool_use"
        n = c.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=tools)
        assert n.input_tokens == len(eng.requests[-1][0])  # same rendering as generation


def test_stop_sequences_and_finish_reasons(served):
    eng, ctx = served(lambda ids, p: ["alpha", " beta", " END", " gamma"])
    with ctx as url:
        m = an(url).messages.create(model=MODEL, max_tokens=20, stop_sequences=["END"],
                                    thinking={"type": "disabled"},
                                    messages=[{"role": "user", "content": "x"}])
        assert m.stop_reason == "stop_sequence" and m.stop_sequence == "END"
        assert m.content[0].text == "alpha beta "
        r = oa(url).chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "x"}],
                                            max_tokens=2)
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.reasoning_content is None
        assert r.model == "deepseek-chat"


def test_n_logprobs_and_seed(served):
    eng, ctx = served()
    with ctx as url:
        r = oa(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=3,
                                            seed=7, logprobs=True, top_logprobs=2, extra_body={"thinking": {
                                                "type": "disabled"}})
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert all(c.message.content == "Hello world!" for c in r.choices)
        lp = r.choices[0].logprobs.content
        assert [e.token for e in lp] == ["Hello", " world", "!"] and len(lp[0].top_logprobs) == 2
        assert sorted(p.seed for _, p in eng.requests) == [7, 8, 9]
        assert r.usage.completion_tokens == 3 * 3


def test_passback_switch_and_tool_choice(served):
    cfg = ServerConfig(model_names=[MODEL], api_key="sk-test", require_reasoning_passback=True)
    eng, ctx = served(lambda ids, p: ['<｜DSML｜parameter name="city" string="true">Par',
                                      "is</｜DSML｜parameter>\n</｜DSML｜invoke>"], config=cfg)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    msgs = [{"role": "user", "content": "w?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with ctx as url:
        c = oa(url)
        with pytest.raises(openai.BadRequestError, match="reasoning_content"):
            c.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS)
        with pytest.raises(openai.BadRequestError, match="thinking mode"):
            c.chat.completions.create(model=MODEL, messages=msgs[:1], tools=TOOLS, tool_choice="required")
        # chat mode + named tool: the DSML start is forced, the model writes the parameters
        r = c.chat.completions.create(model="deepseek-chat", messages=msgs[:1], tools=TOOLS,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
        prompt_text = eng.tokenizer.decode(eng.requests[-1][0])
        assert prompt_text.endswith('<｜DSML｜invoke name="get_weather">\n')
        (call_out,) = r.choices[0].message.tool_calls
        assert (call_out.function.name, json.loads(call_out.function.arguments)) == ("get_weather", {"city": "Paris"})
        assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
        # response_format json_object: prompt-level instruction only
        c.chat.completions.create(model=MODEL, messages=msgs[:1], response_format={"type": "json_object"},
                                  max_tokens=1)
        assert "## Response Format:" in eng.tokenizer.decode(eng.requests[-1][0])


def test_engine_failure_503_and_clean_error_events(served):
    eng, ctx = served(lambda ids, p: ["a", "b", "c", "d", "e"], step_delay=0.02)
    with ctx as url:
        c = oa(url)
        eng.fail_after = 2
        with pytest.raises(openai.APIError, match="engine failed"):
            for _ in c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                               stream=True):
                pass
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 503
        with pytest.raises(anthropic.APIStatusError) as e2:
            an(url).messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}])
        assert e2.value.status_code == 503 and e2.value.body["type"] == "error"
        h = httpx2.get(url + "/health", trust_env=False)
        assert h.status_code == 503 and "injected failure" in h.json()["reason"]
        assert "ascend_v4:engine_healthy 0.0" in httpx2.get(url + "/metrics", trust_env=False).text


def test_anthropic_stream_error_event(served):
    eng, ctx = served(lambda ids, p: ["a", "b", "c"], step_delay=0.02)
    with ctx as url:
        eng.fail_after = 1
        with httpx2.stream("POST", url + "/v1/messages", headers={"x-api-key": "sk-test"}, trust_env=False,
                           json={"model": MODEL, "max_tokens": 8, "stream": True,
                                 "messages": [{"role": "user", "content": "x"}]}) as r:
            events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
        assert events[0] == "message_start" and events[-1] == "error"


def test_errors_shapes_auth_and_backpressure(served):
    eng, ctx = served(lambda ids, p: ["x"] * 50, step_delay=0.05, max_num_seqs=1, max_queue=1)
    with ctx as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
                model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "x"}])
        c = oa(url)
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        assert e.value.body["code"] == "model_not_found"
        with pytest.raises(anthropic.NotFoundError):
            an(url).messages.create(model="gpt-4o", max_tokens=1, messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=5)
        assert e.value.body["param"] == "top_p"
        with pytest.raises(anthropic.BadRequestError) as e2:
            an(url).messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}])
        assert e2.value.body["error"]["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError, match=r"prompt has \d+ tokens; the maximum context length is 4096"):
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 5000}])
        # two long streams fill max_num_seqs + max_queue = 2; the third request gets 429 with Retry-After
        streams = [c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                             stream=True) for _ in range(2)]
        for s in streams:
            next(iter(s))
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert e.value.response.headers["retry-after"] == "1"
        for s in streams:
            s.close()
        t_end = time.monotonic() + 10
        while eng.in_flight and time.monotonic() < t_end:
            time.sleep(0.02)
        assert eng.in_flight == 0 and eng.aborted == 2  # disconnects aborted both
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)


def test_schema_fuzzing_finds_no_server_error(served):
    """schemathesis generates valid and invalid bodies for every operation of the OpenAPI schema."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    eng, ctx = served(lambda ids, p: ["a", "b"])
    with ctx as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")

        def served_model(case):  # valid bodies name the served model (else every one is a plain 404)
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL
            if case.path_parameters and "model_id" in case.path_parameters:
                case.path_parameters["model_id"] = MODEL
            return case

        failures: list[str] = []
        statuses: list = []

        def make_check(op, mode):
            strategy = op.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE:
                strategy = strategy.map(served_model)

            @settings(max_examples=15, deadline=None, database=None, phases=[Phase.generate], derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def check(case):
                r = case.call(base_url=url, headers={"Authorization": "Bearer sk-test"}, timeout=10)
                statuses.append((op.path, r.status_code))
                if r.status_code >= 500:
                    failures.append(f"{op.method.upper()} {op.path} -> {r.status_code}: {r.text[:200]}")
            return check

        for result in schema.get_all_operations():
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    make_check(result.ok(), mode)()
                except Unsatisfiable:  # nothing to make invalid (e.g. GET /health has no inputs)
                    assert mode is GenerationMode.NEGATIVE
        assert not failures, "\n".join(failures[:10])
        accepted = {path for path, status in statuses if status == 200}
        assert {"/v1/completions", "/v1/messages"} <= accepted, statuses  # the fuzz reaches generation
        assert eng.in_flight == 0


def test_non_streaming_disconnect_aborts(served):
    eng, ctx = served(lambda ids, p: ["x"] * 200, step_delay=0.02)
    with ctx as url:
        with pytest.raises(httpx2.TimeoutException):
            httpx2.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-test"}, timeout=0.5,
                        trust_env=False, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        t_end = time.monotonic() + 10
        while (eng.in_flight or not eng.aborted) and time.monotonic() < t_end:
            time.sleep(0.02)
        assert eng.aborted == 1 and eng.in_flight == 0
        m = httpx2.get(url + "/metrics", trust_env=False).text
        assert 'ascend_v4:request_success_total{finished_reason="disconnect"} 1.0' in m
