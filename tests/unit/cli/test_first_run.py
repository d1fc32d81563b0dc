"""`ascend-v4 doctor --first-run`: the day-one kit, run for real on this CPU machine (the same steps an Atlas owner
runs on NPUs): every step in its own process, one report directory, failures and hangs recorded, not fatal."""

from __future__ import annotations

import json
import sys

from ascend_v4.cli import first_run as fr


def test_first_run_quick_writes_one_report_with_every_step(tmp_path):
    from click.testing import CliRunner

    from ascend_v4.cli import main

    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["doctor", "--first-run", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "first-run-report.json").read_text())
    steps = {s["name"]: s["result"] for s in rep["steps"]}
    assert list(steps) == ["environment", "op-self-check", "generate-tiny", "generate-ep2", "throughput-small"]
    assert rep["device"] == "cpu" and steps["throughput-small"] == {"status": "skipped", "why": "--quick"}
    assert steps["environment"]["status"] == "ok" and steps["environment"]["json"]["checks"]
    checks = {c["name"]: c for c in steps["op-self-check"]["json"]["checks"]}
    assert not checks["op self-check"]["ok"]  # no torch_npu here: the report says why instead of failing
    assert steps["generate-tiny"]["status"] == "ok" and len(steps["generate-tiny"]["json"]["token_ids"]) == 8
    ep = steps["generate-ep2"]["json"]
    assert ep["layout"]["npus"] == 2 and ep["token_ids"] == steps["generate-tiny"]["json"]["token_ids"]
    text = (out / "first-run-report.txt").read_text()
    assert all(f"== {name}:" in text for name in steps) and "[first-run] 5/5" in r.output


def test_a_failing_or_hanging_step_is_recorded_not_raised(tmp_path):
    bad = fr.run_step(fr.Step("bad", "unknown model", ["generate", "--model", str(tmp_path / "nope"),
                                                         "--prompt-ids", "0,1"], 120))
    assert bad["status"] == "failed" and bad["exit_code"] != 0 and "nope" in bad["stderr"]
    slow = fr.Step("slow", "never ends in time", ["doctor", "--json"], 0.01)
    assert fr.run_step(slow)["status"] == "timeout"
    assert fr.CLI[0] == sys.executable
