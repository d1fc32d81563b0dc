"""`ascend-v4 bench offline`: help, bad input, the workload generator, the two engine workers (in-process, with
mixed lengths and a shared prefix) and one real end-to-end run on `tiny` with the transformers peer."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from ascend_v4.bench.offline import OfflineBenchConfig, OfflineBenchError, percentile
from ascend_v4.bench.workload import FIRST_ID, make_workload, output_len_range
from ascend_v4.cli import main

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _invoke(*args: str):
    return CliRunner().invoke(main, ["bench", "offline", *args])


def test_help_names_every_option():
    r = _invoke("--help")
    assert r.exit_code == 0, r.output
    for opt in ("--model", "--concurrency", "--num-prompts", "--input-len", "--output-len", "--output-len-spread",
                "--shared-prefix", "--peer", "--quant-sim", "--threads", "--seed", "--timeout", "--npus", "--tp",
                "--dp", "--json"):
        assert opt in r.output, f"{opt} missing from --help"
    assert "transformers" in r.output and "peak RSS" in r.output
    assert "offline" in CliRunner().invoke(main, ["bench", "--help"]).output


@pytest.mark.parametrize("args, msg", [
    (["--concurrency", "1,x"], "--concurrency"),
    (["--concurrency", "0"], "--concurrency"),
    (["--input-len", "16", "--shared-prefix", "16"], "--shared-prefix"),
    (["--output-len-spread", "1.0"], "--output-len-spread"),
    (["--peer", "vllm"], "--peer"),
    (["--quant-sim", "maybe"], "--quant-sim"),
    (["--model", "/nonexistent/ckpt"], "--model"),
    (["--model", "tiny", "--timeout", "0.01", "--concurrency", "1", "--peer", "none"], "--timeout"),
    (["--npus", "4", "--tp", "2", "--dp", "3"], "--tp/--dp"),
])
def test_bad_input_is_a_clear_error(args, msg):
    r = _invoke(*args)
    assert r.exit_code != 0
    assert msg in r.output, r.output
    assert "Traceback" not in r.output


def test_missing_transformers_names_the_peer_option(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    r = _invoke("--model", "tiny", "--concurrency", "1")
    assert r.exit_code != 0 and "--peer" in r.output and "transformers" in r.output, r.output


def test_config_validation_names_the_field():
    with pytest.raises(OfflineBenchError, match="--input-len"):
        OfflineBenchConfig(input_len=0).validate()
    with pytest.raises(OfflineBenchError, match="--concurrency"):
        OfflineBenchConfig(concurrency=()).validate()
    OfflineBenchConfig().validate()  # the defaults are valid


def test_workload_shapes_prefix_and_lengths():
    w = make_workload(5, 40, 10, spread=0.5, shared_prefix=20, bos_id=0, vocab_size=129280, seed=3)
    assert len(w.prompts) == len(w.output_lens) == 5
    assert all(len(p) == 40 and p[0] == 0 for p in w.prompts)
    assert all(p[:20] == w.prompts[0][:20] for p in w.prompts)
    assert len({tuple(p[20:]) for p in w.prompts}) == 5  # the rest differs per request
    assert all(FIRST_ID <= t for p in w.prompts for t in p[1:])
    lo, hi = output_len_range(10, 0.5)
    assert (lo, hi) == (5, 15) and all(lo <= k <= hi for k in w.output_lens)
    assert w.output_tokens == sum(w.output_lens)
    assert make_workload(5, 40, 10, spread=0.5, shared_prefix=20, seed=3) == w  # reproducible
    other = make_workload(5, 40, 10, spread=0.5, shared_prefix=20, seed=4)
    assert other.prompts[0][:20] == w.prompts[0][:20] and other.prompts[0][20:] != w.prompts[0][20:]
    assert make_workload(3, 8, 7).output_lens == [7, 7, 7]
    with pytest.raises(ValueError, match="shared_prefix"):
        make_workload(2, 8, 4, shared_prefix=8)
    with pytest.raises(ValueError, match="spread"):
        make_workload(2, 8, 4, spread=1.5)


def test_percentile_interpolates():
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    with pytest.raises(ValueError):
        percentile([], 50)


@pytest.fixture(scope="module")
def tiny_path():
    from ascend_v4.checkpoint.resolve import resolve_model

    return str(resolve_model("tiny").path)


def _spec(path: str, concurrency: int, work, warm, prefix_caching: bool) -> dict:
    return {"model": path, "concurrency": concurrency, "prompts": work.prompts, "output_lens": work.output_lens,
            "warmup_prompts": warm.prompts, "quant_sim": False, "prefix_caching": prefix_caching, "threads": None}


def test_ours_worker_mixed_lengths_and_prefix_cache(tiny_path):
    from ascend_v4.bench.offline_worker import run_ours
    from ascend_v4.runtime.config import EngineConfig

    shared = 2 * EngineConfig().block_size  # prefix hits come in whole cache blocks
    mk = dict(num_requests=3, input_len=shared + 16, output_len=4, spread=0.5, shared_prefix=shared)
    work, warm = make_workload(**mk, seed=0), make_workload(**mk, seed=1)
    res = run_ours(_spec(tiny_path, 2, work, warm, prefix_caching=True))
    assert res["output_tokens"] == res["computed_tokens"] == work.output_tokens
    # the warm-up left the shared prefix in the prefix cache, so every timed request reused some of it
    assert 0 < res["cached_prompt_tokens"] <= 3 * shared
    assert all(0 < t <= res["wall_s"] for t in res["latencies_s"])


def test_ours_worker_on_two_dp_groups(tiny_path):
    """--npus 2 --dp 2: the level (4) is the total, each group admitting 2; the same output tokens."""
    from ascend_v4.bench.offline_worker import run_ours

    mk = dict(num_requests=4, input_len=20, output_len=3, spread=0.0, shared_prefix=0)
    work, warm = make_workload(**mk, seed=0), make_workload(**mk, seed=1)
    res = run_ours({**_spec(tiny_path, 4, work, warm, prefix_caching=False), "npus": 2, "tp": None, "dp": 2})
    assert res["output_tokens"] == work.output_tokens
    assert res["layout"] == {"npus": 2, "tp": 1, "dp": 2, "ep": 2, "source": "--tp"}


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers (the test extra)")
def test_transformers_worker_runs_batches_to_their_longest(tiny_path):
    from ascend_v4.bench.offline_worker import run_transformers

    mk = dict(num_requests=3, input_len=8, output_len=4, spread=0.5)
    work, warm = make_workload(**mk, seed=0), make_workload(**mk, seed=1)
    res = run_transformers(_spec(tiny_path, 2, work, warm, prefix_caching=False))
    lens = work.output_lens
    assert res["output_tokens"] == sum(lens)
    # two batches: rows 0-1 run to the longer of the two, row 2 alone
    assert res["computed_tokens"] == 2 * max(lens[:2]) + lens[2]
    lat = res["latencies_s"]
    assert lat[0] == lat[1] < lat[2] == pytest.approx(res["wall_s"], rel=0.05)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers (the test extra)")
def test_real_tiny_run_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = _invoke("--model", "tiny", "--concurrency", "1,2", "--input-len", "8", "--output-len", "3", "--threads", "1",
                "--json", str(out))
    assert r.exit_code == 0, r.output
    table = r.stdout.splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("conc"))
    assert "ours tok/s" in table[head] and "hf tok/s" in table[head] and "RSS" in table[head]
    assert [line.split()[0] for line in table[head + 1:head + 3]] == ["1", "2"]
    assert "concurrency 2: transformers done" in r.stderr  # progress goes to stderr

    res = json.loads(out.read_text())
    assert res["model"] == "tiny" and res["config"]["peer"] == "transformers"
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 2]
    for lv in res["levels"]:
        want = lv["num_prompts"] * 3
        assert lv["num_prompts"] == lv["concurrency"] and lv["output_tokens"] == want
        for eng in ("ours", "transformers"):
            e = lv[eng]
            assert e["output_tokens"] == e["computed_tokens"] == want
            assert e["tok_s"] == pytest.approx(want / e["wall_s"])
            assert 0 < e["mean_latency_s"] <= e["p99_latency_s"] <= e["wall_s"] * 1.001
            assert e["peak_rss_mib"] > 50 and e["threads"] == 1
        assert lv["ratio"] > 0 and lv["ratio"] == pytest.approx(lv["ours"]["tok_s"] / lv["transformers"]["tok_s"])
