"""DeepSeek-V4 chat format: prompt rendering (`encoding`) and completion parsing (`parsing`).

Independent of the model and the server; both directions are tested against the official encoder's output.
"""

from .encoding import (
    ENCODER_0731,
    ENCODER_APRIL,
    encode_messages,
    render_ids,
    thinking_options,
)
from .parsing import ParsedMessage, StreamEvent, StreamingParser, ToolCall, parse_completion

__all__ = [
    "ENCODER_0731",
    "ENCODER_APRIL",
    "ParsedMessage",
    "StreamEvent",
    "StreamingParser",
    "ToolCall",
    "encode_messages",
    "parse_completion",
    "render_ids",
    "thinking_options",
]
