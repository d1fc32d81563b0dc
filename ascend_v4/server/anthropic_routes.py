"""Anthropic-compatible routes: POST /v1/messages and /v1/messages/count_tokens (serving-notes §4).

Requests are converted to the OpenAI-style messages the encoder reads (thinking blocks -> reasoning_content,
tool_use -> tool_calls, tool_result -> tool messages), rendered and run like chat completions. Output uses
Anthropic blocks (thinking with a signature, text, tool_use) and the standard streaming event sequence:

    message_start, ping, (content_block_start, content_block_delta+, content_block_stop)*, message_delta,
    message_stop      (or an `error` event if the engine fails mid-stream)

Blocks, streamed or not: thinking (if there is reasoning), text (if there is text), tool_use, in that order.
No empty text block is ever sent, as on Anthropic's API (which refuses empty text blocks in requests, so a
client passing such a reply back would loop on 400s there): a reply cut during thinking is only the thinking
block, and an empty reply has `content: []` (streamed: no content_block events), as Anthropic's does.

Usage: `input_tokens` excludes cache reads (Anthropic's convention); `cache_read_input_tokens` carries the
prefix-cache hits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ascend_v4.chat.parsing import ToolCall
from ascend_v4.runtime.engine import StepOutput

from .errors import APIError, error_payload
from .openai_routes import STREAM_ERRORS, _run_to_end
from .outputs import Delta, OutputTracker
from .protocol import (
    AnthropicCountTokensRequest,
    AnthropicCountTokensResponse,
    AnthropicMessagesRequest,
    AnthropicResponse,
    AnthropicUsage,
)
from .render import ChatPrompt, make_params, render_chat, resolve_thinking, thinking_overrides
from .serving import ServerState, engine_error, new_id
from .sse import SSEResponse, sse_event
from .structured import chat_grammar


def _state(request: Request) -> ServerState:
    return request.app.state.server


def tool_use_id(index: int) -> str:
    return "toolu_" + uuid.uuid4().hex[:24]


def signature(thinking: str) -> str:
    """Signature of a thinking block. Clients only pass it back; this server ignores it on input."""
    return hashlib.sha256(thinking.encode()).hexdigest()


def _text_blocks(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for k, b in enumerate(value):
            if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
                raise APIError(400, f"{where}[{k}]: only text blocks are supported here", param=where)
            texts.append(b["text"])
        return "\n\n".join(texts)
    if value is None:
        return ""
    raise APIError(400, f"{where}: expected a string or a list of text blocks", param=where)


def to_openai_messages(req: AnthropicCountTokensRequest) -> list[dict]:
    """Anthropic system + messages -> encoder dicts."""
    out: list[dict] = []
    if req.system:
        out.append({"role": "system", "content": _text_blocks(req.system, "system")})
    for i, m in enumerate(req.messages):
        where = f"messages[{i}].content"
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        if m.role == "user":
            texts: list[str] = []
            for k, b in enumerate(blocks):
                kind = b.get("type") if isinstance(b, dict) else None
                if kind == "text" and isinstance(b.get("text"), str):
                    texts.append(b["text"])
                elif kind == "tool_result":
                    out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                                "content": _text_blocks(b.get("content"), f"{where}[{k}].content")})
                else:
                    raise APIError(400, f"{where}[{k}]: block type {kind!r} is not supported in user messages "
                                        "(text and tool_result are)", param=where)
            if texts or not any(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks):
                out.append({"role": "user", "content": "\n\n".join(texts)})
        else:
            msg: dict[str, Any] = {"role": "assistant", "content": ""}
            reasoning, calls = None, []
            for k, b in enumerate(blocks):
                kind = b.get("type") if isinstance(b, dict) else None
                if kind == "text" and isinstance(b.get("text"), str):
                    msg["content"] += b["text"]
                elif kind == "thinking" and isinstance(b.get("thinking"), str):
                    reasoning = (reasoning or "") + b["thinking"]
                elif kind == "redacted_thinking":
                    continue
                elif kind == "tool_use" and isinstance(b.get("name"), str) and b["name"]:
                    args = b.get("input") if b.get("input") is not None else {}
                    if not isinstance(args, dict):
                        raise APIError(400, f"{where}[{k}].input must be an object", param=where)
                    calls.append({"id": b.get("id"), "type": "function",
                                  "function": {"name": b["name"], "arguments": args}})
                else:
                    raise APIError(400, f"{where}[{k}]: block type {kind!r} is not supported in assistant messages "
                                        "(text, thinking, tool_use are)", param=where)
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def is_client_tool(t) -> bool:
    """A client tool (rendered for the model); server tools (`web_search_...`, ...) are skipped."""
    return t.type in (None, "custom")


def to_openai_tools(req: AnthropicCountTokensRequest) -> tuple[list[dict] | None, Any]:
    """Client tools in OpenAI form (server tools are skipped) and tool_choice mapped (serving-notes §4.3)."""
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                               "parameters": t.input_schema or {"type": "object"}}}
             for t in req.tools or [] if is_client_tool(t)] or None
    tc = req.tool_choice
    if tc is None or tc.type == "auto":
        choice: Any = None
    elif tc.type == "none":
        choice = "none"
    elif tc.type == "any":
        choice = "required"
    else:
        if not tc.name:
            raise APIError(400, "tool_choice.name is required for type tool", param="tool_choice")
        choice = {"type": "function", "function": {"name": tc.name}}
    return tools, choice


def render_anthropic(st: ServerState, req: AnthropicCountTokensRequest) -> ChatPrompt:
    forced = st.resolve_model(req.model, anthropic=True)
    thinking = resolve_thinking(thinking_type=req.thinking.type if req.thinking else None,
                                effort=req.output_config.effort if req.output_config else None,
                                template_kwargs=None, forced=forced)
    tools, choice = to_openai_tools(req)
    paths = [f"tools[{i}].input_schema" for i, t in enumerate(req.tools or []) if is_client_tool(t)]
    return render_chat(st.tokenizer, to_openai_messages(req), thinking=thinking, tools=tools, tool_choice=choice,
                       encoder_version=st.config.encoder_version,
                       require_passback=st.config.require_reasoning_passback, tool_schema_paths=paths)


def _tool_input(call: ToolCall) -> dict:
    if isinstance(call.arguments, dict):
        return call.arguments
    try:
        value = json.loads(call.arguments)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"arguments": call.arguments}


def usage_of(t: OutputTracker, prompt_len: int) -> AnthropicUsage:
    prompt = t.prompt_tokens or prompt_len
    return AnthropicUsage(input_tokens=prompt - t.cached_tokens, output_tokens=t.completion_tokens,
                          cache_read_input_tokens=t.cached_tokens)


def message_response(rid: str, model: str, t: OutputTracker, prompt_len: int) -> AnthropicResponse:
    content: list[dict] = []
    if t.reasoning_content:
        content.append({"type": "thinking", "thinking": t.reasoning_content,
                        "signature": signature(t.reasoning_content)})
    if t.content:
        content.append({"type": "text", "text": t.content})
    for c in t.tool_calls:
        content.append({"type": "tool_use", "id": c.id, "name": c.name, "input": _tool_input(c)})
    stop_reason, stop_sequence = t.anthropic_stop()
    return AnthropicResponse(id=rid, model=model, content=content, stop_reason=stop_reason,
                             stop_sequence=stop_sequence, usage=usage_of(t, prompt_len))


class BlockStream:
    """Anthropic content-block events from deltas: opens / closes thinking, text and tool_use blocks."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None
        self.thinking = ""

    def _start(self, kind: str, block: dict) -> list[tuple[str, dict]]:
        ev = self.close()
        self.index += 1
        self.open = kind
        ev.append(("content_block_start", {"type": "content_block_start", "index": self.index,
                                           "content_block": block}))
        return ev

    def close(self) -> list[tuple[str, dict]]:
        ev: list[tuple[str, dict]] = []
        if self.open is None:
            return ev
        if self.open == "thinking":
            ev.append(("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                               "delta": {"type": "signature_delta",
                                                         "signature": signature(self.thinking)}}))
        ev.append(("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        self.open = None
        return ev

    def feed(self, d: Delta) -> list[tuple[str, dict]]:
        ev: list[tuple[str, dict]] = []
        if d.reasoning:
            if self.open != "thinking":
                ev += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self.thinking += d.reasoning
            ev.append(("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                               "delta": {"type": "thinking_delta", "thinking": d.reasoning}}))
        if d.content:
            if self.open != "text":
                ev += self._start("text", {"type": "text", "text": ""})
            ev.append(("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                               "delta": {"type": "text_delta", "text": d.content}}))
        for _, call in d.tool_calls:
            ev += self._start("tool_use", {"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
            ev.append(("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                               "delta": {"type": "input_json_delta",
                                                         "partial_json": json.dumps(_tool_input(call),
                                                                                    ensure_ascii=False)}}))
            ev += self.close()
        return ev

    def finish(self) -> list[tuple[str, dict]]:
        return self.close()  # no block at all: none is invented (content [], as the non-streamed reply)


async def message_stream(gen: AsyncIterator[tuple[int, StepOutput]], t: OutputTracker, *, rid: str, model: str,
                         prompt_len: int) -> AsyncIterator[str]:
    blocks = BlockStream()
    start = AnthropicResponse(id=rid, model=model, content=[], stop_reason=None,
                              usage=AnthropicUsage(input_tokens=prompt_len, output_tokens=0)).model_dump()
    yield sse_event("message_start", {"type": "message_start", "message": start})
    yield sse_event("ping", {"type": "ping"})
    try:
        async for _, out in gen:
            for name, data in blocks.feed(t.feed(out)):
                yield sse_event(name, data)
    except STREAM_ERRORS as e:
        err = engine_error(e)
        yield sse_event("error", error_payload(err.status, err.message, anthropic=True))
        return
    for name, data in blocks.finish():
        yield sse_event(name, data)
    stop_reason, stop_sequence = t.anthropic_stop()
    yield sse_event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                      "usage": usage_of(t, prompt_len).model_dump()})
    yield sse_event("message_stop", {"type": "message_stop"})


def build_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/messages", response_model=AnthropicResponse)
    async def messages(req: AnthropicMessagesRequest, request: Request) -> Response:
        st = _state(request)
        prompt = render_anthropic(st, req)
        st.check_prompt(prompt.ids, "messages")
        rid = new_id("msg_")
        dropped = thinking_overrides(prompt.thinking, honor=st.config.honor_sampling_in_thinking, request_id=rid,
                                     temperature=req.temperature, top_p=req.top_p)
        params = make_params(max_tokens=st.max_tokens_for(req.max_tokens, len(prompt.ids)),
                             temperature=None if "temperature" in dropped else req.temperature,
                             top_p=None if "top_p" in dropped else req.top_p, top_k=req.top_k,
                             stop=list(req.stop_sequences or []))
        # Structured outputs: tool_choice any / tool -> a DSML tool call whose input follows the tool's schema.
        tools, choice = to_openai_tools(req)
        grammar = chat_grammar(response_format=None, tools=tools if prompt.tools_enabled else None, tool_choice=choice,
                               forced_prefix=prompt.forced_prefix, thinking=prompt.thinking.enabled,
                               think_end_id=st.think_end_id,
                               parallel_tool_calls=not (req.tool_choice and req.tool_choice.disable_parallel_tool_use))
        if grammar is not None:
            params = dataclasses.replace(params, grammar=grammar)
        ticket = st.admit(1)
        t = OutputTracker(chat=True, thinking=prompt.thinking.enabled, tools_enabled=prompt.tools_enabled,
                          forced_prefix=prompt.forced_prefix, think_end_id=st.think_end_id, make_id=tool_use_id)
        gen = st.generate(ticket, [(prompt.ids, params)], rid)
        if req.stream:
            return SSEResponse(message_stream(gen, t, rid=rid, model=req.model, prompt_len=len(prompt.ids)),
                               on_close=ticket.release)
        try:
            if not await _run_to_end(request, gen, [t]):
                return Response(status_code=499)
        finally:
            ticket.release()
        return JSONResponse(message_response(rid, req.model, t, len(prompt.ids)).model_dump())

    @router.post("/v1/messages/count_tokens", response_model=AnthropicCountTokensResponse)
    async def count_tokens(req: AnthropicCountTokensRequest, request: Request) -> JSONResponse:
        prompt = render_anthropic(_state(request), req)
        return JSONResponse(AnthropicCountTokensResponse(input_tokens=len(prompt.ids)).model_dump())

    return router
