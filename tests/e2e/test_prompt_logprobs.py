"""Prompt log-probs over HTTP, as evaluation harnesses use them: `/v1/completions` with `echo` + `logprobs` and
`max_tokens` 0 or 1 (lm-eval's log-likelihood requests, string and token-id prompts, streamed or not), vLLM's
`prompt_logprobs` on completions and chat, and the same numbers whether the prompt's prefix was cached or not
(the engine-level golden comparison against a plain forward is tests/unit/runtime/test_prompt_logprobs.py)."""

from __future__ import annotations

import json
import math

import httpx2 as httpx
import pytest

from .conftest import LiveServer

TEXT = "The capital of France is Paris. The capital of Italy is Rome. " * 12  # > 1 prefix-cache block


@pytest.fixture(scope="module")
def url(tiny_checkpoint, tmp_path_factory):
    srv = LiveServer(["--model", "tiny", "--no-access-log", "--max-model-len", "2048"],
                     tmp_path_factory.mktemp("plp") / "server.log").wait_ready()
    yield srv.url
    srv.stop()


def _post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json={"model": "tiny", **body}, timeout=120, trust_env=False)
    assert r.status_code == 200, r.text
    return r.json()


def _ids(url: str, text: str) -> list[int]:
    """Token ids of `text` without BOS."""
    return _post(url, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]


def test_echo_logprobs_max_tokens_0_and_1(url):
    ids = [0] + _ids(url, TEXT)
    zero = _post(url, "/v1/completions", {"prompt": TEXT, "echo": True, "logprobs": 2, "max_tokens": 0,
                                          "temperature": 0})["choices"][0]
    one = _post(url, "/v1/completions", {"prompt": TEXT, "echo": True, "logprobs": 2, "max_tokens": 1,
                                         "temperature": 0})["choices"][0]
    assert zero["text"] == TEXT and one["text"].startswith(TEXT) and zero["finish_reason"] == "length"
    lz, lo = zero["logprobs"], one["logprobs"]
    assert len(lz["tokens"]) == len(ids) and len(lo["tokens"]) == len(ids) + 1
    assert lz["token_logprobs"][0] is None and lz["top_logprobs"][0] is None
    for a, b in zip(lz["token_logprobs"][1:], lo["token_logprobs"][1:len(ids)]):
        assert a <= 0 and math.isclose(a, b, abs_tol=1e-5)
    for tok, lp, top in zip(lz["tokens"][1:], lz["token_logprobs"][1:], lz["top_logprobs"][1:]):
        assert len(top) >= 1 and max(top.values()) >= lp - 1e-6
        if tok in top:
            assert math.isclose(top[tok], lp, abs_tol=1e-6)
    offs = lz["text_offset"]
    assert offs[0] == 0 and all(b - a == len(t) for a, b, t in zip(offs, offs[1:], lz["tokens"]))


def test_token_id_prompt_as_lm_eval_sends_it(url):
    """lm-eval (tokenized requests): prompt = context + continuation ids, reads token_logprobs[ctxlen:-1]."""
    ctx = [0] + _ids(url, "Question: what is the capital of France? Answer:")
    cont = _ids(url, " Paris")
    res = _post(url, "/v1/completions", {"prompt": ctx + cont, "echo": True, "logprobs": 1, "max_tokens": 1,
                                         "temperature": 0})["choices"][0]["logprobs"]
    assert len(res["token_logprobs"]) == len(ctx) + len(cont) + 1
    cont_lps = res["token_logprobs"][len(ctx):-1]
    assert len(cont_lps) == len(cont) and all(isinstance(v, float) and v <= 0 for v in cont_lps)
    # is_greedy as lm-eval computes it: the continuation token is the top alternative at each position
    greedy = [max(top, key=top.get) == tok for tok, top in zip(res["tokens"][len(ctx):-1],
                                                                res["top_logprobs"][len(ctx):-1])]
    assert len(greedy) == len(cont)


def test_prefix_cache_does_not_change_prompt_logprobs(url):
    body = {"prompt": TEXT, "max_tokens": 0, "prompt_logprobs": 1}
    cold = _post(url, "/v1/completions", body)["choices"][0]["prompt_logprobs"]
    _post(url, "/v1/completions", {"prompt": TEXT, "max_tokens": 2})  # the prefix is cached now
    warm = _post(url, "/v1/completions", body)["choices"][0]["prompt_logprobs"]
    assert cold[0] is None and len(cold) == len(warm) == len(_ids(url, TEXT)) + 1
    for a, b in zip(cold[1:], warm[1:]):
        assert a.keys() == b.keys()
        for k in a:
            assert math.isclose(a[k]["logprob"], b[k]["logprob"], abs_tol=1e-6) and a[k]["rank"] == b[k]["rank"]
    first = next(iter(cold[1].values()))
    assert first["rank"] >= 1 and isinstance(first["decoded_token"], str)


def test_echo_logprobs_streamed_equal_non_streamed(url):
    body = {"prompt": TEXT[:120], "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0}
    whole = _post(url, "/v1/completions", body)["choices"][0]
    text, tokens, lps = "", [], []
    with httpx.stream("POST", url + "/v1/completions", json={"model": "tiny", **body, "stream": True},
                      timeout=120, trust_env=False) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])["choices"][0]
            text += ch["text"]
            if ch.get("logprobs"):
                tokens += ch["logprobs"]["tokens"]
                lps += ch["logprobs"]["token_logprobs"]
    assert text == whole["text"] and tokens == whole["logprobs"]["tokens"]
    assert lps[0] is None and all(math.isclose(a, b, abs_tol=1e-6) for a, b in
                                  zip(lps[1:], whole["logprobs"]["token_logprobs"][1:]))


def test_chat_prompt_logprobs(url):
    res = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                              "prompt_logprobs": 0, "thinking": {"type": "disabled"}})
    plp = res["prompt_logprobs"]
    assert plp[0] is None and len(plp) == res["usage"]["prompt_tokens"]
    assert all(len(d) == 1 for d in plp[1:])


def test_bad_values_are_400(url):
    for body, field in (({"prompt": "x", "max_tokens": -1}, "max_tokens"),
                        ({"prompt": "x", "prompt_logprobs": 99}, "prompt_logprobs")):
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", **body}, timeout=30, trust_env=False)
        assert r.status_code == 400 and field in r.text


def test_max_tokens_0_without_prompt_logprobs_is_400(url):
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0}, timeout=30,
                   trust_env=False)
    assert r.status_code == 400 and "max_tokens" in r.text and "prompt_logprobs" in r.text
