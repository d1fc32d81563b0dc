"""From API requests to what the engine takes: thinking mode and effort, the rendered prompt, sampling params.

Shared by the OpenAI and Anthropic routes; both first bring their messages into the OpenAI-style dicts
that `ascend_v4.chat.encode_messages` reads. Every user error is raised as `APIError(400, ...)`.

DeepSeek semantics (serving-notes §1.2, §2):
* thinking is on by default (effort high); `thinking.type`, `chat_template_kwargs.thinking` /
  `enable_thinking` and `reasoning_effort: none` switch it; the aliases `deepseek-chat` /
  `deepseek-reasoner` fix it;
* effort names map onto the encoder's low / high / max as DeepSeek's later docs do (`EFFORT_MAP`);
* `tool_choice` `required` or a named tool is rejected in thinking mode; in chat mode it is honoured by
  forcing the start of the DSML block (the prompt ends with it, the parser is fed it first);
* `--require-reasoning-passback`: an assistant turn with tool calls in the current exchange must carry its
  `reasoning_content` back, else 400 (DeepSeek's rule; off by default because many clients cannot);
* in thinking mode temperature / top_p / presence and frequency penalties are accepted but not applied
  (`thinking_overrides`), unless the server runs with `--honor-sampling-in-thinking`;
* tool parameter schemas must be valid JSON Schemas (`check_tool_schema`, 400 naming the tool).
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator, SchemaError
from jsonschema.validators import validator_for

from ascend_v4.chat.encoding import INVOKE_OPEN, TOOL_CALLS_OPEN, encode_messages
from ascend_v4.runtime.sampling import SamplingParams

from .errors import APIError

# Requested effort -> encoder effort ("later docs" column of serving-notes §1.2); "none" = thinking off.
EFFORT_MAP: dict[str, str | None] = {
    "none": None, "minimal": "low", "low": "low", "medium": "high", "high": "high", "xhigh": "max", "max": "max",
}
DEFAULT_EFFORT = "high"
# Sampling fields that thinking mode fixes (DeepSeek: accepted, no effect), with the values used instead.
THINKING_FIXED_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}

log = logging.getLogger(__name__)


@dataclass
class Thinking:
    enabled: bool
    effort: str | None  # encoder effort (low / high / max) when enabled

    @property
    def mode(self) -> str:
        return "thinking" if self.enabled else "chat"


def resolve_thinking(*, thinking_type: str | None, effort: str | None, template_kwargs: dict[str, Any] | None,
                     forced: bool | None) -> Thinking:
    """Thinking on/off and encoder effort from the request fields. `forced`: the model alias fixes it."""
    enabled = True
    kw = template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kw:
            if not isinstance(kw[key], bool):
                raise APIError(400, f"chat_template_kwargs.{key} must be a boolean", param="chat_template_kwargs")
            enabled = kw[key]
    if effort is None and kw.get("reasoning_effort") is not None:
        effort = kw["reasoning_effort"]
        if effort not in EFFORT_MAP:
            raise APIError(400, f"chat_template_kwargs.reasoning_effort must be one of {', '.join(EFFORT_MAP)}",
                           param="chat_template_kwargs")
    if effort == "none":
        enabled = False
    if thinking_type is not None:
        enabled = thinking_type != "disabled"
    if forced is not None:
        enabled = forced
    if not enabled:
        return Thinking(False, None)
    return Thinking(True, EFFORT_MAP[effort] if effort not in (None, "none") else EFFORT_MAP[DEFAULT_EFFORT])


def _as_text(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content
    return None


def openai_messages(messages: list) -> list[dict]:
    """Pydantic ChatMessages -> encoder dicts. `developer` becomes `system` (the encoder's own developer
    role would be dropped before the last user turn in thinking mode, losing the client's instructions)."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        if m.content is not None or m.role in ("user", "tool"):
            d["content"] = m.content if m.content is not None else ""
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": c.function.arguments}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if reasoning is not None:
            d["reasoning_content"] = reasoning
        out.append(d)
    return out


def check_passback(messages: list[dict]) -> None:
    """DeepSeek's pass-back rule: assistant tool-call turns after the last user turn keep their reasoning."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, m in enumerate(messages[last_user + 1:], start=last_user + 1):
        if m["role"] == "assistant" and m.get("tool_calls") and m.get("reasoning_content") is None:
            raise APIError(400, f"messages[{i}]: an assistant message with tool_calls must pass its "
                                "reasoning_content back in thinking mode (this server runs with "
                                "--require-reasoning-passback)", param=f"messages[{i}].reasoning_content")


@dataclass
class ChatPrompt:
    text: str  # rendered prompt (forced prefix included)
    ids: list[int]
    thinking: Thinking
    forced_prefix: str  # generation prefix forced by tool_choice (fed to the output parser first)
    tools_enabled: bool  # tool calls are returned (tools given and tool_choice != none)


def tool_choice_prefix(choice: Any, tool_names: list[str], thinking: Thinking) -> str:
    """The DSML start forced by `tool_choice` required / named ("" for auto / none). A named choice is
    `{"type": "function", "function": {"name": ...}}` (dict or pydantic object)."""
    if choice in (None, "auto", "none"):
        return ""
    if choice == "required":
        name = None
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
    else:
        name = choice.function.name
    if thinking.enabled:
        what = "required" if name is None else "a named tool"
        raise APIError(400, f"tool_choice {what} is not supported in thinking mode (as on DeepSeek's API); use "
                            "tool_choice auto, or disable thinking", param="tool_choice")
    if not tool_names:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    head = "\n\n" + TOOL_CALLS_OPEN + "\n" + INVOKE_OPEN + ' name="'
    if name is None:
        return head
    if name not in tool_names:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools ({', '.join(tool_names)})",
                       param="tool_choice")
    return head + name + '">\n'


def _schema_problem(dumped: str) -> str | None:
    """What is wrong with a JSON Schema (given as canonical JSON text), checked against its metaschema (the
    draft its `$schema` names, else 2020-12); None if valid."""
    schema = json.loads(dumped)
    default = Draft202012Validator
    with warnings.catch_warnings():  # an unknown `$schema` URI: checked as 2020-12 (jsonschema warns)
        warnings.simplefilter("ignore")
        cls = validator_for(schema, default=default) if isinstance(schema.get("$schema"), str) else default
    try:
        cls.check_schema(schema)
    except SchemaError as e:
        return e.message + (f" (at {e.json_path})" if e.path else "")
    except RecursionError:
        return "nested too deeply"
    except Exception as e:  # noqa: BLE001 - jsonschema / referencing failing on odd input: still the client's
        return f"cannot be checked ({type(e).__name__}: {e})"
    return None


# Agents send the same tools every turn and jsonschema takes milliseconds per large schema: results are cached,
# keyed by the schema's canonical text (schemas up to 64 KiB, so the cache stays below ~64 MiB).
_schema_problem_cached = functools.lru_cache(maxsize=1024)(_schema_problem)
_CACHED_SCHEMA_CHARS = 1 << 16


def check_tool_schema(schema: Any, where: str) -> None:
    """400 naming `where` (e.g. `tools[2].function.parameters`) unless `schema` is a valid JSON Schema."""
    if schema is None:
        return
    if not isinstance(schema, dict):
        raise APIError(400, f"{where}: must be a JSON Schema object", param=where)
    try:
        dumped = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as e:
        raise APIError(400, f"{where}: not a valid JSON Schema: {e}", param=where) from None
    problem = (_schema_problem_cached if len(dumped) <= _CACHED_SCHEMA_CHARS else _schema_problem)(dumped)
    if problem is not None:
        raise APIError(400, f"{where}: not a valid JSON Schema: {problem}", param=where)


def render_chat(tokenizer, messages: list[dict], *, thinking: Thinking, tools: list[dict] | None,
                tool_choice: Any = None, response_format: Any = None, encoder_version: str,
                require_passback: bool = False, tool_schema_paths: list[str] | None = None) -> ChatPrompt:
    """Render and tokenize a chat request (raises APIError 400 for anything the encoder refuses).

    Tool parameter schemas are meta-validated (400 naming the tool: `tool_schema_paths[k]`, by default
    `tools[k].function.parameters`; the Anthropic route passes `tools[i].input_schema`)."""
    for k, t in enumerate(tools or []):
        where = tool_schema_paths[k] if tool_schema_paths else f"tools[{k}].function.parameters"
        check_tool_schema((t.get("function") or {}).get("parameters"), where)
    if thinking.enabled and require_passback:
        check_passback(messages)
    names = [t["function"]["name"] for t in tools or []]
    use_tools = bool(tools) and tool_choice != "none"
    prefix = tool_choice_prefix(tool_choice, names, thinking)
    try:
        text = encode_messages(messages, thinking.mode, reasoning_effort=thinking.effort,
                               tools=tools if use_tools else None, response_format=response_format,
                               encoder_version=encoder_version)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise APIError(400, str(e), param="messages") from None
    text += prefix
    return ChatPrompt(text, tokenizer.encode(text), thinking, prefix, use_tools)


def response_format_section(fmt: Any) -> Any:
    """What the encoder's response-format section carries: the JSON schema of `json_schema`, or for
    `json_object` a schema that only says "an object". The output is also grammar-constrained: see
    server/structured.py."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    schema = (fmt.json_schema or {}).get("schema")
    return schema if schema is not None else {"type": "object"}


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 16:
        raise APIError(400, "stop: at most 16 stop sequences", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop: stop sequences must be non-empty strings", param="stop")
    return stops


def make_params(*, max_tokens: int, temperature: float | None = None, top_p: float | None = None,
                top_k: int | None = None, min_p: float | None = None, seed: int | None = None,
                presence_penalty: float | None = None, frequency_penalty: float | None = None,
                repetition_penalty: float | None = None, stop: list[str] | None = None,
                stop_token_ids: list[int] | None = None, ignore_eos: bool = False, min_tokens: int = 0,
                logprobs: int | None = None, n_index: int = 0,
                skip_special_tokens: bool = True) -> SamplingParams:
    """SamplingParams with API defaults (temperature 1, top_p 1: V4's recommendation); choice `n_index`
    of a seeded request gets seed + n_index."""
    if seed is not None:
        seed = (seed + n_index) % (1 << 64)
        seed = seed - (1 << 64) if seed >= 1 << 63 else seed  # torch wants a signed 64-bit value
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=top_k or 0,
            min_p=min_p or 0.0,
            seed=seed,
            presence_penalty=presence_penalty or 0.0,
            frequency_penalty=frequency_penalty or 0.0,
            repetition_penalty=repetition_penalty or 1.0,
            stop=list(stop or []),
            stop_token_ids=list(stop_token_ids or []),
            ignore_eos=ignore_eos,
            min_tokens=min(min_tokens, max_tokens),
            logprobs=logprobs,
            skip_special_tokens=skip_special_tokens,
        )
    except ValueError as e:
        raise APIError(400, str(e).removeprefix("SamplingParams.")) from None


def thinking_overrides(thinking: Thinking, *, honor: bool, request_id: str, **given: float | None) -> set[str]:
    """The sampling fields this request's values are dropped for (their defaults apply instead).

    DeepSeek's documented behaviour (serving-notes §1.2): in thinking mode `temperature`, `top_p`,
    `presence_penalty` and `frequency_penalty` are accepted (and range-checked) but have no effect; V4's
    recommended temperature 1.0 / top_p 1.0 and no penalties are used. A server started with
    `--honor-sampling-in-thinking` applies the client's values. `given`: the request's values of those fields
    (others are ignored here); one INFO line per request lists the values dropped that differ from the default.
    """
    if not thinking.enabled or honor:
        return set()
    dropped = {k: v for k, v in given.items()
               if k in THINKING_FIXED_SAMPLING and v is not None and v != THINKING_FIXED_SAMPLING[k]}
    if dropped:
        log.info("%s: thinking mode ignores %s (DeepSeek's behaviour: temperature 1.0, top_p 1.0, no penalties; "
                 "serve --honor-sampling-in-thinking to apply them)", request_id,
                 ", ".join(f"{k}={v:g}" for k, v in dropped.items()))
    return set(THINKING_FIXED_SAMPLING)


def openai_params(req: Any, *, max_tokens: int, logprobs: int | None, n_index: int = 0,
                  dropped: set[str] | frozenset[str] = frozenset()) -> SamplingParams:
    """SamplingParams from the fields shared by OpenAI chat and completions requests (`SamplingFields`).
    `dropped`: fields whose request values are not applied (`thinking_overrides`)."""
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")

    def value(name: str) -> Any:
        return None if name in dropped else getattr(req, name)

    return make_params(max_tokens=max_tokens, temperature=value("temperature"), top_p=value("top_p"),
                       top_k=req.top_k, min_p=req.min_p, seed=req.seed, presence_penalty=value("presence_penalty"),
                       frequency_penalty=value("frequency_penalty"), repetition_penalty=req.repetition_penalty,
                       stop=stop_list(req.stop), stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                       min_tokens=req.min_tokens, logprobs=logprobs, n_index=n_index,
                       skip_special_tokens=getattr(req, "skip_special_tokens", True))
