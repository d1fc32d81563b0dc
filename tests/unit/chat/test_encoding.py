"""Prompt rendering without tools: roles, thinking modes, effort preambles, reasoning dropping, errors.

Every expected prompt below was produced by the official `encoding/encoding_dsv4.py` (April release; the
0731 cases by that file with the 0731 effort table) on the same input and compared with our output.
"""

import pytest

from ascend_v4.chat import ENCODER_0731, encode_messages, render_ids, thinking_options
from ascend_v4.tokenizer import Tokenizer

ABSOLUTE_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking "
    "and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic "
    "against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire "
    "deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis "
    "to ensure absolutely no assumption is left unchecked.\n\n"
)
BEYOND_MAX = (
    "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\nYou MUST reason with the "
    "utmost depth and rigor, leaving absolutely nothing to chance: exhaustively decompose the problem into its "
    "most fundamental components, trace every causal chain to its root, and resolve the underlying cause rather "
    "than any surface symptom.\nDo not stop reasoning until you have independently verified the solution from "
    "multiple angles and are certain that no assumption remains unchecked and no error remains undiscovered.\n\n"
)

CONV = [
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
    {"role": "user", "content": "Q2"},
]


def test_plain_chat():
    out = encode_messages([{"role": "user", "content": "Hello"}], "chat")
    assert out == "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>"


def test_system_and_multi_turn():
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert encode_messages(msgs, "chat") == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hi<｜Assistant｜></think>Hello! How can I help?"
        "<｜end▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜></think>"
    )


def test_think_high_april_has_no_preamble():
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    expected = "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>"
    assert encode_messages(msgs, "thinking") == expected
    assert encode_messages(msgs, "thinking", reasoning_effort="high") == expected


def test_think_max_april_preamble_follows_bos():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    assert encode_messages(msgs, "thinking", reasoning_effort="max") == (
        "<｜begin▁of▁sentence｜>" + ABSOLUTE_MAX + "Be brief.<｜User｜>What is 2+2?<｜Assistant｜><think>"
    )
    # Chat mode ignores the effort.
    assert encode_messages(msgs, "chat", reasoning_effort="max") == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 2+2?<｜Assistant｜></think>"
    )


@pytest.mark.parametrize("effort, preamble", [("low", ""), (None, ""), ("high", ABSOLUTE_MAX), ("max", BEYOND_MAX)])
def test_0731_effort_ladder(effort, preamble):
    out = encode_messages([{"role": "user", "content": "Hi"}], "thinking", reasoning_effort=effort,
                          encoder_version=ENCODER_0731)
    assert out == "<｜begin▁of▁sentence｜>" + preamble + "<｜User｜>Hi<｜Assistant｜><think>"


def test_thinking_levels():
    assert thinking_options("none") == ("chat", None)
    assert thinking_options("high") == ("thinking", "high")
    assert thinking_options("max") == ("thinking", "max")
    with pytest.raises(ValueError, match="thinking level"):
        thinking_options("extreme")


def test_earlier_reasoning_is_dropped():
    assert encode_messages(CONV, "thinking") == (
        "<｜begin▁of▁sentence｜><｜User｜>Q1<｜Assistant｜></think>A1<｜end▁of▁sentence｜>"
        "<｜User｜>Q2<｜Assistant｜><think>"
    )
    # The assistant turn after the last user message keeps its reasoning.
    assert encode_messages(CONV + [{"role": "assistant", "reasoning_content": "R2", "content": "A2"}], "thinking") == (
        "<｜begin▁of▁sentence｜><｜User｜>Q1<｜Assistant｜></think>A1<｜end▁of▁sentence｜>"
        "<｜User｜>Q2<｜Assistant｜><think>R2</think>A2<｜end▁of▁sentence｜>"
    )


def test_reasoning_kept_without_drop():
    assert encode_messages(CONV, "thinking", drop_thinking=False) == (
        "<｜begin▁of▁sentence｜><｜User｜>Q1<｜Assistant｜><think>R1</think>A1<｜end▁of▁sentence｜>"
        "<｜User｜>Q2<｜Assistant｜><think>"
    )


def test_chat_mode_ignores_reasoning():
    assert encode_messages(CONV, "chat") == (
        "<｜begin▁of▁sentence｜><｜User｜>Q1<｜Assistant｜></think>A1<｜end▁of▁sentence｜>"
        "<｜User｜>Q2<｜Assistant｜></think>"
    )


def test_developer_role():
    msgs = [{"role": "system", "content": "S"}, {"role": "developer", "content": "Dev note"}]
    assert encode_messages(msgs, "thinking") == "<｜begin▁of▁sentence｜>S<｜User｜>Dev note<｜Assistant｜><think>"
    # Before the last user turn a developer message is dropped entirely in thinking mode (official rule).
    msgs = [
        {"role": "developer", "content": "Old dev"},
        {"role": "assistant", "reasoning_content": "r", "content": "a"},
        {"role": "user", "content": "New"},
    ]
    assert encode_messages(msgs, "thinking") == (
        "<｜begin▁of▁sentence｜>a<｜end▁of▁sentence｜><｜User｜>New<｜Assistant｜><think>"
    )


def test_latest_reminder():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "latest_reminder", "content": "2026-05-01, Paris"},
        {"role": "user", "content": "Hi"},
    ]
    assert encode_messages(msgs, "chat") == (
        "<｜begin▁of▁sentence｜>S<｜latest_reminder｜>2026-05-01, Paris<｜User｜>Hi<｜Assistant｜></think>"
    )


def test_response_format_section():
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    out = encode_messages([{"role": "user", "content": "JSON please"}], "chat", response_format=schema)
    assert out == (
        "<｜begin▁of▁sentence｜>\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        '{"type": "object", "properties": {"answer": {"type": "string"}}}<｜User｜>JSON please<｜Assistant｜></think>'
    )


def test_misc_official_behaviours():
    hi = [{"role": "user", "content": "Hi"}]
    assert encode_messages(hi, "chat", add_bos=False) == "<｜User｜>Hi<｜Assistant｜></think>"
    # Consecutive user messages form one turn.
    two = [{"role": "user", "content": "A"}, {"role": "user", "content": "B"}]
    assert encode_messages(two, "chat") == "<｜begin▁of▁sentence｜><｜User｜>A\n\nB<｜Assistant｜></think>"
    # wo_eos leaves an assistant prefix open (prefix completion).
    prefix = hi + [{"role": "assistant", "content": "Hel", "wo_eos": True}]
    assert encode_messages(prefix, "chat") == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>Hel"
    # Quick-instruction task token.
    task = [{"role": "user", "content": "Weather?", "task": "action"}]
    assert encode_messages(task, "thinking") == (
        "<｜begin▁of▁sentence｜><｜User｜>Weather?<｜Assistant｜><think><｜action｜>"
    )


def test_extensions_over_the_official_encoder():
    # Content given as text parts renders like separate user blocks.
    parts = [{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]}]
    two = [{"role": "user", "content": "A"}, {"role": "user", "content": "B"}]
    assert encode_messages(parts, "chat") == encode_messages(two, "chat")
    # `reasoning` (vLLM's field name) is accepted like `reasoning_content`.
    alias = [CONV[0], {"role": "assistant", "reasoning": "R1", "content": "A1"}, CONV[2]]
    assert encode_messages(alias, "thinking", drop_thinking=False) == encode_messages(CONV, "thinking",
                                                                                      drop_thinking=False)
    # Effort "low" exists only in the 0731 ladder; under April it adds nothing, like "high".
    hi = [{"role": "user", "content": "Hi"}]
    assert encode_messages(hi, "thinking", reasoning_effort="low") == encode_messages(hi, "thinking")


def test_render_ids():
    tok = Tokenizer.default()
    ids = render_ids(tok, [{"role": "user", "content": "Hello"}], "chat")
    assert ids == [0, 128803, *tok.encode("Hello"), 128804, 128822]
    ids = render_ids(tok, [{"role": "user", "content": "Hello"}], "thinking", add_bos=False)
    assert ids == [128803, *tok.encode("Hello"), 128804, 128821]


@pytest.mark.parametrize("msgs, match", [
    ([{"role": "wizard", "content": "x"}], r"messages\[0\]\.role: unknown role 'wizard'"),
    ([{"role": "system", "content": "s"}, {"role": "user"}], r"messages\[1\]\.content: missing content"),
    ([{"role": "user", "content": None}], r"messages\[0\]\.content"),
    ([{"role": "developer", "content": ""}], r"messages\[0\]\.content: missing content"),
    ([{"role": "latest_reminder"}], r"messages\[0\]\.content: missing content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], r"messages\[0\]\.content"),
    ([{"role": "user", "content": "x", "task": "dance"}], r"messages\[0\]\.task"),
    ([{"role": "user", "content": "x", "tools": [{"type": "function"}]}], r"messages\[0\]\.tools"),
    ("not a list of dicts", r"messages\[0\]"),
])
def test_bad_messages(msgs, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(msgs, "chat")


def test_bad_options():
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages(hi, "think")
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages(hi, "thinking", reasoning_effort="medium")
    with pytest.raises(ValueError, match="encoder_version"):
        encode_messages(hi, "thinking", encoder_version="v9")
