"""Server-sent events over Starlette's StreamingResponse.

`SSEResponse` closes its event generator when the response ends for any reason (finished, client gone,
server shutdown), so the engine requests behind it are aborted at once instead of whenever the generator is
garbage-collected, and runs `on_close` (admission release) even if the generator never started.

When the server's drain timeout runs out (the request's `stopping` event, serving.current_stopping), an open
stream is cut between two events and ends cleanly with its API's terminal events (`shutdown_events`):
OpenAI `data: {"error": {...}}` then `data: [DONE]`; Anthropic `event: error` with an `overloaded_error`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import error_payload, is_anthropic_path
from .serving import SHUTDOWN_MESSAGE, current_stopping


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_data(obj) -> str:
    """One `data:` event (OpenAI style); `obj` may be the literal "[DONE]"."""
    return f"data: {obj if isinstance(obj, str) else dumps(obj)}\n\n"


def sse_event(name: str, obj) -> str:
    """One named event (Anthropic style)."""
    return f"event: {name}\ndata: {dumps(obj)}\n\n"


def shutdown_events(path: str, message: str = SHUTDOWN_MESSAGE) -> str:
    """Terminal events of a stream the server ends at shutdown, in the API family of `path`."""
    if is_anthropic_path(path):
        return sse_event("error", {"type": "error", "error": {"type": "overloaded_error", "message": message}})
    return sse_data(error_payload(503, message, anthropic=False, code="server_shutting_down")) + sse_data("[DONE]")


class SSEResponse(StreamingResponse):
    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None] | None = None):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events, self._on_close = events, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stopping = current_stopping() if scope["type"] == "http" else None
        try:
            if stopping is None:
                await super().__call__(scope, receive, send)
            else:
                await self._stream_until_stopped(scope, receive, send, stopping)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except RuntimeError:  # still running elsewhere: it ends with its task
                    pass
            if self._on_close is not None:
                self._on_close()

    async def _stream_until_stopped(self, scope: Scope, receive: Receive, send: Send,
                                    stopping: asyncio.Event) -> None:
        """StreamingResponse's body loop in its own task, raced against the client's disconnect and the
        server's `stopping` event (plain asyncio: one cancellation, so the generator's cleanup can await)."""
        started = False

        async def stream() -> None:
            nonlocal started
            # uvicorn's send awaits (flow control) only before writing, so a cancelled send wrote nothing
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            started = True
            async for chunk in self.body_iterator:
                if not isinstance(chunk, bytes | memoryview):
                    chunk = chunk.encode(self.charset)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

        body = asyncio.ensure_future(stream())
        gone = asyncio.ensure_future(self.listen_for_disconnect(receive))
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({body, gone, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (body, gone, stop):
                if not t.done():
                    t.cancel()
            await asyncio.gather(body, gone, stop, return_exceptions=True)
        if gone.done() and not gone.cancelled():
            return  # client gone: nothing more to send
        if not body.cancelled() and body.exception() is not None:
            if isinstance(body.exception(), OSError):
                raise ClientDisconnect() from body.exception()
            raise body.exception()
        tail = b""
        if body.cancelled():  # stopped by the server's shutdown
            if not started:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            tail = shutdown_events(scope.get("path", "")).encode(self.charset)
        try:
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        except OSError:
            raise ClientDisconnect() from None
