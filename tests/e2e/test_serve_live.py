"""`ascend-v4 serve` as a subprocess on 127.0.0.1 with the tiny dummy, driven by the unmodified `openai` and
`anthropic` SDKs and raw HTTP.

Honesty about the model: the dummy has random weights. It never writes DSML or `</think>` on purpose, so
here thinking-mode output is (almost surely) all reasoning and tool requests come back without tool calls;
what is checked live is the protocol (shapes, usage arithmetic, finish reasons, no markup leaking, limits,
disconnects, backpressure, draining). Parsing of real tool calls is tested with forced output in
tests/unit/server.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

anthropic = pytest.importorskip("anthropic")
httpx2 = pytest.importorskip("httpx2")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

KEY = "sk-e2e"  # the main server's --api-key (tests/e2e/conftest.py)
MSG = [{"role": "user", "content": "Say hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]


def oa(url: str, key: str = KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def an(url: str, key: str = KEY):
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=120)


def get(url: str, path: str, **kw):
    return httpx2.get(url + path, trust_env=False, timeout=30, **kw)


def post(url: str, path: str, body: dict, key: str | None = KEY):
    return httpx2.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"} if key else {},
                       trust_env=False, timeout=120)


@pytest.fixture(scope="module")
def main(servers):
    return servers["main"].url


@pytest.fixture(scope="module")
def small(servers):
    return servers["small"].url


def test_startup_log_health_and_models(servers, main, small):
    assert "no --model given: serving the `tiny` dummy" in servers["small"].log()
    assert "listening on http://127.0.0.1:" in servers["main"].log() and "model tiny" in servers["main"].log()
    h = get(main, "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["healthy"] is True
    ids = [m.id for m in oa(main).models.list()]
    assert ids[0] == "tiny" and {"deepseek-chat", "deepseek-reasoner"} <= set(ids)


def test_openai_chat_thinking_default_and_usage(main):
    c = oa(main)
    n_prompt = post(main, "/tokenize", {"messages": MSG}).json()["count"]
    r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, extra_body={"ignore_eos": True})
    ch, u = r.choices[0], r.usage
    assert r.object == "chat.completion" and ch.finish_reason == "length"
    # thinking is on by default: a random model never closes </think>, so all of it is reasoning
    assert ch.message.reasoning_content and ch.message.content == ""
    assert u.prompt_tokens == n_prompt and u.completion_tokens == 6 and u.total_tokens == n_prompt + 6
    assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens
    assert u.completion_tokens_details.reasoning_tokens == 6


def test_openai_chat_thinking_off_and_stream(main):
    c = oa(main)
    for off in ({"thinking": {"type": "disabled"}}, {"reasoning_effort": "none"},
                {"chat_template_kwargs": {"thinking": False}}):
        r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, extra_body={"ignore_eos": True, **off})
        m = r.choices[0].message
        assert m.content and getattr(m, "reasoning_content", None) is None, off
        assert r.usage.completion_tokens_details.reasoning_tokens == 0
    r = c.chat.completions.create(model="deepseek-chat", messages=MSG, max_tokens=3, extra_body={"ignore_eos": True})
    assert r.choices[0].message.reasoning_content is None and r.model == "deepseek-chat"
    stream = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"thinking": {"type": "disabled"}, "ignore_eos": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text and finish == "length" and usage.completion_tokens == 5
    # reasoning streams as reasoning_content in thinking mode
    deltas = [ch.choices[0].delta for ch in c.chat.completions.create(
        model="deepseek-reasoner", messages=MSG, max_tokens=3, stream=True, extra_body={"ignore_eos": True})
        if ch.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)


def test_prefix_cache_hits_are_reported(main):
    long = [{"role": "user", "content": "cache me " * 150}]
    c = oa(main)
    c.chat.completions.create(model="tiny", messages=long, max_tokens=1)
    u = c.chat.completions.create(model="tiny", messages=long, max_tokens=1).usage
    assert u.prompt_cache_hit_tokens > 0 and u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens
    assert u.prompt_cache_miss_tokens == u.prompt_tokens - u.prompt_cache_hit_tokens


def test_completions_logprobs_and_n(main):
    r = oa(main).completions.create(model="tiny", prompt="Hello", max_tokens=3, n=2, logprobs=2, seed=1,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert all(len(c.logprobs.tokens) == 3 and len(c.logprobs.top_logprobs[0]) >= 1 for c in r.choices)
    assert r.usage.completion_tokens == 6
    r2 = oa(main).completions.create(model="tiny", prompt=[0, 1000, 2000], max_tokens=2, seed=1, temperature=0)
    r3 = oa(main).completions.create(model="tiny", prompt=[0, 1000, 2000], max_tokens=2, seed=1, temperature=0)
    assert r2.choices[0].text == r3.choices[0].text  # greedy is deterministic
    chat = oa(main).chat.completions.create(model="tiny", messages=MSG, max_tokens=2, logprobs=True, top_logprobs=3)
    lp = chat.choices[0].logprobs.content
    assert len(lp) == 2 and len(lp[0].top_logprobs) == 3 and lp[0].logprob <= 0


def test_tools_live_no_markup_leaks(main):
    c = oa(main)
    r = c.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, max_tokens=4)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    # chat mode + named tool: the DSML start is forced into the prompt; whatever random tokens follow, the
    # markup never reaches content (an unfinished invoke is dropped)
    r = c.chat.completions.create(model="deepseek-chat", messages=MSG, tools=TOOLS, max_tokens=4,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert not r.choices[0].message.content
    deltas = [ch.choices[0].delta for ch in c.chat.completions.create(
        model="deepseek-chat", messages=MSG, tools=TOOLS, max_tokens=4, stream=True, tool_choice="required")
        if ch.choices]
    assert "｜DSML｜" not in "".join(d.content or "" for d in deltas)
    with pytest.raises(openai.BadRequestError, match="thinking mode"):
        c.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice="required")


def test_anthropic_messages_thinking_stream_count_tokens(main):
    c = an(main)
    m = c.messages.create(model="claude-test", max_tokens=4, messages=MSG)
    assert m.type == "message" and m.stop_reason == "max_tokens" and m.usage.output_tokens == 4
    assert m.content[0].type == "thinking" and m.content[0].signature  # thinking on by default
    n = c.messages.count_tokens(model="tiny", messages=MSG)
    assert n.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)
    off = c.messages.create(model="tiny", max_tokens=3, messages=MSG, thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"] and off.content[0].text
    assert c.messages.count_tokens(model="tiny", messages=MSG, thinking={"type": "disabled"}).input_tokens == \
        n.input_tokens + 1 - 1  # same length: "<think>" and "</think>" are one token each
    with c.messages.stream(model="tiny", max_tokens=4, messages=MSG, output_config={"effort": "max"}) as s:
        types = [e.type for e in s]
        final = s.get_final_message()
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in types and final.stop_reason == "max_tokens"
    assert final.content[0].type == "thinking" and final.usage.output_tokens == 4


def test_errors_live(main):
    with pytest.raises(openai.AuthenticationError):
        oa(main, key="wrong").chat.completions.create(model="tiny", messages=MSG, max_tokens=1)
    r = post(main, "/v1/chat/completions", {"model": "tiny", "messages": MSG}, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError):
        an(main, key="wrong").messages.create(model="tiny", max_tokens=1, messages=MSG)
    with pytest.raises(openai.NotFoundError):
        oa(main).chat.completions.create(model="gpt-5", messages=MSG, max_tokens=1)
    with pytest.raises(anthropic.NotFoundError):
        an(main).messages.create(model="gpt-5", max_tokens=1, messages=MSG)
    with pytest.raises(openai.BadRequestError) as e:
        oa(main).chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["type"] == "invalid_request_error"
    r = httpx2.post(main + "/v1/messages", json={"model": "tiny", "messages": MSG}, trust_env=False,
                    headers={"x-api-key": KEY})
    assert r.status_code == 400 and r.json()["type"] == "error" and "max_tokens" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match=r"prompt has \d+ tokens; the maximum context length is 2048"):
        oa(main).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 3000}])
    with pytest.raises(anthropic.BadRequestError, match="maximum context length is 2048"):
        an(main).messages.create(model="tiny", max_tokens=1, messages=[{"role": "user", "content": "x " * 3000}])


def test_64_concurrent_streams_complete(main, metric):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"client {i}"}], max_tokens=3, stream=True,
            stream_options={"include_usage": True}, extra_body={"thinking": {"type": "disabled"}, "ignore_eos": True})
        finish, usage = None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
        return finish, usage.completion_tokens

    async def run():
        client = openai.AsyncOpenAI(base_url=main + "/v1", api_key=KEY, max_retries=0, timeout=170)
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run())
    assert results == [("length", 3)] * 64
    text = get(main, "/metrics").text
    assert metric(text, "ascend_v4:num_requests_running") == 0 and metric(text, "ascend_v4:cache_blocks_used") == 0


def test_disconnect_mid_stream_aborts_and_frees_blocks(main, metric):
    before = get(main, "/metrics").text
    with httpx2.stream("POST", main + "/v1/chat/completions", trust_env=False, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "tiny", "messages": MSG, "max_tokens": 2000, "stream": True,
                             "ignore_eos": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]  # role chunk, blank, first delta, blank
        assert got[0].startswith("data: ")
        during = get(main, "/metrics").text
        assert metric(during, "ascend_v4:cache_blocks_used") > 0
    # leaving the block closed the connection mid-stream
    t_end = time.monotonic() + 30
    while time.monotonic() < t_end:
        after = get(main, "/metrics").text
        if metric(after, "ascend_v4:num_requests_in_flight") == 0 and metric(after, "ascend_v4:cache_blocks_used") == 0:
            break
        time.sleep(0.1)
    assert metric(after, "ascend_v4:cache_blocks_used") == 0
    assert metric(after, "ascend_v4:request_aborted_total") == metric(before, "ascend_v4:request_aborted_total") + 1
    assert metric(after, "ascend_v4:client_disconnects_total") == \
        metric(before, "ascend_v4:client_disconnects_total") + 1
    assert 'ascend_v4:http_requests_total{route="/v1/chat/completions",status="200"}' in after
    assert "ascend_v4:time_to_first_token_seconds_bucket" in after


def test_queue_overflow_gives_429(small):
    c = oa(small, key="unused")
    streams = []
    try:
        for _ in range(2):  # max_num_seqs 1 + max_queue 1
            s = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=500, stream=True,
                                          extra_body={"ignore_eos": True})
            streams.append(s)
        next(iter(streams[0]))
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)
        assert int(e.value.response.headers["retry-after"]) >= 1
        with pytest.raises(anthropic.RateLimitError):
            an(small, key="unused").messages.create(model="tiny", max_tokens=1, messages=MSG)
    finally:
        for s in streams:
            s.close()
    t_end = time.monotonic() + 30
    while get(small, "/health").json()["in_flight"] and time.monotonic() < t_end:
        time.sleep(0.1)
    assert c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1).choices  # room again


def test_schema_fuzzing_real_engine_no_5xx(main):
    """schemathesis against the live server with the real engine (output lengths capped so it stays fast)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(main + "/openapi.json")
    failures: list[str] = []

    def bounded(case):
        if isinstance(case.body, dict):
            if "model" in case.body and isinstance(case.body["model"], str):
                case.body["model"] = "tiny"
            # floats too: pydantic takes 837.0 as 837 tokens
            limits = [k for k in ("max_tokens", "max_completion_tokens")
                      if isinstance(case.body.get(k), int | float) and not isinstance(case.body[k], bool)]
            for k in limits:
                case.body[k] = min(case.body[k], 4)
            if not limits and case.body.get("max_tokens") is None:
                # no limit given (absent or null): the server's default (4096, up to the 2048-token context)
                # would make one example decode for a minute on this CPU; the fuzz is about request handling
                case.body["max_tokens"] = 4
            if isinstance(case.body.get("n"), int) and not isinstance(case.body["n"], bool) and case.body["n"] > 2:
                case.body["n"] = 2
            if case.body.get("stream") is True:
                case.body["stream"] = False  # the fuzz reads whole responses
        return case

    def make_check(op, mode):
        @settings(max_examples=6, deadline=None, database=None, phases=[Phase.generate], derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode).map(bounded))
        def check(case):
            r = case.call(base_url=main, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            if r.status_code >= 500:
                failures.append(f"{op.method.upper()} {op.path} -> {r.status_code}: {r.text[:300]}")
        return check

    for result in schema.get_all_operations():
        op = result.ok()
        if op.method.upper() != "POST":
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                make_check(op, mode)()
            except Unsatisfiable:
                pass
    assert not failures, "\n".join(failures[:10])
    assert get(main, "/health").status_code == 200


def test_bench_serve_against_live_server(main):
    from click.testing import CliRunner

    from ascend_v4.cli import main as cli_main
    from ascend_v4.cli.bench import BenchServeConfig, run_bench_serve

    m = run_bench_serve(BenchServeConfig(url=main, api_key=KEY, concurrency=4, input_len=16, output_len=4,
                                         num_prompts=8))
    assert m["completed"] == 8 and m["failed"] == 0
    assert m["total_input_tokens"] == 8 * 16 and m["total_output_tokens"] == 8 * 4  # ignore_eos: exact lengths
    for k in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < m[f"mean_{k}_ms"] and m[f"p50_{k}_ms"] <= m[f"p90_{k}_ms"] <= m[f"p99_{k}_ms"]
    assert m["output_throughput"] > 0 and m["request_throughput"] > 0 and m["max_concurrency"] == 4
    r = CliRunner().invoke(cli_main, ["bench", "serve", "--url", main, "--api-key", KEY, "--num-prompts", "2",
                                      "--input-len", "8", "--output-len", "2", "--endpoint", "/v1/chat/completions",
                                      "--json"])
    assert r.exit_code == 0, r.output
    assert '"completed": 2' in r.output and '"mean_ttft_ms"' in r.output


def test_ctrl_c_drains_in_flight_then_exits(servers, small):
    srv = servers["small"]
    stream = oa(small).chat.completions.create(model="tiny", messages=MSG, max_tokens=12, stream=True,
                                               extra_body={"ignore_eos": True, "thinking": {"type": "disabled"}})
    it = iter(stream)
    next(it)
    srv.proc.send_signal(signal.SIGINT)
    finish = None
    n = 0
    for chunk in it:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            n += bool(ch.delta.content)
    assert finish == "length"  # the in-flight stream ran to its end
    assert srv.proc.wait(60) == 0
    assert "draining 1 in-flight request" in srv.log() and "stopped" in srv.log()
    with pytest.raises(httpx2.ConnectError):
        get(small, "/health")
