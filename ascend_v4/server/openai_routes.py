"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Each route: validate and render (400 / 404 before anything runs), admit (429 / 503), then run the engine
requests and translate their deltas (`OutputTracker`) into a response or an SSE stream. The translation
functions (`chat_chunks`, `chat_response`, ...) are plain and unit-tested with crafted engine outputs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ascend_v4.runtime.async_engine import EngineDeadError, QueueFullError
from ascend_v4.runtime.engine import RequestError, StepOutput

from .errors import APIError, error_payload
from .logprobs import chat_logprobs, choice_logprobs, completion_logprobs, vllm_prompt_logprobs
from .outputs import Delta, OutputTracker
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionTokensDetails,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ToolCallOut,
    Usage,
)
from .render import (
    openai_messages,
    openai_params,
    render_chat,
    resolve_thinking,
    response_format_section,
    thinking_overrides,
)
from .serving import ServerState, engine_error, new_id, run_unless_disconnected
from .sse import SSEResponse, sse_data
from .structured import chat_grammar

MAX_CHOICES = 64  # prompts x n of one completions request
STREAM_ERRORS = (EngineDeadError, RequestError, QueueFullError)


def _state(request: Request) -> ServerState:
    return request.app.state.server


# ============================================================================================ translation
def usage_of(trackers: list[OutputTracker]) -> Usage:
    """Usage of one request: the prompt counted once (per distinct prompt), completions summed."""
    prompts: dict[int, OutputTracker] = {}
    for t in trackers:  # completions with several prompts: one tracker per (prompt, n) pair
        prompts.setdefault(t.prompt_index, t)
    prompt = sum(t.prompt_tokens for t in prompts.values())
    cached = sum(t.cached_tokens for t in prompts.values())
    completion = sum(t.completion_tokens for t in trackers)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_cache_hit_tokens=cached, prompt_cache_miss_tokens=prompt - cached,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                 completion_tokens_details=CompletionTokensDetails(
                     reasoning_tokens=sum(t.reasoning_tokens for t in trackers)))


def _tool_calls_out(t: OutputTracker) -> list[ToolCallOut] | None:
    calls = t.tool_calls
    if not calls:
        return None
    return [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments_json())) for c in calls]


def chat_response(rid: str, created: int, model: str, trackers: list[OutputTracker], tokenizer,
                  logprobs: bool) -> ChatCompletionResponse:
    choices = []
    for i, t in enumerate(trackers):
        calls = _tool_calls_out(t)
        msg = ChatMessageOut(content=None if calls and not t.content else t.content,
                             reasoning_content=t.reasoning_content, tool_calls=calls)
        choices.append(ChatChoice(index=i, message=msg, finish_reason=t.openai_finish_reason(),
                                  stop_reason=t.stop_reason,
                                  logprobs=chat_logprobs(tokenizer, t.logprobs) if logprobs else None))
    return ChatCompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage_of(trackers))


def chat_chunks(rid: str, created: int, model: str, index: int, d: Delta, t: OutputTracker, tokenizer,
                logprobs: bool) -> list[ChatCompletionChunk]:
    """The chunks of one delta: reasoning, then content, then tool calls, then the finish chunk."""
    deltas: list[DeltaMessage] = []
    if d.reasoning:
        deltas.append(DeltaMessage(reasoning_content=d.reasoning))
    if d.content:
        deltas.append(DeltaMessage(content=d.content))
    for k, call in d.tool_calls:
        deltas.append(DeltaMessage(tool_calls=[DeltaToolCall(
            index=k, id=call.id, type="function",
            function=DeltaFunction(name=call.name, arguments=call.arguments_json()))]))
    lp = chat_logprobs(tokenizer, d.logprobs) if logprobs and d.logprobs else None
    if lp is not None and not deltas:
        deltas.append(DeltaMessage())
    chunks = [ChatCompletionChunk(id=rid, created=created, model=model, choices=[
        ChatChunkChoice(index=index, delta=m, logprobs=lp if j == 0 else None)]) for j, m in enumerate(deltas)]
    if d.finished:
        chunks.append(ChatCompletionChunk(id=rid, created=created, model=model, choices=[
            ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=t.openai_finish_reason(),
                            stop_reason=t.stop_reason)]))
    return chunks


def _dump(m) -> dict:
    return m.model_dump(exclude_none=True)


async def chat_stream(gen: AsyncIterator[tuple[int, StepOutput]], trackers: list[OutputTracker], *, rid: str,
                      created: int, model: str, tokenizer, logprobs: bool, include_usage: bool,
                      continuous_usage: bool = False) -> AsyncIterator[str]:
    """SSE body of a streamed chat completion: role chunk per choice, deltas, finish, usage, [DONE]."""
    try:
        for i in range(len(trackers)):
            yield sse_data(_dump(ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])))
        async for i, out in gen:
            d = trackers[i].feed(out)
            for c in chat_chunks(rid, created, model, i, d, trackers[i], tokenizer, logprobs):
                if continuous_usage:
                    c.usage = usage_of(trackers)
                yield sse_data(_dump(c))
        if include_usage:
            yield sse_data(_dump(ChatCompletionChunk(id=rid, created=created, model=model, choices=[],
                                                     usage=usage_of(trackers))))
    except STREAM_ERRORS as e:
        err = engine_error(e)
        yield sse_data(error_payload(err.status, err.message, anthropic=False))
    yield sse_data("[DONE]")


def check_capacity(st: ServerState, n: int, prompts: int = 1) -> None:
    """400 for a request needing more engine slots (prompts x n) than the server has in total
    (max_num_seqs + max_queue): it can never be admitted, and a 429 would make clients retry forever."""
    slots = n * prompts
    if slots <= st.capacity:
        return
    param = "n" if n > 1 or prompts == 1 else "prompt"
    what = f"n={n}" if prompts == 1 else f"{prompts} prompts x n={n}"
    raise APIError(400, f"{param}: {what} needs {slots} engine slots, more than this server's capacity of "
                        f"{st.capacity} (max_num_seqs + max_queue); such a request can never be admitted",
                   param=param)


async def _collect(gen: AsyncIterator[tuple[int, StepOutput]], trackers: list[OutputTracker]) -> bool:
    async for i, out in gen:
        trackers[i].feed(out)
    return True


async def _run_to_end(request: Request, gen, trackers) -> bool:
    """Non-streaming: run all choices; False when the client went away first (requests aborted)."""
    try:
        done = await run_unless_disconnected(request.receive, _collect(gen, trackers))
    except STREAM_ERRORS as e:
        raise engine_error(e) from None
    return done is not None


# ============================================================================================ routes
def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request) -> JSONResponse:
        st = _state(request)
        cards = [ModelCard(id=name, created=st.created, root=st.config.model_root, max_model_len=st.max_model_len)
                 for name in st.model_names_all()]
        return JSONResponse(ModelList(data=cards).model_dump(exclude_none=True))

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        st = _state(request)
        st.resolve_model(model_id)
        return JSONResponse(ModelCard(id=model_id, created=st.created, root=st.config.model_root,
                                      max_model_len=st.max_model_len).model_dump(exclude_none=True))

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        st = _state(request)
        forced = st.resolve_model(req.model)
        thinking = resolve_thinking(thinking_type=req.thinking.type if req.thinking else None,
                                    effort=req.reasoning_effort, template_kwargs=req.chat_template_kwargs,
                                    forced=forced)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        prompt = render_chat(st.tokenizer, openai_messages(req.messages), thinking=thinking, tools=tools,
                             tool_choice=req.tool_choice, response_format=response_format_section(req.response_format),
                             encoder_version=st.config.encoder_version,
                             require_passback=st.config.require_reasoning_passback)
        st.check_prompt(prompt.ids, "messages")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        lp = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = st.max_tokens_for(req.max_completion_tokens or req.max_tokens, len(prompt.ids))
        rid, created = new_id("chatcmpl-"), int(time.time())
        dropped = thinking_overrides(thinking, honor=st.config.honor_sampling_in_thinking, request_id=rid,
                                     temperature=req.temperature, top_p=req.top_p,
                                     presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)
        params = [dataclasses.replace(openai_params(req, max_tokens=max_tokens, logprobs=lp, n_index=i,
                                                    dropped=dropped),
                                      prompt_logprobs=req.prompt_logprobs) for i in range(req.n)]
        # Structured outputs (response_format / forced or strict tool calls): one grammar, a matcher per choice.
        grammar = chat_grammar(response_format=req.response_format, tools=tools if prompt.tools_enabled else None,
                               tool_choice=req.tool_choice, forced_prefix=prompt.forced_prefix,
                               thinking=thinking.enabled, think_end_id=st.think_end_id,
                               parallel_tool_calls=req.parallel_tool_calls)
        if grammar is not None:
            params = [dataclasses.replace(p, grammar=grammar) for p in params]
        check_capacity(st, req.n)
        ticket = st.admit(req.n)
        trackers = [OutputTracker(chat=True, thinking=thinking.enabled, tools_enabled=prompt.tools_enabled,
                                  forced_prefix=prompt.forced_prefix, think_end_id=st.think_end_id)
                    for _ in range(req.n)]
        gen = st.generate(ticket, [(prompt.ids, p) for p in params], rid)
        if req.stream:
            so = req.stream_options
            body = chat_stream(gen, trackers, rid=rid, created=created, model=req.model, tokenizer=st.tokenizer,
                               logprobs=req.logprobs, include_usage=bool(so and so.include_usage),
                               continuous_usage=bool(so and so.continuous_usage_stats))
            return SSEResponse(body, on_close=ticket.release)
        try:
            if not await _run_to_end(request, gen, trackers):
                return Response(status_code=499)  # client closed the request; nobody reads this
        finally:
            ticket.release()
        resp = chat_response(rid, created, req.model, trackers, st.tokenizer, req.logprobs)
        if req.prompt_logprobs is not None:  # vLLM: one list for the request (every choice shares the prompt)
            resp.prompt_logprobs = vllm_prompt_logprobs(st.tokenizer, trackers[0].prompt_logprobs)
        return JSONResponse(resp.model_dump())

    @router.post("/v1/completions", response_model=CompletionResponse)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        st = _state(request)
        st.resolve_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
        # echo + logprobs: the prompt's tokens get log-probs too (lm-eval's log-likelihood requests)
        plp = req.prompt_logprobs
        if req.echo and req.logprobs is not None:
            plp = max(plp or 0, req.logprobs)
        if req.max_tokens == 0 and plp is None:
            raise APIError(400, "max_tokens 0 scores the prompt only: it needs echo with logprobs, or prompt_logprobs",
                           param="max_tokens")
        prompts = _completion_prompts(st, req.prompt)
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} choices per request (prompts x n)", param="prompt")
        check_capacity(st, req.n, len(prompts))
        jobs, trackers = [], []
        for k, (_, ids) in enumerate(prompts):
            st.check_prompt(ids, "prompt" if len(prompts) == 1 else f"prompt[{k}]")
            max_tokens = st.max_tokens_for(req.max_tokens, len(ids))
            for j in range(req.n):
                params = openai_params(req, max_tokens=max_tokens, logprobs=req.logprobs, n_index=j)
                jobs.append((ids, dataclasses.replace(params, prompt_logprobs=plp,
                                                      max_tokens=0 if req.max_tokens == 0 else max_tokens)))
                trackers.append(OutputTracker(chat=False, prompt_index=k))
        ticket = st.admit(len(jobs))
        rid, created = new_id("cmpl-"), int(time.time())
        gen = st.generate(ticket, jobs, rid)
        echoes = [prompts[k // req.n][0] if req.echo else "" for k in range(len(jobs))]
        if req.stream:
            so = req.stream_options
            body = completion_stream(gen, trackers, echoes, rid=rid, created=created, model=req.model,
                                     tokenizer=st.tokenizer, logprobs=req.logprobs is not None,
                                     include_usage=bool(so and so.include_usage),
                                     prompt_logprobs=req.prompt_logprobs is not None,
                                     echo_ids=[prompts[k // req.n][1] for k in range(len(jobs))] if req.echo else None)
            return SSEResponse(body, on_close=ticket.release)
        try:
            if not await _run_to_end(request, gen, trackers):
                return Response(status_code=499)
        finally:
            ticket.release()
        choices = [CompletionChoice(index=i, text=echoes[i] + t.text, finish_reason=t.finish_reason,
                                    stop_reason=t.stop_reason,
                                    logprobs=choice_logprobs(st.tokenizer, t, prompts[i // req.n][1]
                                                              if req.echo else None)
                                    if req.logprobs is not None else None,
                                    prompt_logprobs=vllm_prompt_logprobs(st.tokenizer, t.prompt_logprobs)
                                    if req.prompt_logprobs is not None else None)
                   for i, t in enumerate(trackers)]
        return JSONResponse(CompletionResponse(id=rid, created=created, model=req.model, choices=choices,
                                               usage=usage_of(trackers)).model_dump())

    return router


def _completion_prompts(st: ServerState, prompt) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt: strings get BOS + their tokens, id lists are used verbatim."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    out = []
    for p in items:
        if isinstance(p, str):
            out.append((p, [st.tokenizer.bos_id] + st.tokenizer.encode(p)))
        else:
            ids = list(p)
            st.check_prompt(ids)
            out.append((st.tokenizer.decode(ids), ids))
    return out


async def completion_stream(gen, trackers: list[OutputTracker], echoes: list[str], *, rid: str, created: int,
                            model: str, tokenizer, logprobs: bool, include_usage: bool, prompt_logprobs: bool = False,
                            echo_ids: list[list[int]] | None = None) -> AsyncIterator[str]:
    """SSE chunks of a completions request. An echoed prompt is sent first; with logprobs it waits for the
    choice's first engine output, which carries the prompt's log-probs (`echo_ids`: each choice's prompt ids)."""
    offsets = [len(e) for e in echoes]
    wait_echo = [bool(e) and logprobs and echo_ids is not None for e in echoes]

    def chunk(i: int, text: str, **kw) -> str:
        return sse_data(_dump(CompletionResponse(id=rid, created=created, model=model, choices=[
            CompletionChoice(index=i, text=text, **kw)])))

    try:
        for i, e in enumerate(echoes):
            if e and not wait_echo[i]:
                yield chunk(i, e)
        async for i, out in gen:
            t = trackers[i]
            d = t.feed(out)
            if wait_echo[i] and t.prompt_logprobs is not None:
                wait_echo[i] = False
                lp = completion_logprobs(tokenizer, t.prompt_logprobs, 0, echo_ids[i])
                offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else 0
                yield chunk(i, echoes[i], logprobs=lp)
            plp = vllm_prompt_logprobs(tokenizer, out.prompt_logprobs) if prompt_logprobs else None
            if not (d.text or d.finished or (logprobs and d.logprobs) or plp):
                continue
            lp = completion_logprobs(tokenizer, d.logprobs, offsets[i]) if logprobs else None
            offsets[i] += len(d.text)
            yield chunk(i, d.text, logprobs=lp, finish_reason=t.finish_reason if d.finished else None,
                        stop_reason=t.stop_reason if d.finished else None, prompt_logprobs=plp)
        if include_usage:
            yield sse_data(_dump(CompletionResponse(id=rid, created=created, model=model, choices=[],
                                                    usage=usage_of(trackers))))
    except STREAM_ERRORS as e:
        err = engine_error(e)
        yield sse_data(error_payload(err.status, err.message, anthropic=False))
    yield sse_data("[DONE]")
