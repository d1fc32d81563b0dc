"""A real engine that fails mid-stream (step raises) behind a live server: the open stream gets a clean error
event, new requests get 503, /health reports 503 with the reason; nothing hangs."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx2 = pytest.importorskip("httpx2")

pytestmark = pytest.mark.slow


def test_engine_failure_real_engine(tiny_checkpoint, in_thread):
    import torch

    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model
    from ascend_v4.runtime.async_engine import AsyncEngine
    from ascend_v4.runtime.config import EngineConfig
    from ascend_v4.runtime.engine import Engine
    from ascend_v4.server.app import create_app
    from ascend_v4.server.serving import ServerConfig
    from ascend_v4.tokenizer import Tokenizer

    model = load_model(tiny_checkpoint, ModelOptions(dtype=torch.float32, quant_sim=False, dequantize_weights=True))
    engine = Engine(model, Tokenizer.default(), EngineConfig(max_num_seqs=4, max_queue=4))
    ae = AsyncEngine(engine)
    real_step, calls = engine.step, {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("device lost (injected)")
        return real_step()

    engine.step = failing_step
    with in_thread(create_app(ae, ServerConfig(model_names=["tiny"]))) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        got = []
        with pytest.raises(openai.APIError, match="device lost"):
            for chunk in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=50, stream=True, extra_body={"ignore_eos": True}):
                got.append(chunk)
        assert got  # some chunks arrived before the failure
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert e.value.status_code == 503 and "device lost" in e.value.message
        with pytest.raises(anthropic.APIStatusError) as e2:
            anthropic.Anthropic(base_url=url, api_key="x", max_retries=0).messages.create(
                model="tiny", max_tokens=2, messages=[{"role": "user", "content": "x"}])
        assert e2.value.status_code == 503
        h = httpx2.get(url + "/health", trust_env=False)
        assert h.status_code == 503 and h.json()["healthy"] is False and "device lost" in h.json()["reason"]
