"""`create_app(engine) -> FastAPI`: the HTTP server over an `AsyncEngine`. Nothing is built at import time.

Routes: OpenAI (`openai_routes`), Anthropic (`anthropic_routes`), and here the operational ones:
`GET /health` (engine health; 503 when unhealthy), `GET /metrics` (Prometheus), `POST /tokenize`,
`POST /detokenize`. Shutting the app down (lifespan end, after uvicorn has drained open requests) stops
the engine.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ascend_v4 import __version__
from ascend_v4.runtime.async_engine import AsyncEngine

from . import anthropic_routes, openai_routes
from .auth import APIKeyMiddleware, HTTPMetricsMiddleware
from .errors import APIError, api_error_handler, http_error_handler, unhandled_error_handler, validation_error_handler
from .metrics import CONTENT_TYPE
from .protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from .render import openai_messages, render_chat, resolve_thinking
from .serving import ServerConfig, ServerState


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
    app.add_exception_handler(Exception, unhandled_error_handler)
    routers = [openai_routes.build_router(), anthropic_routes.build_router()]
    for router in routers:
        app.include_router(router)
    _add_operational_routes(app)

    routes = frozenset(p for r in [*app.routes, *(r for rt in routers for r in rt.routes)]
                       if (p := getattr(r, "path", None)))
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

    @app.get("/metrics")
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
