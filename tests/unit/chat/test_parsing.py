"""Completion parsing: reasoning / content / DSML tool calls, in one piece and streamed.

Expected results for well-formed completions were checked against the official
`parse_message_from_completion_text`; the tolerant cases (missing </think>, no EOS, cut-off tool calls,
bad JSON) are where we deliberately differ from its asserts.
"""

import json
import random

import pytest

from ascend_v4.chat import ParsedMessage, StreamingParser, ToolCall, encode_messages, parse_completion

EOS = "<｜end▁of▁sentence｜>"


def ids(i: int) -> str:
    return f"call_{i}"


WEATHER_COMPLETION = (  # the first assistant turn of the official test fixture 1
    "The user wants to know the weather in Beijing. I should use the get_weather tool.</think>\n\n"
    "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
    '<｜DSML｜parameter name="location" string="true">Beijing</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="unit" string="true">celsius</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
)
TYPED_COMPLETION = (
    "Let me look.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"search\">\n"
    '<｜DSML｜parameter name="query" string="true">a "b"\n  c</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="digits" string="true">123</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="n" string="false">5</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="flags" string="false">[1, true, null, 2.5]</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="opts" string="false">{"lang": "中文"}</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"noop\">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
)


def test_thinking_completion():
    out = parse_completion("Simple arithmetic.</think>2 + 2 = 4." + EOS, thinking=True)
    assert out == ParsedMessage("Simple arithmetic.", "2 + 2 = 4.", [])


def test_chat_completion():
    assert parse_completion("Hello there." + EOS, thinking=False) == ParsedMessage(None, "Hello there.", [])
    assert parse_completion("No EOS at all", thinking=False) == ParsedMessage(None, "No EOS at all", [])


def test_missing_think_end_means_all_reasoning():
    assert parse_completion("still thinking about it", thinking=True) == ParsedMessage("still thinking about it", "")
    assert parse_completion("cut" + EOS + "junk", thinking=True) == ParsedMessage("cut", "")


def test_tool_call_of_official_fixture():
    out = parse_completion(WEATHER_COMPLETION, thinking=True, make_id=ids)
    assert out.reasoning_content.startswith("The user wants") and out.content == ""
    assert out.tool_calls == [ToolCall("get_weather", {"location": "Beijing", "unit": "celsius"}, "call_0")]


def test_string_and_json_parameters():
    out = parse_completion(TYPED_COMPLETION, thinking=False, make_id=ids)
    assert out.content == "Let me look."
    assert out.tool_calls == [
        ToolCall("search", {"query": 'a "b"\n  c', "digits": "123", "n": 5, "flags": [1, True, None, 2.5],
                            "opts": {"lang": "中文"}}, "call_0"),
        ToolCall("noop", {}, "call_1"),
    ]
    assert out.tool_calls[0].to_openai()["function"]["arguments"] == (
        '{"query": "a \\"b\\"\\n  c", "digits": "123", "n": 5, "flags": [1, true, null, 2.5], "opts": {"lang": "中文"}}'
    )


def test_invalid_json_value_keeps_raw_arguments():
    text = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="s" string="true">x'
            '</｜DSML｜parameter>\n<｜DSML｜parameter name="v" string="false">{oops</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    (call,) = parse_completion(text, thinking=False).tool_calls
    assert call.arguments == '{"s": "x", "v": {oops}' and call.arguments_json() == call.arguments


def test_tolerated_malformations():
    head = 'r</think>Answer.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="a">\n</｜DSML｜invoke>\n'
    # Cut off inside the second invoke (max_tokens): the complete one survives.
    out = parse_completion(head + '<｜DSML｜invoke name="b">\n<｜DSML｜parameter name="x" string="tr', thinking=True,
                           make_id=ids)
    assert (out.content, [c.name for c in out.tool_calls]) == ("Answer.", ["a"])
    # Text after the block is ignored; invokes without the block wrapper still parse.
    out = parse_completion(head + "</｜DSML｜tool_calls>trailing" + EOS, thinking=True)
    assert [c.name for c in out.tool_calls] == ["a"]
    out = parse_completion('Hi <｜DSML｜invoke name="z">\n</｜DSML｜invoke>', thinking=False)
    assert (out.content, [c.name for c in out.tool_calls]) == ("Hi ", ["z"])
    # An invoke without a name is skipped.
    assert parse_completion("<｜DSML｜tool_calls>\n<｜DSML｜invoke>\n</｜DSML｜invoke>", thinking=False).tool_calls == []


def test_default_ids_are_unique():
    out = parse_completion(TYPED_COMPLETION, thinking=False)
    a, b = (c.id for c in out.tool_calls)
    assert a.startswith("call_") and b.startswith("call_") and a != b


@pytest.mark.parametrize("thinking", [True, False])
def test_render_parse_round_trip(thinking):
    assistant = {
        "role": "assistant",
        "content": "I will check both.",
        "tool_calls": [
            {"id": "call_0", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}},
            {"id": "call_1", "type": "function",
             "function": {"name": "search", "arguments": '{"query": "x\\ny", "strict": true, "tags": ["a"]}'}},
        ],
    }
    if thinking:
        assistant["reasoning_content"] = "Two tools are needed."
    mode = "thinking" if thinking else "chat"
    prompt = encode_messages([{"role": "user", "content": "Weather?"}, assistant], mode)
    prefix = "<｜Assistant｜>" + ("<think>" if thinking else "</think>")
    completion = prompt[prompt.index(prefix) + len(prefix):]
    assert parse_completion(completion, thinking=thinking, make_id=ids).to_message() == assistant


STREAM_CASES = [
    ("Simple arithmetic.</think>2 + 2 = 4." + EOS, True),
    (WEATHER_COMPLETION, True),
    (TYPED_COMPLETION, False),
    ("r</think>line\n\nnext\n\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n", True),
    ("a < b and <｜ not DSML, </thi not think", False),
    ("thinking about <｜DSML｜tool_calls> inside reasoning", True),
    ("r</think>ends with partial <｜DS", True),
    ("r</think>ends with blank\n\n", True),
    ("r</think>x" + EOS + "<｜DSML｜tool_calls>ignored", True),
    ("", True),
    ('Hi <｜DSML｜invoke name="z">\n</｜DSML｜invoke>', False),
]


def run_stream(text: str, thinking: bool, chunks: list[str]):
    parser = StreamingParser(thinking=thinking, make_id=ids)
    events = [e for c in chunks for e in parser.feed(c)] + parser.finish()
    return parser, events


@pytest.mark.parametrize("text, thinking", STREAM_CASES)
def test_streaming_char_by_char_matches_batch(text, thinking):
    batch = parse_completion(text, thinking=thinking, make_id=ids)
    parser, events = run_stream(text, thinking, list(text))
    assert parser.message == batch
    kinds = [e.kind for e in events]
    assert kinds == sorted(kinds, key=["reasoning", "content", "tool_call"].index)  # reasoning, content, calls
    assert "".join(e.text for e in events if e.kind == "content") == batch.content
    assert "".join(e.text for e in events if e.kind == "reasoning") == (batch.reasoning_content or "")
    assert [e.tool_call for e in events if e.kind == "tool_call"] == batch.tool_calls
    for e in events:
        if e.kind == "content":
            assert "｜DSML｜" not in e.text and "</think>" not in e.text and EOS not in e.text


@pytest.mark.parametrize("text, thinking", STREAM_CASES)
def test_streaming_random_chunks_match_batch(text, thinking):
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert run_stream(text, thinking, chunks)[0].message == parse_completion(text, thinking=thinking, make_id=ids)


def test_streaming_emits_each_call_when_its_invoke_closes():
    parser = StreamingParser(thinking=False, make_id=ids)
    head, rest = TYPED_COMPLETION.split('<｜DSML｜invoke name="noop">')
    events = parser.feed(head)
    assert [e.kind for e in events] == ["content", "tool_call"] and events[1].tool_call.name == "search"
    assert json.loads(events[1].tool_call.arguments_json())["n"] == 5
    assert [e.tool_call.name for e in parser.feed('<｜DSML｜invoke name="noop">' + rest)] == ["noop"]
    assert parser.finish() == []
