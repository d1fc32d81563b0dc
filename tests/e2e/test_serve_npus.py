"""`ascend-v4 serve --npus 2`: the server drives the multi-rank engine (2 Gloo ranks on CPU), with attention
data parallelism (`--tp 1`: DP 2) and with attention tensor parallelism (`--tp 2`); the official openai client gets the same
greedy completion, chat answer and stream as from a single-process server, and Ctrl-C stops the workers. Also
`--npus 4 --tp 2`: DP 2 x TP 2."""

from __future__ import annotations

import openai
import psutil
import pytest

from .conftest import LiveServer


def _complete(url: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0)
    return r.choices[0].text


def _chat(url: str) -> tuple[str, str]:
    """(chat answer, the same request streamed and joined)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    msgs = [{"role": "user", "content": "Name three colours."}]
    kw = {"model": "tiny", "messages": msgs, "max_tokens": 8, "temperature": 0,
          "extra_body": {"ignore_eos": True, "thinking": {"type": "disabled"}}}  # 8 tokens of content to compare
    r = client.chat.completions.create(**kw)
    chunks = client.chat.completions.create(**kw, stream=True)
    return r.choices[0].message.content, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory):
    one = LiveServer(["--model", "tiny", "--no-access-log"], tmp_path_factory.mktemp("one") / "log").wait_ready()
    try:
        return _complete(one.url), _chat(one.url)
    finally:
        one.stop()


@pytest.mark.parametrize("npus,tp", [("2", "1"), ("2", "2"), ("4", "2")])
def test_serve_on_two_ranks_matches_single_process(reference, tmp_path, npus, tp):
    two = LiveServer(["--model", "tiny", "--npus", npus, "--tp", tp, "--no-access-log"], tmp_path / "two.log")
    two.wait_ready()
    workers = [p.pid for p in psutil.Process(two.proc.pid).children(recursive=True)]
    try:
        assert len(workers) == int(npus) - 1, "expected a worker process per rank > 0"
        assert _complete(two.url) == reference[0]
        answer, streamed = _chat(two.url)
        assert answer == streamed == reference[1][0] and answer
        log = (tmp_path / "two.log").read_text()
        assert f"attention DP {int(npus) // int(tp)} x TP {tp}" in log
    finally:
        assert two.stop() == 0
    assert not [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
