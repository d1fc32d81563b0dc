"""`ascend-v4 serve` options: fail-fast checks (no model is loaded), served names, socket binding."""

from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi")

from ascend_v4.cli import main  # noqa: E402
from ascend_v4.server.launch import ServeError, ServeOptions, bind_socket, check_options, served_names  # noqa: E402


def test_npus_below_one_fails_fast_with_a_clear_message():
    with pytest.raises(ServeError, match=">= 1"):
        check_options(ServeOptions(npus=0))


def test_served_names():
    assert served_names(ServeOptions(model="flash"), "flash") == ["deepseek-v4-flash", "flash"]
    assert served_names(ServeOptions(model=None), "tiny") == ["tiny"]
    assert served_names(ServeOptions(model="/d/x", served_model_names=["a", "b", "a"]), None) == ["a", "b"]


def test_busy_port_fails_before_loading():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)


def test_help_lists_the_issue_options():
    out = CliRunner().invoke(main, ["serve", "--help"]).output
    for opt in ("--model", "--npus", "--host", "--port", "--api-key", "--served-model-name", "--max-num-seqs",
                "--max-queue", "--max-model-len", "--require-reasoning-passback", "--kv-cache-dtype", "--block-size"):
        assert opt in out
    assert "serve" in CliRunner().invoke(main, ["bench", "--help"]).output


def test_cache_options_reach_the_engine():
    import asyncio

    from ascend_v4.server.launch import build_app

    app, _ = build_app(ServeOptions(model="tiny", kv_cache_dtype="fp8", cache_gib=0.05))
    ae = app.state.server.engine
    try:
        assert ae.engine.pool.kv_format == "fp8" and ae.engine.config.block_size == 128
    finally:
        asyncio.run(ae.shutdown(drain=False))
    with pytest.raises(ValueError, match="block_size 64 must be a multiple"):
        build_app(ServeOptions(model="tiny", block_size=64, cache_gib=0.05))


def test_speculative_follows_the_checkpoint_and_reaches_metrics():
    """serve --speculative auto on a DSpark checkpoint drafts with DSpark; /metrics carries vLLM's spec_decode_*
    counters (per chain position too); a method the checkpoint cannot run is refused before serving."""
    import asyncio

    from ascend_v4.runtime.sampling import SamplingParams
    from ascend_v4.server.launch import build_app
    from ascend_v4.server.metrics import ServerMetrics

    app, what = build_app(ServeOptions(model="tiny-dspark", cache_gib=0.05))
    ae = app.state.server.engine
    try:
        eng = ae.engine
        assert eng.config.speculative == "dspark" and eng.spec_tokens == 5 and "speculative dspark x5" in what

        async def one():  # through the AsyncEngine, whose thread steps the engine
            async for _ in ae.generate([0, 100, 200, 300], SamplingParams(max_tokens=8, temperature=0,
                                                                          ignore_eos=True)):
                pass
        asyncio.run(one())
        st = eng.stats()
        text = ServerMetrics(eng.stats, lambda: {"healthy": True}).render().decode()
        assert f"ascend_v4:spec_decode_num_draft_tokens_total {float(st['spec_proposed'])}" in text
        assert st["spec_proposed"] > 0 and 'ascend_v4:spec_decode_num_accepted_tokens_per_pos_total{position="0"}' in text
    finally:
        asyncio.run(ae.shutdown(drain=False))
    with pytest.raises(ServeError, match="carries no MTP weights"):
        build_app(ServeOptions(model="tiny-dspark", speculative="mtp", cache_gib=0.05))
    out = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--speculative" in out and "--speculative-tokens" in out and "--speculative-threshold" in out
