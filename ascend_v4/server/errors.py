"""HTTP errors in the shape each API family expects.

Routes raise `APIError(status, message, ...)`; the app's exception handlers render it as
OpenAI's `{"error": {"message", "type", "param", "code"}}` or, under `/v1/messages`, as Anthropic's
`{"type": "error", "error": {"type", "message"}}`. Pydantic validation errors become 400 (not FastAPI's 422).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def error_payload(status: int, message: str, *, anthropic: bool, param: str | None = None,
                  code: str | None = None) -> dict:
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


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not a bad request: say so without leaking a traceback.
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", path=request.url.path)
