"""--speculative on `generate` and `bench offline` (issue 15): auto follows the checkpoint, the figures reach
`generate --json` and the bench table / JSON, and a method the checkpoint cannot run is a clear error."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ascend_v4.cli import main


def _generate(*args: str):
    return CliRunner().invoke(main, ["generate", "--prompt-ids", "0,100,200,300", "--max-tokens", "8", "--json",
                                     *args])


def test_generate_json_reports_dspark_drafting():
    r = _generate("--model", "tiny-dspark")  # --speculative auto
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    sp = res["speculative"]
    assert sp["method"] == "dspark" and sp["proposed"] > 0 and 0 <= sp["accepted"] <= sp["proposed"]
    assert len(sp["acceptance_per_position"]) == 5 and sp["tokens_per_step"] >= 1.0
    r = _generate("--model", "tiny-dspark", "--speculative", "none")
    plain = json.loads(r.output.strip().splitlines()[-1])
    assert plain["speculative"]["method"] == "none" and plain["token_ids"] == res["token_ids"]


def test_generate_refuses_a_method_the_checkpoint_lacks():
    r = _generate("--model", "tiny", "--speculative", "dspark")
    assert r.exit_code != 0 and "carries no DSPARK weights" in r.output and "it has: mtp" in r.output
    assert "Traceback" not in r.output
    assert "--speculative-tokens" in CliRunner().invoke(main, ["generate", "--help"]).output


def test_bench_offline_reports_acceptance():
    r = CliRunner().invoke(main, ["bench", "offline", "--model", "tiny-dspark", "--concurrency", "2",
                                  "--input-len", "16", "--output-len", "6", "--peer", "none", "--speculative",
                                  "dspark", "--speculative-tokens", "3", "--json", "-"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    sp = res["levels"][0]["ours"]["speculative"]
    assert sp["method"] == "dspark" and sp["proposed"] > 0 and len(sp["acceptance_per_position"]) == 3
    assert "tokens per verify step" in r.stderr


def test_generate_text_mode_prints_the_acceptance():
    r = CliRunner().invoke(main, ["generate", "--model", "tiny-dspark", "--prompt-ids", "0,5,6,7", "--max-tokens",
                                  "6"])
    assert r.exit_code == 0, r.output
    assert "dspark:" in r.stderr and "draft tokens accepted" in r.stderr and "tokens per verify step" in r.stderr
