"""resolve_model: directories, HF cache (local only), presets, cached dummies."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from ascend_v4.checkpoint.dummy import DUMMY_FORMAT_VERSION, dummy_cache_dir, ensure_dummy_checkpoint
from ascend_v4.checkpoint.errors import ModelNotFoundError
from ascend_v4.checkpoint.reader import INDEX_NAME, read_checkpoint
from ascend_v4.checkpoint.resolve import resolve_model
from ascend_v4.model.args import ConfigError


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Empty HF cache, model dir and dummy cache, so nothing on the host machine is found."""
    for var in ("HF_HUB_CACHE", "HF_HOME", "ASCEND_V4_MODEL_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("ASCEND_V4_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _preset_config(name: str) -> str:
    return resources.files("ascend_v4.model.configs").joinpath(f"{name}.json").read_text()


def _fake_checkpoint(d: Path, preset: str) -> Path:
    """config.json + index only: enough for resolution, which never reads tensors."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(_preset_config(preset))
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": {}}))
    return d


def test_flash_not_found_lists_places(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("ASCEND_V4_MODEL_DIR", str(models))
    with pytest.raises(ModelNotFoundError) as ei:
        resolve_model("flash")
    msg = str(ei.value)
    assert str(models) in msg and str(models / "DeepSeek-V4-Flash") in msg
    assert str(tmp_path / "hub" / "models--deepseek-ai--DeepSeek-V4-Flash" / "snapshots") in msg
    assert "huggingface-cli download deepseek-ai/DeepSeek-V4-Flash" in msg and "--dummy" in msg
    monkeypatch.delenv("ASCEND_V4_MODEL_DIR")
    assert "ASCEND_V4_MODEL_DIR: not set" in str(pytest.raises(ModelNotFoundError, resolve_model, "pro").value)


def test_hf_cache_layout(tmp_path):
    repo = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-V4-Flash"
    snap = _fake_checkpoint(repo / "snapshots" / "0123abcd", "flash")
    _fake_checkpoint(repo / "snapshots" / "old", "flash")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for spec in ("flash", "deepseek-ai/DeepSeek-V4-Flash"):
        r = resolve_model(spec)
        assert (r.path, r.preset, r.is_dummy) == (snap, "flash", False)
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download someone/other"):
        resolve_model("someone/other")


def test_model_dir_env(tmp_path, monkeypatch):
    models = tmp_path / "models"
    _fake_checkpoint(models / "DeepSeek-V4-Flash", "pro")  # wrong model under the Flash name: skipped
    pro = _fake_checkpoint(models / "DeepSeek-V4-Pro", "pro")
    monkeypatch.setenv("ASCEND_V4_MODEL_DIR", str(models))
    assert resolve_model("pro").path == pro
    with pytest.raises(ModelNotFoundError, match="config.json of another model"):
        resolve_model("flash")
    monkeypatch.setenv("ASCEND_V4_MODEL_DIR", str(pro))  # the env var may also be the checkpoint itself
    assert resolve_model("pro").path == pro


def test_directory(tmp_path):
    d = _fake_checkpoint(tmp_path / "ck", "flash")
    r = resolve_model(str(d))
    assert (r.path, r.preset, r.is_dummy) == (d, "flash", False)
    (d / "config.json").write_text(json.dumps(json.loads(_preset_config("flash")) | {"model_type": "deepseek_v41"}))
    with pytest.raises(ConfigError, match="deepseek_v41"):
        resolve_model(d)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not a checkpoint directory, a Hugging Face repo id"):
        resolve_model("no-such-thing")


def test_test_preset_makes_cached_dummy(tmp_path):
    target = dummy_cache_dir("tiny", 0)
    assert target == tmp_path / "cache" / "dummy" / "tiny-seed0"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a crashed earlier attempt: no index, must be rebuilt
    r = resolve_model("tiny")
    assert (r.path, r.preset, r.is_dummy) == (target, "tiny", True)
    assert read_checkpoint(target).dummy_tag == f"v{DUMMY_FORMAT_VERSION} seed=0"
    stamp = (target / INDEX_NAME).stat().st_mtime_ns
    assert ensure_dummy_checkpoint("tiny") == target  # reused, not rewritten
    assert (target / INDEX_NAME).stat().st_mtime_ns == stamp
    assert resolve_model(str(target)).is_dummy  # a dummy is recognised as a directory too
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    with pytest.raises(ModelNotFoundError, match="dummy checkpoints are not allowed"):
        resolve_model("tiny", allow_dummy=False)
