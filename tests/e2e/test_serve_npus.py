"""`ascend-v4 serve --npus 2`: the server drives the expert-parallel engine (2 Gloo ranks on CPU); the official
openai client gets the same greedy completion as from a single-process server, and Ctrl-C stops the workers."""

from __future__ import annotations

import openai
import psutil

from .conftest import LiveServer


def _complete(url: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0)
    return r.choices[0].text


def test_serve_with_expert_parallelism_matches_single_process(tiny_checkpoint, tmp_path):
    one = LiveServer(["--model", "tiny", "--no-access-log"], tmp_path / "one.log").wait_ready()
    try:
        ref = _complete(one.url)
    finally:
        one.stop()
    two = LiveServer(["--model", "tiny", "--npus", "2", "--no-access-log"], tmp_path / "two.log").wait_ready()
    workers = [p.pid for p in psutil.Process(two.proc.pid).children(recursive=True)]
    try:
        assert workers, "expected a worker process for rank 1"
        assert _complete(two.url) == ref
    finally:
        assert two.stop() == 0
    assert not [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
