"""Server-sent events over Starlette's StreamingResponse.

`SSEResponse` closes its event generator when the response ends for any reason (finished, client gone,
server shutdown), so the engine requests behind it are aborted at once instead of whenever the generator is
garbage-collected, and runs `on_close` (admission release) even if the generator never started.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_data(obj) -> str:
    """One `data:` event (OpenAI style); `obj` may be the literal "[DONE]"."""
    return f"data: {obj if isinstance(obj, str) else dumps(obj)}\n\n"


def sse_event(name: str, obj) -> str:
    """One named event (Anthropic style)."""
    return f"event: {name}\ndata: {dumps(obj)}\n\n"


class SSEResponse(StreamingResponse):
    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None] | None = None):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events, self._on_close = events, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except RuntimeError:  # still running elsewhere: it ends with its task
                    pass
            if self._on_close is not None:
                self._on_close()
