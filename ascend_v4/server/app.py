"""`create_app(engine) -> FastAPI`: the HTTP server over an `AsyncEngine`. Nothing is built at import time.

Routes: OpenAI (`openai_routes`), Anthropic (`anthropic_routes`), and here the operational ones:
`GET /health` (engine health; 503 when unhealthy), `GET /metrics` (Prometheus), `POST /tokenize`,
`POST /detokenize`, `GET /tokenizer_info` (`info_routes`). Shutting the app down (lifespan end, after
uvicorn has drained open requests) stops the engine.

The published OpenAPI schema (`/openapi.json`) is completed here, centrally, from one table
(`ERROR_STATUSES`): every operation lists each status it can answer, errors with the schema of its API
family (OpenAI's `{"error": {...}}`, Anthropic's `{"type": "error", ...}` under /v1/messages), 401 and the
security schemes when an API key is set, `text/event-stream` for the streaming routes, no 422 (validation
errors are 400 here), and request constraints pydantic cannot express (/tokenize: exactly one of `prompt` /
`messages`; /detokenize: ids inside the vocabulary).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ascend_v4 import __version__
from ascend_v4.runtime.async_engine import AsyncEngine
from ascend_v4.tokenizer import UnencodableTextError

from . import anthropic_routes, info_routes, openai_routes
from .auth import APIKeyMiddleware, HTTPMetricsMiddleware, is_protected
from .errors import (
    APIError,
    api_error_handler,
    http_error_handler,
    is_anthropic_path,
    unencodable_text_handler,
    unhandled_error_handler,
    validation_error_handler,
)
from .metrics import CONTENT_TYPE
from .protocol import (
    AnthropicError,
    DetokenizeRequest,
    DetokenizeResponse,
    OpenAIError,
    TokenizeRequest,
    TokenizeResponse,
)
from .render import openai_messages, render_chat, resolve_thinking
from .serving import ServerConfig, ServerState, StopScopeMiddleware


def _state(request: Request) -> ServerState:
    return request.app.state.server


def create_app(engine: AsyncEngine, config: ServerConfig | None = None, *, shutdown_engine: bool = True) -> FastAPI:
    """The FastAPI app serving `engine` (its tokenizer and limits come from `engine.engine`).

    Args:
        engine: a running AsyncEngine.
        config: served names, API key and API-level switches (see ServerConfig).
        shutdown_engine: stop the engine when the app shuts down (drains in-flight requests first).
    """
    state = ServerState(engine, config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_engine:
            await engine.shutdown(drain=True)

    app = FastAPI(title="ascend-v4", version=__version__, lifespan=lifespan,
                  description="OpenAI- and Anthropic-compatible API over the ascend-v4 engine "
                              "(DeepSeek-V4 semantics; see docs/serving.md).")
    app.state.server = state
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(UnencodableTextError, unencodable_text_handler)  # -> 400 naming the field
    app.add_exception_handler(Exception, unhandled_error_handler)
    routers = [openai_routes.build_router(), anthropic_routes.build_router(), info_routes.build_router()]
    for router in routers:
        app.include_router(router)
    _add_operational_routes(app)
    _complete_openapi(app, api_key=state.config.api_key is not None, vocab_size=state.vocab_size)

    routes = frozenset(p for r in [*app.routes, *(r for rt in routers for r in rt.routes)]
                       if (p := getattr(r, "path", None)))
    app.add_middleware(StopScopeMiddleware, state=state)
    app.add_middleware(APIKeyMiddleware, api_key=state.config.api_key)
    app.add_middleware(HTTPMetricsMiddleware, observe=state.metrics.observe_http, routes=routes)  # outermost
    return app


def _add_operational_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        st = _state(request)
        h = st.engine.health()
        body = {"status": "ok" if h["healthy"] else "unhealthy", **h, "model": st.model_name}
        return JSONResponse(body, status_code=200 if h["healthy"] else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(req: TokenizeRequest, request: Request) -> JSONResponse:
        st = _state(request)
        forced = st.resolve_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if req.prompt is not None:
            ids = ([st.tokenizer.bos_id] if req.add_special_tokens else []) + st.tokenizer.encode(req.prompt)
        else:
            thinking = resolve_thinking(thinking_type=req.thinking.type if req.thinking else None,
                                        effort=req.reasoning_effort, template_kwargs=req.chat_template_kwargs,
                                        forced=forced)
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            ids = render_chat(st.tokenizer, openai_messages(req.messages or []), thinking=thinking, tools=tools,
                              encoder_version=st.config.encoder_version).ids
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=st.max_model_len, tokens=ids).model_dump())

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(req: DetokenizeRequest, request: Request) -> JSONResponse:
        st = _state(request)
        st.resolve_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < st.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"tokens outside [0, {st.tokenizer.vocab_size}): {bad[:5]}", param="tokens")
        return JSONResponse(DetokenizeResponse(prompt=st.tokenizer.decode(req.tokens)).model_dump())


# ============================================================================================ OpenAPI
# (method, path) -> error statuses the operation can answer besides 401 (API key, added where it applies)
# and 500 (a bug; every operation). Operations not listed (a route added later) get `_DEFAULT_STATUSES`.
ERROR_STATUSES: dict[tuple[str, str], tuple[int, ...]] = {
    ("get", "/v1/models"): (),
    ("get", "/v1/models/{model_id}"): (404,),
    ("post", "/v1/chat/completions"): (400, 404, 429, 503),
    ("post", "/v1/completions"): (400, 404, 429, 503),
    ("post", "/v1/messages"): (400, 404, 429, 503),
    ("post", "/v1/messages/count_tokens"): (400, 404),
    ("get", "/health"): (503,),
    ("get", "/metrics"): (),
    ("get", "/version"): (),
    ("post", "/tokenize"): (400, 404),
    ("post", "/detokenize"): (400, 404),
    ("get", "/tokenizer_info"): (),
}
_DEFAULT_STATUSES = {"get": (404,), "post": (400, 404, 429, 503)}
# Operations whose 200 may also be an SSE stream (`"stream": true`).
STREAMING = frozenset({("post", "/v1/chat/completions"), ("post", "/v1/completions"), ("post", "/v1/messages")})
_DESCRIPTIONS = {400: "Invalid request (body, field or prompt)", 401: "Missing or wrong API key",
                 404: "Unknown model", 429: "Server busy: admission queue full (retry after Retry-After)",
                 500: "Internal error", 503: "Engine unavailable, failed or shutting down"}


def _component(schema: dict, model) -> dict:
    """Add a pydantic model (and the models it uses) to components.schemas; return a $ref to it."""
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    js = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in js.pop("$defs", {}).items():
        comps.setdefault(name, sub)
    comps.setdefault(model.__name__, js)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def document_responses(schema: dict, *, api_key: bool, vocab_size: int | None = None) -> dict:
    """Complete a FastAPI OpenAPI schema in place (see the module docstring); returns it."""
    oa_ref, an_ref = _component(schema, OpenAIError), _component(schema, AnthropicError)
    if api_key:
        schema["components"].setdefault("securitySchemes", {}).update({
            "bearer": {"type": "http", "scheme": "bearer"},
            "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"}})
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses = op["responses"]
            responses.pop("422", None)
            statuses = set(ERROR_STATUSES.get((method, path), _DEFAULT_STATUSES.get(method, (400, 404))))
            statuses.add(500)
            if api_key and is_protected(path):
                statuses.add(401)
                op["security"] = [{"bearer": []}, {"x-api-key": []}]
            ref = an_ref if is_anthropic_path(path) else oa_ref
            for status in sorted(statuses):
                if str(status) in responses:
                    continue
                if path == "/health":  # the same body as 200, with healthy false
                    body = responses.get("200", {}).get("content", {"application/json": {"schema": {}}})
                    responses[str(status)] = {"description": "Engine unhealthy", "content": body}
                    continue
                resp: dict = {"description": _DESCRIPTIONS.get(status, "Error"),
                              "content": {"application/json": {"schema": ref}}}
                if status == 429:
                    resp["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                                       "schema": {"type": "integer"}}}
                responses[str(status)] = resp
            if (method, path) in STREAMING:
                responses["200"].setdefault("content", {})["text/event-stream"] = {
                    "schema": {"type": "string", "description": "Server-sent events (\"stream\": true)"}}
    comps = schema.get("components", {}).get("schemas", {})
    if "TokenizeRequest" in comps:  # exactly one of prompt / messages (the route's 400 otherwise)
        comps["TokenizeRequest"]["anyOf"] = [
            {"required": ["prompt"], "properties": {"prompt": {"type": "string"}},
             "not": {"required": ["messages"], "properties": {"messages": {"type": "array"}}}},
            {"required": ["messages"], "properties": {"messages": {"type": "array"}},
             "not": {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}}}]
    tokens = comps.get("DetokenizeRequest", {}).get("properties", {}).get("tokens", {})
    if vocab_size and isinstance(tokens.get("items"), dict):
        tokens["items"].update({"minimum": 0, "maximum": vocab_size - 1})
    if not any('"#/components/schemas/HTTPValidationError"' in str(op).replace("'", '"')
               for ops in schema.get("paths", {}).values() for op in ops.values()):
        comps.pop("HTTPValidationError", None)
        comps.pop("ValidationError", None)
    return schema


def _complete_openapi(app: FastAPI, *, api_key: bool, vocab_size: int) -> None:
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_responses(build(), api_key=api_key, vocab_size=vocab_size)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
