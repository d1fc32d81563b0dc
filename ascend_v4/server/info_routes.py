"""`GET /tokenizer_info`: the tokenizer's configuration, as vLLM serves it (lm-eval's remote-tokenizer mode).

vLLM answers with the tokenizer's init kwargs, i.e. `tokenizer_config.json` as the tokenizer loaded it: file
path fields dropped, special tokens given as their text (an `AddedToken` object becomes its `content`),
`tokenizer_class` set, and `chat_template` only when the tokenizer has one. Here the same object is built
from the checkpoint's `tokenizer_config.json` when there is one, completed from the tokenizer itself
(`bos_token`, `eos_token`, `pad_token`, `add_bos_token: false`, `model_max_length`), so a client always finds
the keys lm-eval reads (`eos_token`, `bos_token`, `pad_token`). DeepSeek-V4 ships no Jinja chat template
(its prompts come from the Python encoder), so `chat_template` is normally absent: clients must render chat
prompts through the server (`/v1/chat/completions`, `/tokenize` with `messages`).

Like `/health` and `/version` it needs no API key: it tells nothing about the served data, only how text
maps to ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from .serving import ServerState

# tokenizer_config.json fields that are local file paths (vLLM drops vocab_file / merges_file; the others are
# the same kind of thing).
_PATH_FIELDS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")
TOKENIZER_CONFIG = "tokenizer_config.json"


class TokenizerInfoResponse(BaseModel):
    """The tokenizer configuration (tokenizer_config.json as loaded); more keys than these may appear."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool = False
    model_max_length: int


def _plain(value: Any) -> Any:
    """JSON form of a tokenizer_config value: AddedToken objects become their text."""
    if isinstance(value, dict):
        if "content" in value and value.get("__type") == "AddedToken":
            return value["content"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def tokenizer_info(st: ServerState) -> dict:
    """The /tokenizer_info body of a server (the checkpoint's tokenizer_config.json when present)."""
    config: dict = {}
    if st.config.model_root:
        try:
            loaded = json.loads((Path(st.config.model_root) / TOKENIZER_CONFIG).read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            config = {}
    info = {k: _plain(v) for k, v in config.items() if k not in _PATH_FIELDS}
    tok = st.tokenizer
    info.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    info.setdefault("bos_token", tok.decode([tok.bos_id]))
    info.setdefault("eos_token", tok.decode([tok.eos_id]))
    info.setdefault("pad_token", info["eos_token"])  # V4's own config pads with EOS
    info.setdefault("add_bos_token", False)
    info.setdefault("model_max_length", st.max_model_len)
    if not info.get("chat_template"):
        info.pop("chat_template", None)
    return info


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/tokenizer_info", response_model=TokenizerInfoResponse)
    async def get_tokenizer_info(request: Request) -> JSONResponse:
        st: ServerState = request.app.state.server
        cached = getattr(request.app.state, "tokenizer_info", None)
        if cached is None:
            cached = request.app.state.tokenizer_info = tokenizer_info(st)
        return JSONResponse(cached)

    return router
