"""Prompt rendering with tools: schema section, DSML tool calls, tool results, reasoning kept with tools.

Every expected prompt below was produced by the official `encoding/encoding_dsv4.py` on the same input
(request-level `tools` attached to the leading system message, as vLLM does) and compared with our output.
"""

import json

import pytest

from ascend_v4.chat import encode_messages

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

# The tools section for [WEATHER], verbatim from the official encoder.
TOOLS_SECTION = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
    'writing a "<｜DSML｜tool_calls>" block like the following:\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name='
    '"$TOOL_NAME">\n<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>'
    '\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name="$TOOL_NAME2">\n...\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\n'
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, '
    'arrays, objects), pass the value in JSON format and set `string="false"`.\n\nIf thinking_mode is enabled '
    "(triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool "
    "calls or final response.\n\nOtherwise, output directly after </think> with tool calls or final response.\n\n"
    '### Available Tool Schemas\n\n{"name": "get_weather", "description": "Get the weather of a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, '
    '"required": ["city"]}}\n\nYou MUST strictly follow the above defined tool name and parameter schemas to '
    "invoke tool calls.\n"
)

CALLS = [
    {"id": "call_a", "type": "function",
     "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}},
    {"id": "call_b", "type": "function",
     "function": {"name": "search", "arguments": json.dumps(
         {"query": 'a "b"\nc', "flags": [1, True, None], "opts": {"lang": "中文"}, "exact": False})}},
]
DSML_BLOCK = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="search">\n'
    '<｜DSML｜parameter name="query" string="true">a "b"\nc</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="flags" string="false">[1, true, null]</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="opts" string="false">{"lang": "中文"}</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="exact" string="false">false</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)
# Results arrive in the opposite order of the calls; the prompt orders them by call.
TOOL_TURN = [
    {"role": "user", "content": "Go"},
    {"role": "assistant", "reasoning_content": "Need tools.", "content": "Checking.", "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_b", "content": "B-result"},
    {"role": "tool", "tool_call_id": "call_a", "content": "A-result"},
]


def test_tools_section_follows_system_text():
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    expected = (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.\n\n" + TOOLS_SECTION
        + "<｜User｜>Weather in Paris?<｜Assistant｜></think>"
    )
    assert encode_messages(msgs, "chat", tools=[WEATHER]) == expected
    # Same as tools carried by the system message itself (the official input form).
    msgs[0]["tools"] = [WEATHER]
    assert encode_messages(msgs, "chat") == expected


def test_tools_without_system_message():
    out = encode_messages([{"role": "user", "content": "Weather in Paris?"}], "chat", tools=[WEATHER])
    assert out == "<｜begin▁of▁sentence｜>\n\n" + TOOLS_SECTION + "<｜User｜>Weather in Paris?<｜Assistant｜></think>"


def test_tools_keep_earlier_reasoning():
    conv = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    # drop_thinking=True is overridden because tools are present.
    assert encode_messages(conv, "thinking", tools=[WEATHER], drop_thinking=True) == (
        "<｜begin▁of▁sentence｜>S\n\n" + TOOLS_SECTION
        + "<｜User｜>Q1<｜Assistant｜><think>R1</think>A1<｜end▁of▁sentence｜><｜User｜>Q2<｜Assistant｜><think>"
    )


def test_dsml_calls_and_ordered_results_thinking():
    out = encode_messages([{"role": "system", "content": "S"}, *TOOL_TURN], "thinking", tools=[WEATHER])
    assert out == (
        "<｜begin▁of▁sentence｜>S\n\n" + TOOLS_SECTION
        + "<｜User｜>Go<｜Assistant｜><think>Need tools.</think>Checking." + DSML_BLOCK + "<｜end▁of▁sentence｜>"
        + "<｜User｜><tool_result>A-result</tool_result>\n\n<tool_result>B-result</tool_result><｜Assistant｜><think>"
    )


def test_results_merge_with_following_user_text_chat():
    msgs = [{"role": "system", "content": "S"}, *TOOL_TURN, {"role": "user", "content": "Thanks"}]
    assert encode_messages(msgs, "chat", tools=[WEATHER]) == (
        "<｜begin▁of▁sentence｜>S\n\n" + TOOLS_SECTION
        + "<｜User｜>Go<｜Assistant｜></think>Checking." + DSML_BLOCK + "<｜end▁of▁sentence｜>"
        + "<｜User｜><tool_result>A-result</tool_result>\n\n<tool_result>B-result</tool_result>\n\nThanks"
        + "<｜Assistant｜></think>"
    )


def test_dict_arguments_render_like_json_strings():
    as_dicts = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in CALLS]
    turn = [TOOL_TURN[0], {**TOOL_TURN[1], "tool_calls": as_dicts}, *TOOL_TURN[2:]]
    assert encode_messages(turn, "thinking", tools=[WEATHER]) == encode_messages(TOOL_TURN, "thinking",
                                                                                 tools=[WEATHER])


def test_single_call_result_needs_no_id():
    # As in the official fixtures: one call, one result, no ids at all.
    msgs = [
        {"role": "user", "content": "Go"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "cold"},
    ]
    assert encode_messages(msgs, "chat").endswith(
        "</｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>cold</tool_result><｜Assistant｜></think>"
    )


@pytest.mark.parametrize("tail, match", [
    ([{"role": "tool", "tool_call_id": "call_zzz", "content": "x"}],
     r"messages\[2\]\.tool_call_id: 'call_zzz' matches none of the preceding calls"),
    ([{"role": "tool", "content": "x"}], r"messages\[2\]\.tool_call_id: required when .* 2 calls"),
    ([{"role": "tool", "tool_call_id": "call_a", "content": "x"}, {"role": "tool", "tool_call_id": "call_a",
                                                                     "content": "y"}], r"messages\[2\]"),
    ([{"role": "tool", "tool_call_id": "call_a"}], r"messages\[2\]\.content: missing content"),
])
def test_bad_tool_results(tail, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(TOOL_TURN[:2] + tail, "chat")


def test_tool_result_without_any_call():
    msgs = [{"role": "user", "content": "Go"}, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]
    with pytest.raises(ValueError, match=r"messages\[1\]\.tool_call_id: tool result 'call_1' follows no"):
        encode_messages(msgs, "chat")


def test_bad_tool_call():
    bad = [{"role": "user", "content": "Go"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]
    with pytest.raises(ValueError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.name"):
        encode_messages(bad, "chat")
    bad[1]["tool_calls"] = [{"function": {"name": "f", "arguments": "[1, 2]"}}]
    with pytest.raises(ValueError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"):
        encode_messages(bad, "chat")
