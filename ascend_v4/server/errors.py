"""HTTP errors in the shape each API family expects.

Routes raise `APIError(status, message, ...)`; the app's exception handlers render it as
OpenAI's `{"error": {"message", "type", "param", "code"}}` or, under `/v1/messages`, as Anthropic's
`{"type": "error", "error": {"type", "message"}}`. Pydantic validation errors become 400 (not FastAPI's 422).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ascend_v4.tokenizer import first_unencodable

from .protocol import AnthropicError, AnthropicErrorBody, OpenAIError, OpenAIErrorBody

# status -> (OpenAI error type, Anthropic error type)
_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_request_error", "authentication_error"),
    403: ("invalid_request_error", "permission_error"),
    404: ("invalid_request_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_exceeded", "rate_limit_error"),
    500: ("internal_server_error", "api_error"),
    503: ("service_unavailable", "api_error"),
}


class APIError(Exception):
    """An error answer: HTTP status, message, and OpenAI's optional `param` / `code`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def _printable(text: str | None) -> str | None:
    """`text` as valid Unicode: a lone surrogate echoed from the request (e.g. in a model name) would make the
    UTF-8 response body fail to encode (a 500); it is written as its escape (`\\ud800`) instead."""
    if text is None or first_unencodable(text) is None:
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_payload(status: int, message: str, *, anthropic: bool, param: str | None = None,
                  code: str | None = None) -> dict:
    message, param = _printable(message), _printable(param)
    oa_type, an_type = _TYPES.get(status, ("internal_server_error" if status >= 500 else "invalid_request_error",
                                           "api_error" if status >= 500 else "invalid_request_error"))
    if anthropic:
        return AnthropicError(error=AnthropicErrorBody(type=an_type, message=message)).model_dump()
    return OpenAIError(error=OpenAIErrorBody(message=message, type=oa_type, param=param,
                                             code=code if code is not None else status)).model_dump()


def error_response(status: int, message: str, *, path: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_payload(status, message, anthropic=is_anthropic_path(path), param=param, code=code)
    return JSONResponse(body, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    first = errs[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errs) - 1} more errors)" if len(errs) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.message, path=request.url.path, param=exc.param, code=exc.code,
                          headers=exc.headers)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = _describe_validation(exc)
    return error_response(400, message, path=request.url.path, param=param)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), path=request.url.path,
                          headers=getattr(exc, "headers", None))


def _key_path(path: str, key: str) -> str:
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def find_unencodable(value: Any, path: str = "") -> tuple[str, str, int, str] | None:
    """Where the first string of a request body that the tokenizer cannot take (a lone UTF-16 surrogate) is,
    in document order, dict keys included: (field path like `messages[0].content`, "text" or "a key",
    character index, the char)."""
    if isinstance(value, str):
        at = first_unencodable(value)
        return None if at is None else (path, "text", at, value[at])
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and (at := first_unencodable(k)) is not None:
                return path or "body", "a key", at, k[at]
            found = find_unencodable(v, _key_path(path, str(k)))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = find_unencodable(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


async def unencodable_text_handler(request: Request, exc: Exception) -> JSONResponse:
    """Text the tokenizer cannot take (`UnencodableTextError`, raised at its single choke point,
    `Tokenizer.encode`) -> 400 naming the request field that holds it (found in the request's JSON body)."""
    try:
        body = await request.json()  # FastAPI already read and parsed it: cached on the request
    except Exception:  # noqa: BLE001 - no JSON body: answer without a field
        body = None
    found = find_unencodable(body)
    if found is None:
        return error_response(400, f"request: {exc}", path=request.url.path)
    where, what, at, char = found
    return error_response(400, f"{where}: {what} contains a lone UTF-16 surrogate (U+{ord(char):04X}) at character "
                               f"{at}; text must be valid Unicode (the tokenizer cannot take it)",
                          path=request.url.path, param=where)


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not a bad request: say so without leaking a traceback.
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", path=request.url.path)
