"""Drain timeout reached (`ServerState.stop_requests`): open streams end with their API's terminal events, a
non-streaming request gets 503, the engine requests are aborted. And nothing per request outlives it:
admission slots, engine streams, asyncio tasks, metric label sets."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

httpx2 = pytest.importorskip("httpx2")

from ascend_v4.server.app import create_app
from ascend_v4.server.serving import ServerConfig
from ascend_v4.server.sse import shutdown_events

MODEL = "deepseek-v4-flash"
MSG = [{"role": "user", "content": "x"}]


class LoopCatcher:
    """A script that remembers the server's event loop (scripts run inside the engine's generate)."""

    def __init__(self, pieces):
        self.pieces, self.loop = pieces, None

    def __call__(self, ids, params):
        self.loop = asyncio.get_running_loop()
        return self.pieces


def wait_for(cond, timeout=10.0):
    t_end = time.monotonic() + timeout
    while not cond() and time.monotonic() < t_end:
        time.sleep(0.01)
    return cond()


def test_shutdown_events_per_family():
    oa = shutdown_events("/v1/chat/completions", "bye").split("\n\n")
    assert json.loads(oa[0][6:])["error"] == {"message": "bye", "type": "service_unavailable", "param": None,
                                              "code": "server_shutting_down"}
    assert oa[1] == "data: [DONE]"
    an = shutdown_events("/v1/messages", "bye")
    assert an.startswith("event: error\ndata: ")
    assert json.loads(an.split("\n")[1][6:]) == {"type": "error", "error": {"type": "overloaded_error",
                                                                            "message": "bye"}}


def test_stop_requests_ends_streams_cleanly_and_non_streaming_gets_503(scripted, live):
    script = LoopCatcher(["tok"] * 2000)
    eng = scripted(script, step_delay=0.01)
    app = create_app(eng, ServerConfig(model_names=[MODEL]))
    st = app.state.server
    bodies: dict[str, list[str]] = {}
    answers: dict[str, httpx2.Response] = {}

    def stream(name, path, body):
        with httpx2.stream("POST", url + path, json=body, trust_env=False, timeout=30) as r:
            bodies[name] = list(r.iter_lines())

    def plain(name, path, body):
        answers[name] = httpx2.post(url + path, json=body, trust_env=False, timeout=30)

    with live(app) as url:
        jobs = [threading.Thread(target=stream, args=("chat", "/v1/chat/completions",
                                                      {"model": MODEL, "messages": MSG, "stream": True})),
                threading.Thread(target=stream, args=("cmpl", "/v1/completions",
                                                      {"model": MODEL, "prompt": "x", "n": 2, "max_tokens": 5000,
                                                       "stream": True})),
                threading.Thread(target=stream, args=("msgs", "/v1/messages",
                                                      {"model": MODEL, "messages": MSG, "max_tokens": 5000,
                                                       "stream": True})),
                threading.Thread(target=plain, args=("plain", "/v1/chat/completions",
                                                     {"model": MODEL, "messages": MSG})),
                threading.Thread(target=plain, args=("plain_an", "/v1/messages",
                                                     {"model": MODEL, "messages": MSG, "max_tokens": 5000}))]
        for j in jobs:
            j.start()
        assert wait_for(lambda: eng.in_flight == 6), eng.in_flight
        script.loop.call_soon_threadsafe(st.stop_requests)
        for j in jobs:
            j.join(10)
        assert not any(j.is_alive() for j in jobs)
        for name in ("chat", "cmpl"):
            data = [line[6:] for line in bodies[name] if line.startswith("data: ")]
            assert data[-1] == "[DONE]" and len(data) >= 2, name
            assert json.loads(data[-2])["error"]["code"] == "server_shutting_down", name
        events = [line for line in bodies["msgs"] if line]
        assert events[0] == "event: message_start" and events[-2] == "event: error"
        assert json.loads(events[-1][6:])["error"]["type"] == "overloaded_error"
        assert answers["plain"].status_code == 503 and "shutting down" in answers["plain"].json()["error"]["message"]
        assert answers["plain_an"].status_code == 503 and answers["plain_an"].json()["type"] == "error"
        assert wait_for(lambda: eng.in_flight == 0) and eng.aborted == 6 and st.admitted == 0
        r = httpx2.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG}, trust_env=False)
        assert r.status_code == 503  # nothing new is admitted any more
        m = httpx2.get(url + "/metrics", trust_env=False).text
        assert 'ascend_v4:request_success_total{finished_reason="abort"} 6.0' in m
        assert "disconnect" not in m.split("ascend_v4:request_success_total")[1].split("# HELP")[0]


def test_nothing_grows_per_request(scripted, live):
    """Many requests of every kind (streamed, whole, n=2, disconnected, refused, unknown paths): afterwards the
    admission count, engine streams, the loop's tasks and the metric label sets are back to their size."""
    script = LoopCatcher(["a", "b", "c"])
    eng = scripted(script, step_delay=0.002)
    app = create_app(eng, ServerConfig(model_names=[MODEL]))
    st = app.state.server

    def tasks() -> int:
        async def count():
            return len(asyncio.all_tasks())
        return asyncio.run_coroutine_threadsafe(count(), script.loop).result(5)

    def labels() -> int:
        return sum(len(c._metrics) for c in (st.metrics.http, st.metrics.finished))

    def burst(url, k):
        httpx2.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG}, trust_env=False)
        with httpx2.stream("POST", url + "/v1/completions", trust_env=False,
                           json={"model": MODEL, "prompt": "x", "n": 2, "stream": True}) as r:
            list(r.iter_lines())
        with httpx2.stream("POST", url + "/v1/messages", trust_env=False,
                           json={"model": MODEL, "messages": MSG, "max_tokens": 9, "stream": True}) as r:
            next(r.iter_lines())  # leave mid-stream: a disconnect
        httpx2.post(url + "/v1/chat/completions", json={"model": "nope", "messages": MSG}, trust_env=False)
        httpx2.get(url + f"/scan/{k}", trust_env=False)

    with live(app) as url:
        burst(url, 0)
        assert wait_for(lambda: eng.in_flight == 0 and st.admitted == 0)
        base_tasks, base_labels = tasks(), labels()
        for k in range(1, 25):
            burst(url, k)
        assert wait_for(lambda: eng.in_flight == 0 and st.admitted == 0)
        assert wait_for(lambda: tasks() <= base_tasks), (tasks(), base_tasks)
        assert labels() == base_labels
        assert not st.stopping._waiters  # every request's watch on the shutdown event was removed
