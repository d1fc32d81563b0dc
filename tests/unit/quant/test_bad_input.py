"""Bad input gives a named error and leaves nothing that looks complete: missing / truncated shards, headers
that lie about sizes, unexpected dtypes, non-V4 configs (reader errors, before anything is written), not
enough disk space (checked up front), a shard truncated during the run, bad options."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from ascend_v4.checkpoint.errors import CheckpointError
from ascend_v4.checkpoint.reader import read_checkpoint
from ascend_v4.cli.quantize import QuantizeRequest, run_quantize
from ascend_v4.model.args import ConfigError
from ascend_v4.quant import tool
from ascend_v4.quant.errors import InsufficientDiskSpaceError, NonFiniteSourceError, QuantizeError, SourceReadError, \
    UnsupportedConversionError
from ascend_v4.quant.manifest import MANIFEST_NAME


def _clone(src: Path, dst: Path, copy: tuple[str, ...] = ()) -> Path:
    """A checkpoint directory of symlinks to `src`, with real copies of the files named in `copy`."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name in copy or p.name == "model.safetensors.index.json" or p.name == "config.json":
            shutil.copyfile(p, dst / p.name)
        else:
            (dst / p.name).symlink_to(p)
    return dst


def _small_shard(src: Path) -> str:
    return min((p for p in src.glob("*.safetensors")), key=lambda p: p.stat().st_size).name


def _run(src: Path, out: Path, fmt: str = "w8a8", **kw):
    return run_quantize(QuantizeRequest(str(src), out, fmt, read_baseline="off", **kw))


def _nothing_complete(out: Path) -> None:
    assert not (out / MANIFEST_NAME).exists()
    assert not list(out.glob("*.index.json")) if out.exists() else True


def test_missing_shard(tiny_src, tmp_path):
    src = _clone(tiny_src, tmp_path / "src")
    (src / _small_shard(tiny_src)).unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        _run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_shard(tiny_src, tmp_path):
    name = _small_shard(tiny_src)
    src = _clone(tiny_src, tmp_path / "src", copy=(name,))
    with open(src / name, "r+b") as f:
        f.truncate((src / name).stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="truncated"):
        _run(src, tmp_path / "out")
    _nothing_complete(tmp_path / "out")


def test_header_lies_about_sizes(tiny_src, tmp_path):
    name = _small_shard(tiny_src)
    src = _clone(tiny_src, tmp_path / "src", copy=(name,))
    raw = (src / name).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + n])
    key = next(k for k in hdr if k != "__metadata__")
    hdr[key]["shape"][0] += 1  # the data offsets no longer match shape x dtype
    new = json.dumps(hdr).encode()
    new += b" " * (-len(new) % 8)
    (src / name).write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    with pytest.raises(CheckpointError, match="header says"):
        _run(src, tmp_path / "out")


def test_unexpected_dtype(tiny_src, tiny_info, tmp_path):
    name = tiny_info.tensors["layers.0.attn_norm.weight"].file
    src = _clone(tiny_src, tmp_path / "src")
    (src / name).unlink()
    with safe_open(tiny_src / name, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["layers.0.attn_norm.weight"] = tensors["layers.0.attn_norm.weight"].float()
    save_file(tensors, str(src / name), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layers.0.attn_norm.weight: dtype F32, expected BF16"):
        _run(src, tmp_path / "out")


def test_non_v4_config(tiny_src, tmp_path):
    src = _clone(tiny_src, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "deepseek_v3"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type"):
        _run(src, tmp_path / "out")


def test_not_enough_disk_space(tiny_src, small_fs):
    out = small_fs(10 << 20) / "out"  # a real 10 MiB filesystem; the tiny conversion needs ~60 MB
    with pytest.raises(InsufficientDiskSpaceError, match="needs .* GB more"):
        _run(tiny_src, out)
    assert not list(out.iterdir())  # nothing written at all


def test_shard_truncated_during_the_run(tiny_src, tiny_info, tmp_path):
    name = tiny_info.tensors["layers.1.ffn.experts.0.w1.weight"].file
    src = _clone(tiny_src, tmp_path / "src", copy=(name,))
    info = read_checkpoint(src)  # validated while intact
    with open(src / name, "r+b") as f:
        f.truncate((src / name).stat().st_size // 2)
    out = tmp_path / "out"
    with pytest.raises(SourceReadError, match="truncated or modified"):
        tool.quantize(info, out, "w8a8", read_baseline="off")
    _nothing_complete(out)
    with pytest.raises(CheckpointError, match="did not finish"):
        read_checkpoint(out)


def test_bad_options(tiny_src, converted, tmp_path):
    with pytest.raises(UnsupportedConversionError, match="--ep 3 must divide the 8"):
        _run(tiny_src, tmp_path / "a", ep=3)
    with pytest.raises(QuantizeError, match="already a converted checkpoint"):
        _run(converted("w8a8"), tmp_path / "b")
    with pytest.raises(QuantizeError, match="must differ"):
        _run(tiny_src, tiny_src)


def _corrupt(tiny_src: Path, tiny_info, dst: Path, tensor: str, element: int, raw: bytes) -> Path:
    """A clone of the tiny checkpoint whose `tensor` has `raw` written over element `element` (real bytes)."""
    ent = tiny_info.tensors[tensor]
    src = _clone(tiny_src, dst, copy=(ent.file,))
    with open(src / ent.file, "r+b") as f:
        f.seek(ent.begin + element * len(raw))
        f.write(raw)
    return src


NONFINITE = [  # (tensor, element, bytes, dtype name in the message, value in the message)
    ("layers.0.attn_norm.weight", 5, struct.pack("<H", 0x7FC0), "BF16", "nan"),  # a copied BF16 norm
    ("layers.1.attn.attn_sink", 2, struct.pack("<f", float("inf")), "F32", "+inf"),  # a copied F32 tensor
    ("layers.0.attn.wq_a.weight", 77, b"\x7f", "F8_E4M3", "nan"),  # an FP8 weight w8a8 converts
    ("layers.0.attn.wq_a.scale", 0, b"\xff", "F8_E8M0", "nan"),  # its UE8M0 scale ([1, 1] in tiny)
    ("layers.1.ffn.experts.3.w2.scale", 4, b"\xfe", "F8_E8M0", "overflow"),  # an FP4 expert's scale: 2^127 * 6
]


@pytest.mark.parametrize("tensor,element,raw,dtype,value", NONFINITE, ids=[n[0] for n in NONFINITE])
@pytest.mark.parametrize("fmt", ["w8a8", "native"])
def test_nonfinite_source_values_are_named(tensor, element, raw, dtype, value, fmt, tiny_src, tiny_info, tmp_path):
    src = _corrupt(tiny_src, tiny_info, tmp_path / "src", tensor, element, raw)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteSourceError) as ei:
        _run(src, out, fmt)
    msg = str(ei.value)
    assert f"{tiny_info.tensors[tensor].file}: {tensor}: element {element}" in msg and dtype in msg
    assert value in msg and "--allow-nonfinite" in msg
    _nothing_complete(out)


def test_nonfinite_from_the_cli_then_allowed(tiny_src, tiny_info, tmp_path):
    tensor = "layers.0.attn_norm.weight"
    src = _corrupt(tiny_src, tiny_info, tmp_path / "src", tensor, 3, struct.pack("<H", 0x7FC0))
    cmd = ["ascend-v4", "quantize", "-m", str(src), "-o", str(tmp_path / "out"), "-f", "w8a8", "--read-baseline",
           "off"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{tensor}: element 3 is nan (BF16)" in r.stderr
    r = subprocess.run(cmd + ["--resume", "--allow-nonfinite"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"warning: {tiny_info.tensors[tensor].file}: {tensor}: element 3" in r.stderr
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()
