"""Request mapping: thinking / effort (DeepSeek's later-docs table), aliases, tool_choice, pass-back rule,
message conversion (OpenAI and Anthropic), sampling parameters."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from ascend_v4.chat.encoding import encode_messages  # noqa: E402
from ascend_v4.server.anthropic_routes import to_openai_messages, to_openai_tools  # noqa: E402
from ascend_v4.server.errors import APIError  # noqa: E402
from ascend_v4.server.protocol import AnthropicMessagesRequest, ChatCompletionRequest  # noqa: E402
from ascend_v4.server.render import (  # noqa: E402
    Thinking,
    check_passback,
    make_params,
    openai_messages,
    render_chat,
    resolve_thinking,
)
from ascend_v4.server.serving import encoder_version_of  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("effort, expected", [
    (None, "high"), ("minimal", "low"), ("low", "low"), ("medium", "high"), ("high", "high"), ("xhigh", "max"),
    ("max", "max"),
])
def test_effort_mapping_later_docs(effort, expected):
    assert resolve_thinking(thinking_type=None, effort=effort, template_kwargs=None, forced=None) == \
        Thinking(True, expected)


def test_thinking_switches():
    off = Thinking(False, None)
    assert resolve_thinking(thinking_type="disabled", effort="max", template_kwargs=None, forced=None) == off
    assert resolve_thinking(thinking_type=None, effort="none", template_kwargs=None, forced=None) == off
    assert resolve_thinking(thinking_type=None, effort=None, template_kwargs={"thinking": False}, forced=None) == off
    assert resolve_thinking(thinking_type=None, effort=None, template_kwargs={"enable_thinking": False},
                            forced=None) == off
    assert resolve_thinking(thinking_type="enabled", effort=None, template_kwargs=None, forced=False) == off  # alias
    assert resolve_thinking(thinking_type="disabled", effort=None, template_kwargs=None, forced=True).enabled
    with pytest.raises(APIError):
        resolve_thinking(thinking_type=None, effort=None, template_kwargs={"thinking": "yes"}, forced=None)


def test_tool_choice_rules(tokenizer):
    msgs = [{"role": "user", "content": "weather?"}]
    on, off = Thinking(True, "high"), Thinking(False, None)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(APIError, match="thinking mode") as e:
            render_chat(tokenizer, msgs, thinking=on, tools=TOOLS, tool_choice=choice, encoder_version="april")
        assert e.value.status == 400
    p = render_chat(tokenizer, msgs, thinking=off, tools=TOOLS, tool_choice="required", encoder_version="april")
    assert p.text.endswith('</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="') and p.tools_enabled
    with pytest.raises(APIError, match="not among the tools"):
        render_chat(tokenizer, msgs, thinking=off, tools=TOOLS, encoder_version="april",
                    tool_choice={"type": "function", "function": {"name": "nope"}})
    p = render_chat(tokenizer, msgs, thinking=on, tools=TOOLS, tool_choice="none", encoder_version="april")
    assert "## Tools" not in p.text and not p.tools_enabled
    p = render_chat(tokenizer, msgs, thinking=on, tools=TOOLS, encoder_version="april")
    assert "## Tools" in p.text and p.ids == tokenizer.encode(p.text)
    assert p.text == encode_messages(msgs, "thinking", reasoning_effort="high", tools=TOOLS)


def test_passback_rule(tokenizer):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    msgs = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with pytest.raises(APIError, match="reasoning_content") as e:
        check_passback(msgs)
    assert e.value.status == 400
    # off by default; on with the switch; fine when passed back; earlier exchanges are not checked
    render_chat(tokenizer, msgs, thinking=Thinking(True, "high"), tools=TOOLS, encoder_version="april")
    with pytest.raises(APIError):
        render_chat(tokenizer, msgs, thinking=Thinking(True, "high"), tools=TOOLS, encoder_version="april",
                    require_passback=True)
    render_chat(tokenizer, msgs, thinking=Thinking(False, None), tools=TOOLS, encoder_version="april",
                require_passback=True)  # chat mode: no rule
    msgs[1]["reasoning_content"] = "I should call the tool."
    check_passback(msgs)
    check_passback([{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "user", "content": "x"}])


def test_openai_message_conversion():
    req = ChatCompletionRequest(model="m", messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "reasoning": "r",
         "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"}])
    msgs = openai_messages(req.messages)
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[2]["reasoning_content"] == "r" and "content" not in msgs[2]
    assert msgs[2]["tool_calls"][0]["function"]["name"] == "f"
    encode_messages(msgs, "thinking", reasoning_effort="high")  # the encoder accepts the conversion


def test_anthropic_conversion():
    req = AnthropicMessagesRequest(
        model="claude-x", max_tokens=8, system=[{"type": "text", "text": "sys"}],
        tools=[{"name": "get_weather", "input_schema": {"type": "object"}},
               {"name": "web_search", "type": "web_search_20250305"}],
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": [
                      {"type": "thinking", "thinking": "call it", "signature": "x"},
                      {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                      {"type": "text", "text": "thanks"}]}])
    msgs = to_openai_messages(req)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "user"]
    assert msgs[2]["reasoning_content"] == "call it" and msgs[2]["tool_calls"][0]["function"]["arguments"] == \
        {"city": "Paris"}
    assert msgs[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}
    tools, choice = to_openai_tools(req)
    assert [t["function"]["name"] for t in tools] == ["get_weather"] and choice == "required"
    encode_messages(msgs, "thinking", reasoning_effort="high", tools=tools)
    bad = AnthropicMessagesRequest(model="m", max_tokens=1, messages=[
        {"role": "user", "content": [{"type": "image", "source": {}}]}])
    with pytest.raises(APIError, match="image"):
        to_openai_messages(bad)


def test_sampling_params_and_seed_wrap():
    p = make_params(max_tokens=4, seed=2**64 - 1, n_index=1)
    assert p.seed == 0
    assert make_params(max_tokens=4, seed=-5).seed == -5
    assert make_params(max_tokens=2, min_tokens=9).min_tokens == 2
    with pytest.raises(APIError):
        make_params(max_tokens=4, stop=[""])


def test_encoder_version_detection(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4", "dspark_block_size": 8}')
    assert encoder_version_of(tmp_path) == "0731"
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4"}')
    assert encoder_version_of(tmp_path) == "april"
    assert encoder_version_of(None) == "april"
