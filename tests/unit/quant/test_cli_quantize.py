"""`ascend-v4 quantize` from the command line, and the end-to-end accuracy check (logits vs the source, next to
the QAT-simulation baseline) for every format on the tiny dummy."""

from __future__ import annotations

from click.testing import CliRunner

from ascend_v4.cli import main
from ascend_v4.cli.quantize import accuracy_report, format_accuracy


def test_cli_quantize_verify_e2e(tiny_src, tmp_path):
    out = tmp_path / "out"
    args = ["quantize", "-m", str(tiny_src), "-o", str(out), "-f", "w8a8", "--ep", "2", "-j", "2", "--verify",
            "--verify-e2e", "--e2e-tokens", "32", "--read-baseline", "full"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for text in ("files written", "MB/s of input", "throughput ratio", "peak RSS", "sha256 ok", "experts.w2",
                 "int8_channel", "baseline: official, QAT simulation off", "mean KL"):
        assert text in r.output, text
    r = CliRunner().invoke(main, args[:9])  # same conversion again: nothing to do
    assert r.exit_code == 0 and "already complete" in r.output
    r = CliRunner().invoke(main, ["quantize", "-m", str(tiny_src), "-o", str(out), "-f", "bf16"])
    assert r.exit_code == 1 and "DestinationConflictError" in r.output and "--force" in r.output


def test_cli_bad_source(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"model_type": "llama"}')
    r = CliRunner().invoke(main, ["quantize", "-m", str(tmp_path / "src"), "-o", str(tmp_path / "o"), "-f", "w8a8"])
    assert r.exit_code == 1 and "ConfigError" in r.output and "deepseek_v4" in r.output


def test_accuracy_every_format(tiny_src, converted):
    fmts = ["w8a8", "w4a8", "bf16", "fp8-experts", "native"]
    rows = accuracy_report(tiny_src, {f: converted(f) for f in fmts}, n_tokens=96)
    by = {r["name"]: r for r in rows}
    base = rows[0]
    assert base["name"].startswith("baseline") and base["kl"] > 0
    assert by["fp8-experts"]["kl"] == by["native"]["kl"] == 0 and by["native"]["top1"] == 1
    # judged against the baseline (random models have flat logits): each format costs at most a few x the
    # simulation's own effect; int4 experts cost the most
    assert by["bf16"]["kl"] < 1.5 * base["kl"]
    assert by["w8a8"]["kl"] < 2 * base["kl"]
    assert by["w4a8"]["kl"] < 3 * base["kl"] and by["w4a8"]["kl"] > by["w8a8"]["kl"]
    assert "mean KL" in format_accuracy(rows, 96)
