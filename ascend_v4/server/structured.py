"""Structured outputs: API request fields -> the grammar the engine enforces (runtime/structured.py).

* `response_format` `json_object` -> any JSON object; `json_schema` -> that schema (enforced whether or not
  `strict` is set, as vLLM does);
* `tool_choice` `required` / a named function -> the DSML tool-call block exactly as
  `ascend_v4.chat.encoding.render_tool_calls` writes it and `ascend_v4.chat.parsing` reads it, with each
  function's arguments constrained by its `parameters` schema. The prompt already ends with the forced
  start of the block (`render.tool_choice_prefix`), so the grammar continues from there;
* `tool_choice` auto with `strict: true` functions -> free content, optionally followed by a tool-call block
  (strict functions' arguments follow their schema, other functions' arguments are free).

Precedence: a forced tool call wins over `response_format` (the answer is a call, not content); in thinking
mode the grammar starts after `</think>` (reasoning is free). Grammars are llguidance Lark: JSON values are
`%json {schema}` embeds (compact: no whitespace between tokens, which keeps outputs short); DSML parameter
values with string="true" are raw text ended by the close tag (a lazy `suffix` rule).
"""

from __future__ import annotations

import json
from typing import Any

from ascend_v4.chat.encoding import (
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
)
from ascend_v4.runtime.structured import GrammarSpec

from .errors import APIError

_COMPACT = {"whitespace_flexible": False}


def _lit(s: str) -> str:
    """A Lark string literal."""
    return json.dumps(s, ensure_ascii=False)


def _json_embed(schema: Any, root: dict | None = None) -> str:
    """`%json {...}` for a schema (a subschema gets the root's definitions so its `$ref`s resolve)."""
    if schema is True or schema is None:
        schema = {}
    s = dict(schema)
    for key in ("$defs", "definitions"):
        if root and key in root and key not in s:
            s[key] = root[key]
    s["x-guidance"] = {**_COMPACT, **s.get("x-guidance", {})}
    return "%json " + json.dumps(s, ensure_ascii=False)


def _resolve(schema: Any, root: dict) -> dict:
    """Follow one local `$ref` (for deciding how a parameter is written)."""
    if isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#/"):
        node: Any = root
        for part in schema["$ref"][2:].split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            return node
    return schema if isinstance(schema, dict) else {}


class _Lark:
    """Collects the rules of one grammar."""

    def __init__(self) -> None:
        self.rules: list[str] = []
        self.n = 0

    def rule(self, body: str, attrs: str = "") -> str:
        self.n += 1
        name = f"r{self.n}"
        self.rules.append(f"{name}{attrs}: {body}")
        return name

    def text(self, start: str) -> str:
        return "\n".join([f"start: {start}", *self.rules]) + "\n"


def _raw_value(g: _Lark, s: dict) -> str | None:
    """Grammar of a string="true" value (raw text, close tag included), or None when the schema is better
    enforced as a JSON string (pattern, format, ...)."""
    close = _lit(PARAMETER_CLOSE)
    if "enum" in s and all(isinstance(v, str) for v in s["enum"]) and s["enum"]:
        return "(" + " | ".join(_lit(v) for v in s["enum"]) + ") " + close
    if isinstance(s.get("const"), str):
        return _lit(s["const"]) + " " + close
    if s.get("type") != "string" or set(s) & {"pattern", "format", "allOf", "anyOf", "oneOf", "not"}:
        return None
    lo, hi = int(s.get("minLength", 0)), s.get("maxLength")
    rep = "*" if hi is None and lo == 0 else f"{{{lo},{'' if hi is None else int(hi)}}}"
    return g.rule(f"/(?s:.{rep})/", f'[suffix={close}]')


def _is_stringy(s: dict) -> bool:
    return s.get("type") == "string" or isinstance(s.get("const"), str) or \
        (bool(s.get("enum")) and all(isinstance(v, str) for v in s["enum"]))


def _param(g: _Lark, key: str, schema: Any, root: dict) -> str:
    """One `<｜DSML｜parameter name="key" string="...">value</｜DSML｜parameter>` for a property schema."""
    s = _resolve(schema, root)
    head = f'{PARAMETER_OPEN} name="{key}" string='
    raw = _raw_value(g, s) if _is_stringy(s) else None
    if raw is not None:
        return g.rule(_lit(head + '"true">') + " " + raw)
    value = g.rule(_json_embed(schema, root))
    return g.rule(_lit(head + '"false">') + f" {value} " + _lit(PARAMETER_CLOSE))


def _free_params(g: _Lark) -> str:
    """Any parameters (a function without a parameters schema): name, then raw string or JSON value."""
    raw = g.rule("/(?s:.*)/", f"[suffix={_lit(PARAMETER_CLOSE)}]")
    value = g.rule(_json_embed({}))
    one = g.rule(_lit(f'{PARAMETER_OPEN} name="') + ' /[^"<>\\n]+/ ' + "(" + _lit('" string="true">') + f" {raw} | "
                 + _lit('" string="false">') + f" {value} " + _lit(PARAMETER_CLOSE) + ")")
    return f'({one} "\\n")* "\\n"?'


def _body(g: _Lark, schema: dict | None, strict: bool) -> str:
    """Invoke body after `name="NAME">\\n` up to and including the invoke close tag. Parameters come in the
    schema's property order joined by "\\n" (as the encoder writes them); optional ones may be left out."""
    close = _lit(INVOKE_CLOSE)
    props = (schema or {}).get("properties") if isinstance(schema, dict) else None
    if not strict or not isinstance(props, dict) or not props:
        if strict and isinstance(props, dict) and not props:
            return f'"\\n" {close}'  # no parameters: the encoder writes an empty line
        return g.rule(f"{_free_params(g)} {close}")
    required = set(schema.get("required") or [])
    items = []
    for key, sub in props.items():
        p = _param(g, key, sub, schema)
        items.append(f'{p} "\\n"' if key in required else f'({p} "\\n")?')
    tail = ' "\\n"?' if not required else ""  # all left out: the encoder's empty line
    return g.rule(" ".join(items) + tail + f" {close}")


def _function(tool: dict) -> dict:
    return tool.get("function", tool)


def _invoke(g: _Lark, fn: dict, strict: bool, lead: str = "") -> str:
    # `lead`: the "\n" between invokes is part of the same literal, so that the lexer never has to choose
    # between a lone "\n" and the block's close tag "\n</..." (both start with "\n").
    return g.rule(_lit(f'{lead}{INVOKE_OPEN} name="{fn["name"]}">\n') + " " + _body(g, fn.get("parameters"), strict))


def _check(grammar: str, param: str) -> str:
    try:
        import llguidance
    except ImportError:  # pragma: no cover - in the server extra
        raise APIError(400, "structured outputs need the llguidance package on the server", param=param) from None
    err = llguidance.LLMatcher.validate_grammar(grammar)
    if err:
        raise APIError(400, f"{param}: cannot build a grammar: {err.strip().splitlines()[0]}", param=param)
    return grammar


def json_grammar(schema: Any) -> str:
    """Lark grammar of one JSON value matching `schema`."""
    if not isinstance(schema, (dict, bool)):
        raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                       param="response_format")
    return _check(f"start: {_json_embed(schema)}\n", "response_format")


def response_format_schema(fmt: Any) -> Any:
    """The JSON schema an OpenAI `response_format` (pydantic `ResponseFormat` or dict) asks for; None for text."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt.type
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        js = (fmt.get("json_schema") if isinstance(fmt, dict) else fmt.json_schema) or {}
        return js.get("schema", {"type": "object"})
    return None


def response_format_grammar(fmt: Any) -> str | None:
    """Grammar of an OpenAI `response_format`; None for text."""
    schema = response_format_schema(fmt)
    return None if schema is None else json_grammar(schema)


def tool_grammar(tools: list[dict], tool_choice: Any, forced_prefix: str, *, parallel: bool | None = True,
                 content_schema: Any = None) -> str | None:
    """Grammar of the tool-call output for `tool_choice` (None when nothing is constrained).

    `forced_prefix`: what the prompt already ends with (render.tool_choice_prefix): the grammar continues
    after it. Forced calls (required / named) constrain every function's arguments to its schema; under
    auto only `strict: true` functions are constrained, and the grammar exists only when there is one or
    when `content_schema` (from response_format) constrains the content: then the answer is that JSON
    value, a tool-call block, or both (JSON first)."""
    fns = [_function(t) for t in tools or []]
    if not fns or tool_choice == "none":
        return None
    g = _Lark()
    block_end = _lit("\n" + TOOL_CALLS_CLOSE)
    name = None
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
    elif tool_choice not in (None, "auto", "required"):
        name = tool_choice.function.name
    forced = tool_choice == "required" or name is not None
    if not forced and not any(f.get("strict") for f in fns) and content_schema is None:
        return None
    any_invoke = g.rule(" | ".join(_invoke(g, f, forced or bool(f.get("strict"))) for f in fns))
    next_invoke = g.rule(" | ".join(_invoke(g, f, forced or bool(f.get("strict")), "\n") for f in fns))
    more = f"{next_invoke}*" if parallel is not False else ""
    if not forced:  # auto with strict functions: content, then optionally the block
        if content_schema is not None:
            value = g.rule(_json_embed(content_schema))
            block = g.rule(_lit("\n\n" + TOOL_CALLS_OPEN + "\n") + f" {any_invoke} {more} {block_end}")
            return _check(g.text(f"{value} {block}? | {block}"), "response_format")
        content = g.rule("/(?s:[^｜]*)/", f"[suffix={_lit(chr(10) * 2 + TOOL_CALLS_OPEN + chr(10))}]")
        plain = g.rule("/(?s:[^｜]*)/")
        return _check(g.text(f"{content} {any_invoke} {more} {block_end} | {plain}"), "tools")
    head = "\n\n" + TOOL_CALLS_OPEN + "\n"
    if name is not None:
        fn = next((f for f in fns if f["name"] == name), None)
        if fn is None:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        body = _body(g, fn.get("parameters"), True)
        full = f'{INVOKE_OPEN} name="{name}">\n'
        if forced_prefix == head + full:
            start = f"{body} {block_end}"
        else:
            start = f"{_lit(head + full)} {body} {block_end}"
        return _check(g.text(start), "tool_choice")
    tails = [g.rule(_lit(f["name"] + '">\n') + " " + _body(g, f.get("parameters"), True)) for f in fns]
    first = g.rule(" | ".join(tails))
    if forced_prefix == head + INVOKE_OPEN + ' name="':
        start = f"{first} {more} {block_end}"
    else:
        start = f"{_lit(head + INVOKE_OPEN + ' name=' + chr(34))} {first} {more} {block_end}"
    return _check(g.text(start), "tool_choice")


def chat_grammar(*, response_format: Any, tools: list[dict] | None, tool_choice: Any, forced_prefix: str,
                 thinking: bool, think_end_id: int | None, parallel_tool_calls: bool | None = None
                 ) -> GrammarSpec | None:
    """The GrammarSpec of a chat request (None = unconstrained). Raises APIError 400 for schemas that
    cannot be compiled."""
    content = response_format_schema(response_format)
    if content is not None:
        json_grammar(content)  # 400 for a schema that does not compile, whatever the tools
    grammar = tool_grammar(tools or [], tool_choice, forced_prefix, parallel=parallel_tool_calls,
                           content_schema=content) if tools else None
    if grammar is None:
        grammar = response_format_grammar(response_format)
    if grammar is None:
        return None
    if thinking and think_end_id is None:
        raise APIError(400, "structured outputs in thinking mode need a single-token </think>", param="response_format")
    return GrammarSpec(grammar, think_end_id if thinking else None)
