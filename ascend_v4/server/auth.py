"""ASGI middlewares: API-key check and HTTP response counting.

Both are plain ASGI (not Starlette's BaseHTTPMiddleware) so streamed responses and client-disconnect
detection pass through untouched.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

# Paths that need the key when one is set, matched by whole path segments (`/tokenize` covers `/tokenize` and
# `/tokenize/...`, not `/tokenizer_info`); /health, /metrics, /version, /tokenizer_info and the OpenAPI docs
# stay open.
PROTECTED_PATHS = ("/v1", "/tokenize", "/detokenize")


def is_protected(path: str) -> bool:
    """Whether `path` needs the API key (when one is set)."""
    return any(path == p or path.startswith(p + "/") for p in PROTECTED_PATHS)


def presented_keys(headers: Headers) -> list[str]:
    """Keys a client presented: `Authorization: Bearer KEY` (OpenAI) and `x-api-key: KEY` (Anthropic)."""
    keys = []
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    if headers.get("x-api-key"):
        keys.append(headers["x-api-key"].strip())
    return keys


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.key is None or scope["type"] != "http" or scope.get("method") == "OPTIONS"
                or not is_protected(scope["path"])):
            await self.app(scope, receive, send)
            return
        keys = presented_keys(Headers(scope=scope))
        if any(hmac.compare_digest(k.encode(), self.key) for k in keys):
            await self.app(scope, receive, send)
            return
        msg = ("invalid API key" if keys else
               "missing API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`")
        await error_response(401, msg, path=scope["path"], code="invalid_api_key")(scope, receive, send)


class HTTPMetricsMiddleware:
    """Counts responses by route and status (`ascend_v4:http_requests_total`). Unknown paths share one
    label so a scanner cannot blow up the series count."""

    def __init__(self, app: ASGIApp, observe, routes: frozenset[str]):
        self.app, self.observe, self.routes = app, observe, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.observe(route, status["code"])
