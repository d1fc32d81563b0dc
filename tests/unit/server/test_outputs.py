"""Delta-to-chunk / event translation, fed with crafted engine outputs (what a random dummy model never emits):
DSML tool calls split at every boundary, `</think>`, stop sequences; OpenAI chunks and Anthropic events."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")

from ascend_v4.runtime.engine import StepOutput  # noqa: E402
from ascend_v4.server.anthropic_routes import BlockStream, message_response  # noqa: E402
from ascend_v4.server.openai_routes import chat_chunks, chat_response, usage_of  # noqa: E402
from ascend_v4.server.outputs import OutputTracker  # noqa: E402
from ascend_v4.server.render import Thinking, tool_choice_prefix  # noqa: E402

CALL = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')


def outputs(text: str, cuts: list[int], *, finish="stop", stop_reason=None, prompt=7, cached=3, ids_of=None):
    """StepOutputs carrying `text` split at `cuts`; token ids = one per piece unless ids_of gives them."""
    bounds = [0, *sorted(set(cuts)), len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    outs, n = [], 0
    for k, p in enumerate(pieces):
        ids = ids_of(p) if ids_of else [1000 + k]
        n += len(ids)
        last = k == len(pieces) - 1
        outs.append(StepOutput("r", ids, p, last, finish if last else None, stop_reason if last else None, [],
                               prompt, cached, n))
    return outs


def run(tracker: OutputTracker, outs):
    return [tracker.feed(o) for o in outs]


@pytest.mark.parametrize("seed", range(12))
def test_dsml_split_anywhere_never_leaks_and_parses(seed):
    text = "Let me check.\n\n" + CALL
    rng = random.Random(seed)
    cuts = rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 40)))
    t = OutputTracker(chat=True, thinking=False, tools_enabled=True)
    deltas = run(t, outputs(text, cuts))
    content = "".join(d.content for d in deltas)
    assert content == "Let me check."
    assert all("DSML" not in d.content and "<｜" not in d.content for d in deltas)
    calls = [c for d in deltas for _, c in d.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris", "days": 3})]
    assert t.openai_finish_reason() == "tool_calls" and t.anthropic_stop() == ("tool_use", None)


def test_every_single_character_split():
    text = "ok\n\n" + CALL
    t = OutputTracker(chat=True, tools_enabled=True)
    deltas = run(t, outputs(text, list(range(1, len(text)))))
    assert "".join(d.content for d in deltas) == "ok"
    assert len([c for d in deltas for c in d.tool_calls]) == 1


def test_thinking_split_and_reasoning_tokens(tokenizer):
    text = "step one, step two</think>The answer is 4."
    t = OutputTracker(chat=True, thinking=True, think_end_id=tokenizer.encode("</think>")[0])
    pieces_ids = tokenizer.encode
    cuts = [5, 14, 18, 26, 30]  # </think> arrives as one piece (one token), as the model emits it
    deltas = run(t, outputs(text, cuts, ids_of=pieces_ids))
    assert "".join(d.reasoning for d in deltas) == "step one, step two"
    assert "".join(d.content for d in deltas) == "The answer is 4."
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not d.reasoning for d in deltas[first_content:])  # reasoning strictly before content
    # reasoning tokens = tokens up to and including </think> (exact: counted on ids)
    ids = [i for d in outputs(text, cuts, ids_of=pieces_ids) for i in d.new_token_ids]
    assert t.reasoning_tokens == ids.index(tokenizer.encode("</think>")[0]) + 1
    assert t.reasoning_content == "step one, step two" and t.content == "The answer is 4."


def test_thinking_cut_by_max_tokens_is_all_reasoning():
    t = OutputTracker(chat=True, thinking=True, think_end_id=128822)
    run(t, outputs("still thinking", [3, 8], finish="length"))
    assert t.reasoning_content == "still thinking" and t.content == ""
    assert t.openai_finish_reason() == "length" and t.anthropic_stop() == ("max_tokens", None)
    assert t.reasoning_tokens == t.completion_tokens == 3


def test_tools_disabled_still_cuts_markup():
    t = OutputTracker(chat=True, tools_enabled=False)
    deltas = run(t, outputs("hi\n\n" + CALL, [3, 9, 20]))
    assert "".join(d.content for d in deltas) == "hi" and not any(d.tool_calls for d in deltas)
    assert t.openai_finish_reason() == "stop"


def test_forced_prefix_for_named_tool_choice():
    prefix = tool_choice_prefix({"type": "function", "function": {"name": "get_weather"}}, ["get_weather"],
                                Thinking(False, None))
    assert prefix.endswith('<｜DSML｜invoke name="get_weather">\n')
    rest = CALL[len(prefix.removeprefix("\n\n")):]
    t = OutputTracker(chat=True, tools_enabled=True, forced_prefix=prefix)
    deltas = run(t, outputs(rest, [4, 30, 60]))
    assert not any(d.content for d in deltas)
    assert [c.name for d in deltas for _, c in d.tool_calls] == ["get_weather"]


def test_stop_sequence_mapping():
    t = OutputTracker(chat=True)
    run(t, outputs("one two", [3], stop_reason="END"))
    assert t.openai_finish_reason() == "stop" and t.anthropic_stop() == ("stop_sequence", "END")
    t = OutputTracker(chat=True)
    run(t, outputs("one two", [3], stop_reason=None))
    assert t.anthropic_stop() == ("end_turn", None)


def test_openai_chunks_order_and_usage(tokenizer):
    text = "why</think>Because.\n\n" + CALL
    t = OutputTracker(chat=True, thinking=True, tools_enabled=True, think_end_id=128822)
    chunks = []
    for o in outputs(text, [2, 5, 9, 14, 25, 60, 100]):
        chunks += chat_chunks("id", 0, "m", 0, t.feed(o), t, tokenizer, logprobs=False)
    kinds = []
    for c in chunks:
        d = c.choices[0].delta
        kinds += [k for k in ("reasoning_content", "content", "tool_calls") if getattr(d, k)]
    assert kinds == sorted(kinds, key=["reasoning_content", "content", "tool_calls"].index)  # never interleaved back
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    call = next(c for c in chunks if c.choices[0].delta.tool_calls).choices[0].delta.tool_calls[0]
    assert call.index == 0 and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    u = usage_of([t])
    assert (u.prompt_tokens, u.prompt_cache_hit_tokens, u.prompt_cache_miss_tokens) == (7, 3, 4)
    assert u.prompt_tokens_details.cached_tokens == 3 and u.total_tokens == 7 + t.completion_tokens
    resp = chat_response("id", 0, "m", [t], tokenizer, logprobs=False)
    m = resp.choices[0].message
    assert m.content == "Because." and m.reasoning_content == "why" and m.tool_calls[0].function.name == "get_weather"


def test_anthropic_block_events():
    text = "hmm</think>Sure.\n\n" + CALL
    t = OutputTracker(chat=True, thinking=True, tools_enabled=True, think_end_id=128822)
    blocks, events = BlockStream(), []
    for o in outputs(text, [1, 3, 7, 12, 40]):
        events += blocks.feed(t.feed(o))
    events += blocks.finish()
    seq = [(name, d.get("index"), d.get("content_block", d.get("delta", {})).get("type")) for name, d in events]
    assert seq[0] == ("content_block_start", 0, "thinking")
    assert ("content_block_delta", 0, "signature_delta") in seq
    assert seq.index(("content_block_delta", 0, "signature_delta")) == seq.index(("content_block_stop", 0, None)) - 1
    assert ("content_block_start", 1, "text") in seq and ("content_block_start", 2, "tool_use") in seq
    js = "".join(d["delta"]["partial_json"] for n, d in events if d.get("delta", {}).get("type") == "input_json_delta")
    assert json.loads(js) == {"city": "Paris", "days": 3}
    assert seq[-1] == ("content_block_stop", 2, None)
    msg = message_response("msg_1", "m", t, 7)
    assert [b["type"] for b in msg.content] == ["thinking", "text", "tool_use"]
    assert msg.stop_reason == "tool_use" and msg.usage.input_tokens == 4 and msg.usage.cache_read_input_tokens == 3


def test_anthropic_empty_output_has_no_block():
    # as Anthropic's API: an empty reply is `content: []` (no content_block events), never an empty text block
    blocks = BlockStream()
    assert blocks.finish() == []
