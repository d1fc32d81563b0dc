"""Parse V4 completions into reasoning, content and DSML tool calls: in one piece or streamed (model-spec §12.4).

Completion grammar (thinking mode; chat mode has no reasoning part):

    reasoning "</think>" content ["\\n\\n<｜DSML｜tool_calls>\\n" invokes "\\n</｜DSML｜tool_calls>"] [EOS]

Semantics follow the official `parse_message_from_completion_text`, made tolerant because a server must not
fail on model output: a missing `</think>` in thinking mode means everything is reasoning (e.g. the
generation hit max_tokens); text after EOS is ignored; content ends at the first `｜DSML｜` token (with or
without the block wrapper), so markup never reaches content; an incomplete or malformed invoke is dropped;
text after the tool-call block is ignored. Parameters with string="true" are raw strings, string="false"
ones are JSON. `StreamingParser` yields the same result as `parse_completion` however the text is split.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .encoding import DSML, EOS, INVOKE_CLOSE, INVOKE_OPEN, PARAMETER_CLOSE, PARAMETER_OPEN, THINK_END, TOOL_CALLS_CLOSE

_NAME = re.compile(r'\s*name="([^"]*)"\s*>')
_PARAM = re.compile(
    re.escape(PARAMETER_OPEN) + r'\s+name="([^"]*)"\s+string="(true|false)"\s*>(.*?)' + re.escape(PARAMETER_CLOSE),
    re.DOTALL,
)
# Where content stops: the DSML token, optionally preceded by the tag's "<" and the separating blank line.
_CONTENT_TAILS = ("\n\n<" + DSML, "<" + DSML, DSML, EOS)


@dataclass
class ToolCall:
    """One parsed tool call. `arguments` is a dict, or the raw JSON-ish text when a string="false" value
    is not valid JSON (what the official parser would hand on)."""

    name: str
    arguments: dict | str
    id: str

    def arguments_json(self) -> str:
        """Arguments as the JSON string OpenAI clients expect."""
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, ensure_ascii=False)

    def to_openai(self) -> dict:
        """OpenAI `tool_calls` entry; also accepted back by `encode_messages`."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_json()}}


@dataclass
class ParsedMessage:
    """An assistant completion split into parts. `reasoning_content` is None in chat mode."""

    reasoning_content: str | None
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_message(self) -> dict:
        """OpenAI-style assistant message (with `reasoning_content`), ready to pass back to the encoder."""
        msg: dict = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


IdFactory = Callable[[int], str]


def random_call_id(index: int) -> str:
    """Default tool-call id: unique per call, like OpenAI's `call_...` ids."""
    return "call_" + uuid.uuid4().hex[:24]


def parse_invoke(body: str, index: int, make_id: IdFactory = random_call_id) -> ToolCall | None:
    """One invoke from the text between `<｜DSML｜invoke` and `</｜DSML｜invoke>`; None if it has no name."""
    head = _NAME.match(body)
    if head is None:
        return None
    params = _PARAM.findall(body, head.end())
    args: dict = {}
    try:
        for key, is_str, value in params:
            args[key] = value if is_str == "true" else json.loads(value)
        arguments: dict | str = args
    except json.JSONDecodeError:
        # Hand on the official parser's text: raw values spliced into a JSON object.
        arguments = "{" + ", ".join(
            f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False) if s == 'true' else v}"
            for k, s, v in params
        ) + "}"
    return ToolCall(head.group(1), arguments, make_id(index))


def parse_completion(text: str, *, thinking: bool, make_id: IdFactory = random_call_id) -> ParsedMessage:
    """Split a full completion into reasoning, content and tool calls.

    Args:
        text: generated text, decoded with special tokens kept (a trailing EOS string is fine).
        thinking: the prompt ended with `<think>` (thinking mode), so the output starts with reasoning.
        make_id: builds the id of the i-th tool call (default: random `call_...`).
    """
    cut = text.find(EOS)
    if cut != -1:
        text = text[:cut]
    reasoning = None
    if thinking:
        end = text.find(THINK_END)
        if end == -1:
            return ParsedMessage(text, "")
        reasoning, text = text[:end], text[end + len(THINK_END):]
    start = text.find(DSML)
    if start == -1:
        return ParsedMessage(reasoning, text)
    if start > 0 and text[start - 1] == "<":
        start -= 1
    content, section = text[:start].removesuffix("\n\n"), text[start:]

    calls: list[ToolCall] = []
    pos = 0
    while True:
        s, e = section.find(INVOKE_OPEN, pos), section.find(TOOL_CALLS_CLOSE, pos)
        if s == -1 or (e != -1 and e < s):
            break
        c = section.find(INVOKE_CLOSE, s + len(INVOKE_OPEN))
        if c == -1:
            break
        call = parse_invoke(section[s + len(INVOKE_OPEN):c], len(calls), make_id)
        if call is not None:
            calls.append(call)
        pos = c + len(INVOKE_CLOSE)
    return ParsedMessage(reasoning, content, calls)


@dataclass
class StreamEvent:
    """One streaming event: kind "reasoning" / "content" carry `text`; kind "tool_call" carries `tool_call`."""

    kind: str
    text: str = ""
    tool_call: ToolCall | None = None


def _held_suffix(buf: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `buf` that could still grow into one of `markers`."""
    for k in range(min(len(buf), max(map(len, markers))), 0, -1):
        tail = buf[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class StreamingParser:
    """Incremental `parse_completion`: feed text deltas, get events; never emits partial markup.

    Usage: `for delta in stream: events += parser.feed(delta)`, then `events += parser.finish()`.
    A tail that might be the start of `</think>`, `<｜DSML｜...` or EOS is held back until the next delta
    decides it. Tool calls are emitted whole, when their `</｜DSML｜invoke>` arrives. `message` holds the
    result so far; after `finish()` it equals `parse_completion(full_text, ...)`.
    """

    def __init__(self, *, thinking: bool, make_id: IdFactory = random_call_id):
        self._state = "reasoning" if thinking else "content"
        self._buf = ""
        self._scanned = 0  # tools state: buffer length already searched for the invoke close tag
        self._make_id = make_id
        self.message = ParsedMessage("" if thinking else None, "")

    def feed(self, delta: str) -> list[StreamEvent]:
        """Add generated text; return the events it completes."""
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        """End of generation: flush what was held back (it turned out to be plain text)."""
        events = self._drain(final=True)
        self._state, self._buf = "done", ""
        return events

    # Each state consumes what it can from the buffer and either moves on or waits for more text.
    def _drain(self, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        while self._buf and self._state != "done":
            step = getattr(self, "_in_" + self._state)(final, events)
            if not step:
                break
        if self._state == "done":
            self._buf = ""
        return events

    def _emit(self, kind: str, text: str, events: list[StreamEvent]) -> None:
        if not text:
            return
        if kind == "reasoning":
            self.message.reasoning_content = (self.message.reasoning_content or "") + text
        else:
            self.message.content += text
        events.append(StreamEvent(kind, text))

    def _in_reasoning(self, final: bool, events: list[StreamEvent]) -> bool:
        buf = self._buf
        end, eos = buf.find(THINK_END), buf.find(EOS)
        if eos != -1 and (end == -1 or eos < end):
            self._emit("reasoning", buf[:eos], events)
            self._state = "done"
            return False
        if end != -1:
            self._emit("reasoning", buf[:end], events)
            self._buf, self._state = buf[end + len(THINK_END):], "content"
            return True
        keep = 0 if final else _held_suffix(buf, (THINK_END, EOS))
        self._emit("reasoning", buf[: len(buf) - keep], events)
        self._buf = buf[len(buf) - keep:]
        return False

    def _in_content(self, final: bool, events: list[StreamEvent]) -> bool:
        buf = self._buf
        dsml, eos = buf.find(DSML), buf.find(EOS)
        if eos != -1 and (dsml == -1 or eos < dsml):
            self._emit("content", buf[:eos], events)
            self._state = "done"
            return False
        if dsml != -1:
            start = dsml - 1 if dsml > 0 and buf[dsml - 1] == "<" else dsml
            self._emit("content", buf[:start].removesuffix("\n\n"), events)
            self._buf, self._state = buf[start:], "tools"
            return True
        keep = 0 if final else _held_suffix(buf, _CONTENT_TAILS)
        self._emit("content", buf[: len(buf) - keep], events)
        self._buf = buf[len(buf) - keep:]
        return False

    def _in_tools(self, final: bool, events: list[StreamEvent]) -> bool:
        buf = self._buf
        s = buf.find(INVOKE_OPEN)
        # The block's close tag ends parsing only if it comes before the next invoke.
        e = buf.find(TOOL_CALLS_CLOSE, 0, len(buf) if s == -1 else s)
        if e != -1:
            self._state = "done"
            return False
        c = -1
        if s != -1:
            # Resume the close-tag search where the last delta left off: long arguments streamed token by
            # token would otherwise be rescanned from the start each time.
            c = buf.find(INVOKE_CLOSE, max(s + len(INVOKE_OPEN), self._scanned - len(INVOKE_CLOSE)))
        if c == -1:  # wait for the rest of the invoke (or, at the end, drop the incomplete one)
            self._scanned = len(buf) if s != -1 else 0
            if final:
                self._state = "done"
            return False
        call = parse_invoke(buf[s + len(INVOKE_OPEN):c], len(self.message.tool_calls), self._make_id)
        if call is not None:
            self.message.tool_calls.append(call)
            events.append(StreamEvent("tool_call", tool_call=call))
        self._buf, self._scanned = buf[c + len(INVOKE_CLOSE):], 0
        return True
