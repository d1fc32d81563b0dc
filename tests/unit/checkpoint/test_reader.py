"""Reader / validator: every kind of bad checkpoint is reported with the file and the tensor named."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ascend_v4.checkpoint.dummy import write_dummy_checkpoint
from ascend_v4.checkpoint.errors import MAX_LISTED_PROBLEMS, CheckpointError
from ascend_v4.checkpoint.reader import INDEX_NAME, read_checkpoint, read_safetensors_header
from ascend_v4.model.args import ConfigError, ModelArgs

NORM = "layers.0.attn_norm.weight"  # a small BF16 tensor in a small shard
SINK = "layers.1.attn.attn_sink"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _shared_tiny(tmp_path_factory)


@pytest.fixture
def bad(ckpt, tmp_path) -> Path:
    """A cheap copy to damage: JSON files copied, shards symlinked (damaged shards are rewritten as files)."""
    out = tmp_path / "bad"
    out.mkdir()
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, out / f.name)
        else:
            shutil.copy(f, out / f.name)
    return out


def _index(d: Path) -> dict:
    return json.loads((d / INDEX_NAME).read_text())


def _set_index(d: Path, index: dict) -> None:
    (d / INDEX_NAME).write_text(json.dumps(index))


def _rewrite_shard(d: Path, tensor: str, edit) -> str:
    """Rewrite the shard holding `tensor` with `edit(dict_of_tensors)` applied; returns the shard name."""
    fname = _index(d)["weight_map"][tensor]
    with safe_open(str(d / fname), framework="pt") as f:
        ts = {k: f.get_tensor(k).clone() for k in f.keys()}
    edit(ts)
    (d / fname).unlink()
    save_file(ts, str(d / fname), metadata={"format": "pt"})
    return fname


def _problems(d: Path, **kw) -> CheckpointError:
    with pytest.raises(CheckpointError) as ei:
        read_checkpoint(d, **kw)
    return ei.value


def test_valid_checkpoint(ckpt):
    info = read_checkpoint(ckpt)
    assert len(info.shards) > 1 and info.has_index and info.dummy_tag


def test_missing_tensor(bad):
    fname = _rewrite_shard(bad, NORM, lambda ts: ts.pop(NORM))
    idx = _index(bad)
    del idx["weight_map"][NORM]
    _set_index(bad, idx)
    e = _problems(bad)
    assert f"{INDEX_NAME}: {NORM}: missing (expected BF16 [128])" in str(e) and len(e.problems) == 1
    assert str(bad) in str(e) and fname


def test_tensor_in_index_but_not_in_shard(bad):
    fname = _rewrite_shard(bad, NORM, lambda ts: ts.pop(NORM))
    e = _problems(bad)
    assert f"{fname}: {NORM}: listed in the index but not in the shard" in str(e) and len(e.problems) == 1


def test_unexpected_tensor(bad):
    extra = "layers.0.attn.bogus"

    def add(ts):
        ts[extra] = torch.zeros(3)

    fname = _rewrite_shard(bad, NORM, add)
    idx = _index(bad)
    idx["weight_map"][extra] = fname
    _set_index(bad, idx)
    e = _problems(bad)
    assert f"{fname}: {extra}: unexpected tensor (F32 [3])" in str(e)
    # and one the index does not list
    _set_index(bad, _index(bad) | {"weight_map": {k: v for k, v in idx["weight_map"].items() if k != extra}})
    assert f"{fname}: {extra}: present in the shard but not listed in the index" in str(_problems(bad))


def test_mtp_tensors_ignored_without_mtp(bad):
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"num_nextn_predict_layers": 0}))
    info = read_checkpoint(bad)  # mtp.* present on disk, not expected, not an error
    assert any(n.startswith("mtp.") for n in info.tensors)


def test_wrong_shape_and_dtype(bad):
    def edit(ts):
        ts[SINK] = torch.zeros(5)
        ts[NORM] = ts[NORM].float()

    fname = _rewrite_shard(bad, SINK, edit)
    assert _index(bad)["weight_map"][NORM] == fname
    e = _problems(bad)
    assert f"{fname}: {SINK}: shape [5], expected [4]" in str(e)
    assert f"{fname}: {NORM}: dtype F32, expected BF16" in str(e)
    assert len(e.problems) == 2


def test_truncated_shard(bad):
    fname = _index(bad)["weight_map"][NORM]
    data = (bad / fname).read_bytes()
    (bad / fname).unlink()
    (bad / fname).write_bytes(data[:-100])
    e = _problems(bad)
    assert f"{fname}: " in str(e) and "past the end of the file" in str(e)
    (bad / fname).write_bytes(data[:5])  # not even a header length
    assert f"{fname}: file is 5 bytes, too short" in str(_problems(bad))


def test_header_lies_about_sizes(bad):
    fname = _index(bad)["weight_map"][NORM]
    data = (bad / fname).read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"] = [x + 64 for x in header[last]["data_offsets"]]  # runs past EOF
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (bad / fname).unlink()
    (bad / fname).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + hlen:])
    e = _problems(bad)
    assert f"{fname}: {last}: data ends at byte" in str(e) and "past the end of the file" in str(e)
    # the header parser alone raises too, naming the file
    with pytest.raises(CheckpointError, match=fname):
        read_safetensors_header(bad / fname)


def test_index_names_missing_shard(bad):
    fname = _index(bad)["weight_map"][SINK]
    (bad / fname).unlink()
    e = _problems(bad)
    assert f"{INDEX_NAME}: names shard {fname} which does not exist" in str(e) and len(e.problems) == 1


def test_no_index(bad):
    (bad / INDEX_NAME).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        read_checkpoint(bad)
    (bad / INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=INDEX_NAME):
        read_checkpoint(bad)


def test_corrupt_config(bad):
    (bad / "config.json").write_text('{"model_type": "deepseek_v4", ')
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        read_checkpoint(bad)


def test_non_v4_config(bad):
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"model_type": "deepseek_v41"}))
    with pytest.raises(ConfigError, match="deepseek_v41") as ei:
        read_checkpoint(bad)
    assert str(bad) in str(ei.value) and isinstance(ei.value, ValueError)


def test_many_problems_are_summarised(bad):
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"n_routed_experts": 16}))  # 8 extra experts per block
    e = _problems(bad)
    assert len(e.problems) > MAX_LISTED_PROBLEMS
    assert f"... and {len(e.problems) - MAX_LISTED_PROBLEMS} more" in str(e)
    assert str(e).count("\n  - ") == MAX_LISTED_PROBLEMS
    assert isinstance(e, ValueError)


def _shared_tiny(tmp_path_factory) -> Path:
    """tiny, seed 0, 4 MB shards; written once per session and shared by modules that never modify it."""
    d = tmp_path_factory.getbasetemp() / "shared-tiny-seed0-4mb"
    if not (d / INDEX_NAME).is_file():
        write_dummy_checkpoint(ModelArgs.from_preset("tiny"), d, shard_bytes=4 << 20)
    return d
