"""`ascend-v4 generate` through the installed console script (a real subprocess) and via click."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from ascend_v4.cli import main


def test_generate_json_console_script():
    exe = shutil.which("ascend-v4")
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    p = subprocess.run([exe, "generate", "--model", "tiny", "--prompt-ids", "0,100,200", "--max-tokens", "5",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["prompt_token_ids"] == [0, 100, 200]
    assert 1 <= len(res["token_ids"]) <= 5 and res["finish_reason"] in ("stop", "length")
    assert isinstance(res["text"], str)


def test_generate_chat_thinking_text_output():
    r = CliRunner().invoke(main, ["generate", "--prompt", "Why is the sky blue?", "--chat", "--thinking", "high",
                                  "--max-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "[4 tokens" in r.output or "finish=stop" in r.output


@pytest.mark.parametrize("args, msg", [
    (["--prompt", "x", "--prompt-ids", "1,2"], "exactly one of"),
    ([], "exactly one of"),
    (["--prompt-ids", "1,a"], "comma-separated integers"),
    (["--chat", "--prompt-ids", "1,2"], "--chat needs --prompt"),
    (["--model", "/nonexistent/dir", "--prompt", "x"], "nonexistent"),
    (["--model", "pro", "--prompt", "x"], "ASCEND_V4_MODEL_DIR"),
])
def test_generate_bad_input_is_a_clear_error(args, msg, monkeypatch, tmp_path):
    monkeypatch.setenv("ASCEND_V4_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    r = CliRunner().invoke(main, ["generate", *args])
    assert r.exit_code != 0
    assert msg in r.output
    assert "Traceback" not in r.output


def test_generate_help_documents_options():
    r = CliRunner().invoke(main, ["generate", "--help"])
    assert r.exit_code == 0
    for opt in ("--model", "--prompt-ids", "--thinking", "--temperature", "--seed", "--dtype", "--json"):
        assert opt in r.output
