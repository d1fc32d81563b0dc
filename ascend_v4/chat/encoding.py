"""DeepSeek-V4 prompt renderer: OpenAI-style messages -> prompt text (model-spec §12).

V4 ships no Jinja template; the reference is the official `encoding/encoding_dsv4.py` of the HF repos
`deepseek-ai/DeepSeek-V4-{Flash,Pro}`. This is our own implementation of its grammar; the prompt constants
below (role tokens, effort preambles, tools-section wording, DSML tags) are the model's trained format and
are byte-identical to the official file. Expected strings in tests/unit/chat were checked against it.

    prompt    = [BOS] [effort preamble] turn*
    system    = text ["\\n\\n" tools section] ["\\n\\n" response-format section]        (no role token)
    developer = <｜User｜> text [tools] [response format]
    user      = <｜User｜> block ("\\n\\n" block)*        block = text | <tool_result>...</tool_result>
    assistant = [reasoning </think>] content ["\\n\\n" DSML tool calls] <｜end▁of▁sentence｜>
    after the last user/developer turn (or one followed by an assistant turn): <｜Assistant｜> + <think> | </think>

Encoder versions: the original (April) encoder adds a preamble only for effort "max" ("Absolute
maximum ..."). The 0731 encoder (V4-Flash-0731 / V4-Pro-0813) shifts the ladder down one: "high" gets the
April "max" text and "max" gets a new "Beyond maximum ..." text (model-spec §12.3). Choose with
`encoder_version`; the default is the April ladder of the original V4 checkpoints.

Extensions over the official encoder (it accepts less): request-level `tools` / `response_format`
arguments, content given as a list of text parts, tool-call arguments given as a dict, `reasoning` as an
alias of `reasoning_content`, effort "low" under the April ladder (no preamble), and ValueErrors naming the
offending message instead of asserts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ascend_v4.tokenizer import Tokenizer

# ---- special-token strings (ids in model-spec §11) -------------------------------------------------------
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

# DSML tags of an assistant tool-call block (model-spec §12.4).
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_OPEN = f"<{DSML}parameter"
PARAMETER_CLOSE = f"</{DSML}parameter>"

# Quick-instruction tasks: a message's "task" puts this token where the generation prefix would go.
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

# ---- reasoning-effort preambles (placed right after BOS in thinking mode) ----------------------------------
EFFORT_ABSOLUTE_MAXIMUM = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
EFFORT_BEYOND_MAXIMUM = (
    "Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively "
    "decompose the problem into its most fundamental components, trace every causal chain to its root, and "
    "resolve the underlying cause rather than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple angles and are "
    "certain that no assumption remains unchecked and no error remains undiscovered.\n\n"
)

ENCODER_APRIL = "april"  # original DeepSeek-V4-Flash / V4-Pro
ENCODER_0731 = "0731"  # DeepSeek-V4-Flash-0731, V4-Pro-0813
EFFORT_PREAMBLES: dict[str, dict[str | None, str]] = {
    ENCODER_APRIL: {None: "", "low": "", "high": "", "max": EFFORT_ABSOLUTE_MAXIMUM},
    ENCODER_0731: {None: "", "low": "", "high": EFFORT_ABSOLUTE_MAXIMUM, "max": EFFORT_BEYOND_MAXIMUM},
}

# Our --thinking levels -> (thinking_mode, reasoning_effort); the preamble then depends on the encoder version.
THINKING_LEVELS: dict[str, tuple[str, str | None]] = {
    "none": ("chat", None),
    "low": ("thinking", "low"),
    "high": ("thinking", "high"),
    "max": ("thinking", "max"),
}

# ---- system-prompt sections --------------------------------------------------------------------------------
# Verbatim prompt text (only split into pieces to fit the line length); @SCHEMAS@ is replaced by one JSON
# object per tool, one per line.
_TOOLS_SECTION = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    '"<｜DSML｜tool_calls>" block like the following:\n\n'
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>\n'
    "...\n"
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="$TOOL_NAME2">\n'
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "@SCHEMAS@\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)
_RESPONSE_FORMAT_SECTION = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

_ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")


def thinking_options(level: str) -> tuple[str, str | None]:
    """Map a `--thinking none|low|high|max` level onto `(thinking_mode, reasoning_effort)`."""
    try:
        return THINKING_LEVELS[level]
    except KeyError:
        raise ValueError(f"thinking level must be one of {sorted(THINKING_LEVELS)}, got {level!r}") from None


def to_json(value: Any) -> str:
    """JSON exactly as the official encoder writes it (", " / ": " separators, non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


def render_tools_section(tools: list[dict]) -> str:
    """The '## Tools' section for OpenAI-style tool specs ({"type": "function", "function": {...}})."""
    schemas = "\n".join(to_json(t.get("function", t)) for t in tools)
    return _TOOLS_SECTION.replace("@SCHEMAS@", schemas)


def render_response_format_section(response_format: Any) -> str:
    """The '## Response Format:' section carrying a JSON schema (or any JSON value)."""
    return _RESPONSE_FORMAT_SECTION + to_json(response_format)


def render_tool_calls(calls: list[tuple[str, dict]]) -> str:
    """DSML block for (name, arguments) pairs, preceded by the blank line that separates it from content.

    String values are written raw with string="true"; every other value as JSON with string="false".
    """
    invokes = []
    for name, arguments in calls:
        params = "\n".join(
            f'{PARAMETER_OPEN} name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
            f"{value if isinstance(value, str) else to_json(value)}{PARAMETER_CLOSE}"
            for key, value in arguments.items()
        )
        invokes.append(f'{INVOKE_OPEN} name="{name}">\n{params}\n{INVOKE_CLOSE}')
    return "\n\n" + TOOL_CALLS_OPEN + "\n" + "\n".join(invokes) + "\n" + TOOL_CALLS_CLOSE


@dataclass
class _Turn:
    """One rendered unit after tool results are merged into user turns. `src` = index in the input list."""

    role: str
    src: int
    text: str = ""
    blocks: list[str] = field(default_factory=list)  # user turns: text and <tool_result> blocks
    result_order: list[int | None] = field(default_factory=list)  # per block: call index of a tool result
    tools: list[dict] | None = None
    response_format: Any = None
    reasoning: str = ""
    calls: list[tuple[str, dict]] = field(default_factory=list)
    task: str | None = None
    wo_eos: bool = False


def encode_messages(
    messages: list[dict],
    thinking_mode: str = "chat",
    *,
    reasoning_effort: str | None = None,
    tools: list[dict] | None = None,
    drop_thinking: bool = True,
    add_bos: bool = True,
    response_format: Any = None,
    encoder_version: str = ENCODER_APRIL,
) -> str:
    """Render a conversation into V4 prompt text (special tokens as strings; tokenize with `Tokenizer.encode`).

    Args:
        messages: OpenAI-style dicts. Roles: system, developer, user, assistant (content, reasoning_content or
            reasoning, tool_calls), tool (content, tool_call_id), latest_reminder. Optional per-message keys
            of the official encoder: `tools` / `response_format` (system, developer), `task`, `wo_eos`.
        thinking_mode: "chat" (prompt ends `<｜Assistant｜></think>`) or "thinking" (ends `<think>`).
        reasoning_effort: None, "low", "high" or "max"; only thinking mode uses it (see `encoder_version`).
        tools: request-level OpenAI tool specs, attached to the leading system/developer message (replacing
            its own `tools`) or to a new empty system message.
        drop_thinking: drop reasoning of assistant turns before the last user turn. Forced off when any
            message carries tools, because tool-calling exchanges must keep their reasoning.
        add_bos: start with `<｜begin▁of▁sentence｜>`.
        response_format: JSON schema for the response-format section, attached like `tools`.
        encoder_version: ENCODER_APRIL ("april") or ENCODER_0731 ("0731"): which effort-preamble ladder.

    Raises:
        ValueError: unknown role, missing content, a tool result that matches no call, bad options. The
            message names the offending `messages[i].field`.
    """
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    if encoder_version not in EFFORT_PREAMBLES:
        raise ValueError(f"encoder_version must be one of {sorted(EFFORT_PREAMBLES)}, got {encoder_version!r}")
    ladder = EFFORT_PREAMBLES[encoder_version]
    if reasoning_effort not in ladder:
        raise ValueError(f"reasoning_effort must be None, 'low', 'high' or 'max', got {reasoning_effort!r}")
    thinking = thinking_mode == "thinking"

    turns = _to_turns(messages)
    _attach_request_fields(turns, tools, response_format)
    # The official rule: any tools anywhere keep all reasoning (model-spec §17 item 15).
    drop = drop_thinking and not any(t.tools for t in turns)
    if thinking and drop:
        turns = _drop_old_reasoning(turns)
    last_user = max((i for i, t in enumerate(turns) if t.role in ("user", "developer")), default=-1)

    out = [BOS] if add_bos else []
    if thinking and turns:
        out.append(ladder[reasoning_effort])
    for i, turn in enumerate(turns):
        keep_reasoning = thinking and (not drop or i > last_user) and not (i > 0 and turns[i - 1].task)
        out.append(_render_turn(turn, keep_reasoning))
        nxt = turns[i + 1].role if i + 1 < len(turns) else None
        if nxt not in (None, "assistant", "latest_reminder"):
            continue
        if turn.task is not None:
            if turn.task == "action":
                out.append(ASSISTANT + (THINK_BEGIN if thinking else THINK_END))
            out.append(TASK_TOKENS[turn.task])
        elif turn.role in ("user", "developer"):
            think_now = thinking and (not drop or i >= last_user)
            out.append(ASSISTANT + (THINK_BEGIN if think_now else THINK_END))
    return "".join(out)


def render_ids(tokenizer: Tokenizer, messages: list[dict], thinking_mode: str = "chat", **kwargs: Any) -> list[int]:
    """`encode_messages(...)` tokenized: the prompt's token ids (BOS included unless add_bos=False)."""
    return tokenizer.encode(encode_messages(messages, thinking_mode, **kwargs))


# ---- internals -----------------------------------------------------------------------------------------------
def _render_turn(t: _Turn, keep_reasoning: bool) -> str:
    if t.role in ("system", "developer"):
        s = (USER if t.role == "developer" else "") + t.text
        if t.tools:
            s += "\n\n" + render_tools_section(t.tools)
        if t.response_format:
            s += "\n\n" + render_response_format_section(t.response_format)
        return s
    if t.role == "user":
        return USER + "\n\n".join(t.blocks)
    if t.role == "latest_reminder":
        return LATEST_REMINDER + t.text
    # assistant
    s = (t.reasoning + THINK_END if keep_reasoning else "") + t.text
    if t.calls:
        s += render_tool_calls(t.calls)
    return s if t.wo_eos else s + EOS


def _text_of(value: Any, where: str, required: bool = True, parts_sep: str = "\n\n") -> str:
    """A message's text: a string, or a list of {"type": "text"} parts joined like the official blocks."""
    if isinstance(value, str):
        return value
    if value is None and not required:
        return ""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}: only text parts are supported, got {part!r:.80}")
            texts.append(part["text"])
        return parts_sep.join(texts)
    raise ValueError(f"{where}: expected a string or a list of text parts, got {value!r:.80}")


def _tool_result_text(value: Any, where: str) -> str:
    # Official behaviour for list content of a tool result: text parts joined by blank lines,
    # other parts replaced by a marker rather than rejected.
    if isinstance(value, list):
        return "\n\n".join(
            p.get("text", "") if p.get("type") == "text" else f"[Unsupported {p.get('type')}]"
            for p in value
            if isinstance(p, dict)
        )
    return _text_of(value, where)


def _parse_calls(raw: Any, where: str) -> tuple[list[tuple[str, dict]], list[str | None]]:
    """OpenAI tool_calls -> [(name, arguments dict)] and their ids."""
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        raise ValueError(f"{where}: expected a list, got {raw!r:.80}")
    calls, ids = [], []
    for k, call in enumerate(raw):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}[{k}].function.name: missing tool name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = {"arguments": args}  # the official fallback for unparsable argument strings
        if not isinstance(args, dict):
            raise ValueError(f"{where}[{k}].function.arguments: must be a JSON object, got {args!r:.80}")
        calls.append((fn["name"], args))
        ids.append(call.get("id") or fn.get("id") or None)
    return calls, ids


def _to_turns(messages: list[dict]) -> list[_Turn]:
    """Validate messages and merge tool results (and consecutive user messages) into user turns."""
    turns: list[_Turn] = []
    call_ids: list[str | None] | None = None  # ids of the latest assistant message that made calls
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}]: expected a dict, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in _ROLES:
            raise ValueError(f"messages[{i}].role: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        where = f"messages[{i}]"
        task = msg.get("task")
        if task is not None and task not in TASK_TOKENS:
            raise ValueError(f"{where}.task: unknown task {task!r} (expected one of {', '.join(TASK_TOKENS)})")
        if msg.get("tools") and role not in ("system", "developer"):
            raise ValueError(f"{where}.tools: tools can only be attached to system or developer messages")
        prev = turns[-1] if turns else None

        if role == "tool":
            if "content" not in msg:
                raise ValueError(f"{where}.content: missing content")
            text = _tool_result_text(msg["content"], f"{where}.content")
            order = _match_call(msg.get("tool_call_id"), call_ids, where)
            block = f"<tool_result>{text}</tool_result>"
            if prev is not None and prev.role == "user":
                prev.blocks.append(block)
                prev.result_order.append(order)
            else:
                turns.append(_Turn("user", i, blocks=[block], result_order=[order]))
        elif role == "user":
            if "content" not in msg:
                raise ValueError(f"{where}.content: missing content")
            parts = msg["content"] if isinstance(msg["content"], list) else [msg["content"]]
            blocks = [_text_of(p if isinstance(p, str) else [p], f"{where}.content") for p in parts]
            # Like the official encoder: a user message right after a user turn joins it, unless that
            # turn carries a task (whose token must follow it directly).
            if prev is not None and prev.role == "user" and prev.task is None:
                if task is not None:  # the official merge would silently lose it
                    raise ValueError(f"{where}.task: this message merges into the user turn before it and "
                                     "cannot carry a task")
                prev.blocks += blocks
                prev.result_order += [None] * len(blocks)
            else:
                turns.append(_Turn("user", i, blocks=blocks, result_order=[None] * len(blocks), task=task))
        elif role == "assistant":
            calls, ids = _parse_calls(msg.get("tool_calls"), f"{where}.tool_calls")
            reasoning = msg.get("reasoning_content")
            if reasoning is None:
                reasoning = msg.get("reasoning")  # vLLM's name for the same field
            turns.append(_Turn(
                "assistant", i, text=_text_of(msg.get("content"), f"{where}.content", required=False),
                reasoning=_text_of(reasoning, f"{where}.reasoning_content", required=False),
                calls=calls, task=task, wo_eos=bool(msg.get("wo_eos", False)),
            ))
            if calls:
                call_ids = ids
        else:  # system, developer, latest_reminder
            content = msg.get("content")
            if role != "system" and not content:
                raise ValueError(f"{where}.content: missing content")
            turns.append(_Turn(
                role, i, text=_text_of(content, f"{where}.content", required=False),
                tools=msg.get("tools") or None, response_format=msg.get("response_format"), task=task,
            ))
    for t in turns:
        _sort_results(t)
    return turns


def _match_call(call_id: Any, call_ids: list[str | None] | None, where: str) -> int:
    """Index of the call a tool result answers, in the latest assistant message that made calls."""
    if not call_ids:
        raise ValueError(f"{where}.tool_call_id: tool result {call_id!r} follows no assistant tool call")
    if call_id:
        if call_id in call_ids:
            return call_ids.index(call_id)
        known = ", ".join(repr(c) for c in call_ids)
        raise ValueError(f"{where}.tool_call_id: {call_id!r} matches none of the preceding calls ({known})")
    if len(call_ids) == 1:
        return 0  # a single call needs no id (the official fixtures omit it)
    raise ValueError(f"{where}.tool_call_id: required when the preceding assistant made {len(call_ids)} calls")


def _sort_results(t: _Turn) -> None:
    """Reorder tool results by call order; text blocks keep their positions (official rule)."""
    slots = [k for k, o in enumerate(t.result_order) if o is not None]
    by_call = sorted(slots, key=lambda k: t.result_order[k])  # stable
    seen = [t.result_order[k] for k in by_call]
    if len(set(seen)) != len(seen):
        dup = next(o for o in seen if seen.count(o) > 1)
        raise ValueError(f"messages[{t.src}]: several tool results answer call #{dup} of the preceding assistant")
    blocks = list(t.blocks)
    for slot, k in zip(slots, by_call):
        blocks[slot] = t.blocks[k]
    t.blocks = blocks


def _attach_request_fields(turns: list[_Turn], tools: list[dict] | None, response_format: Any) -> None:
    if not tools and not response_format:
        return
    if not turns or turns[0].role not in ("system", "developer"):
        # A new empty system turn: the sections then follow BOS after a blank line, as the official
        # encoder renders a system message with empty content.
        turns.insert(0, _Turn("system", -1))
    if tools:
        turns[0].tools = list(tools)
    if response_format:
        turns[0].response_format = response_format


def _drop_old_reasoning(turns: list[_Turn]) -> list[_Turn]:
    """Thinking mode with drop_thinking: before the last user turn, assistant turns lose their reasoning and
    developer turns disappear entirely (official behaviour); everything else is kept."""
    last_user = max((i for i, t in enumerate(turns) if t.role in ("user", "developer")), default=-1)
    kept = []
    for i, t in enumerate(turns):
        if i < last_user and t.role == "developer":
            continue
        if i < last_user and t.role == "assistant":
            t.reasoning = ""
        kept.append(t)
    return kept
