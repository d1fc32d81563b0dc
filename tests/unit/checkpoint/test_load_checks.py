"""Bad values and tampered files in real checkpoint bytes: the loader's value checks (scales always, float weights
with check_weights), `generate --check-weights` / `--verify-checkpoint` end to end, and `serve`'s launch path."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ascend_v4.checkpoint.errors import CheckpointError
from ascend_v4.checkpoint.loader import scan_values, verify_checkpoint_files
from ascend_v4.checkpoint.reader import read_checkpoint, read_safetensors_header
from ascend_v4.model.args import ModelArgs
from ascend_v4.model.layers import ModelOptions
from ascend_v4.model.load import load_model
from ascend_v4.quant.manifest import MANIFEST_NAME, NoManifestError, verify_files

WIDTH = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1}
NAN_BF16 = struct.pack("<H", 0x7FC0)
INF_F32 = struct.pack("<f", float("inf"))
OPTS = ModelOptions(dtype=torch.float32)

# (tensor, element, bytes, dtype, expected text of the value); shapes are the tiny preset's
NORM_NAN = ("layers.1.attn_norm.weight", 17, NAN_BF16, "element 17 is nan (BF16)")
F32_INF = ("layers.0.hc_attn_fn", 1000, INF_F32, "element 1000 [1, 488] is +inf (F32)")
FP8_NAN = ("layers.0.attn.wq_b.weight", 5000, b"\x7f", "element 5000 [39, 8] is nan (byte 0x7f) (F8_E4M3)")
SCALE_NAN = ("layers.0.attn.wo_a.scale", 3, b"\xff", "element 3 [1, 1] is nan (byte 0xff) (F8_E8M0 scale)")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    from ascend_v4.checkpoint.dummy import write_dummy_checkpoint

    return write_dummy_checkpoint(ModelArgs.from_preset("tiny"), tmp_path_factory.mktemp("checks_src"),
                                  shard_bytes=4 << 20)


def _copy(root: Path, dst: Path) -> Path:
    """A copy of `root` whose files are hard links (corrupting one makes it a real copy first)."""
    shutil.copytree(root, dst, copy_function=os.link)
    return dst


def _own(path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.copyfile(path, tmp)
    os.replace(tmp, path)


def _corrupt(root: Path, dst: Path, *edits: tuple[str, int, bytes]) -> tuple[Path, dict[str, str]]:
    """Copy `root` and overwrite element `index` of each named tensor with `raw`; returns (dir, {tensor: file})."""
    _copy(root, dst)
    info = read_checkpoint(dst)
    files = {}
    for name, index, raw in edits:
        ent = info.tensors[name]
        path = dst / ent.file
        if path.stat().st_nlink > 1:
            _own(path)
        hdr = read_safetensors_header(path)
        t = hdr.tensors[name]
        pos = t.begin + index * WIDTH[t.dtype]
        assert pos + len(raw) <= t.end
        with open(path, "r+b") as f:
            f.seek(pos)
            f.write(raw)
        files[name] = ent.file
    return dst, files


@pytest.fixture(scope="module")
def bad(src, tmp_path_factory):
    """bad(case) -> (dir, shard file of the tensor) for each single-corruption case."""
    cache: dict[str, tuple[Path, str]] = {}

    def get(case: tuple[str, int, bytes, str]) -> tuple[Path, str]:
        name = case[0]
        if name not in cache:
            d, files = _corrupt(src, tmp_path_factory.mktemp("bad") / "ckpt", case[:3])
            cache[name] = (d, files[name])
        return cache[name]

    return get


# ---------------------------------------------------------------------------------------------- loader
def test_clean_checkpoint_loads_with_checks(src):
    load_model(src, OPTS, check_weights=True)
    assert scan_values(src) == []


def test_nan_scale_fails_by_default(bad):
    d, file = bad(SCALE_NAN)
    with pytest.raises(CheckpointError) as ei:
        load_model(d, OPTS)
    assert ei.value.problems == [f"{file}: {SCALE_NAN[0]}: {SCALE_NAN[3]}"]
    assert file in str(ei.value) and SCALE_NAN[0] in str(ei.value)
    assert scan_values(d, weights=False) == ei.value.problems


@pytest.mark.parametrize("case", [NORM_NAN, F32_INF, FP8_NAN], ids=["bf16-norm-nan", "f32-inf", "fp8-nan"])
def test_bad_weight_fails_with_check_weights(bad, case):
    d, file = bad(case)
    load_model(d, OPTS)  # not checked by default (only scales are)
    with pytest.raises(CheckpointError) as ei:
        load_model(d, OPTS, check_weights=True)
    line = f"{file}: {case[0]}: {case[3]}"
    assert ei.value.problems == [line]
    assert line in str(ei.value)
    assert scan_values(d) == [line]
    assert scan_values(d, weights=False) == []


def test_overflowing_scales_depend_on_the_scaled_format(src, tmp_path):
    """UE8M0 byte 247 (2^120) overflows an e4m3 block (x448) but not an FP4 run (x6); 253 overflows both."""
    fp4_scale = "layers.0.ffn.experts.0.w1.scale"
    d, _ = _corrupt(src, tmp_path / "a", ("layers.0.attn.wq_b.scale", 1, b"\xf7"), (fp4_scale, 2, b"\xf7"))
    with pytest.raises(CheckpointError) as ei:
        load_model(d, OPTS)
    assert len(ei.value.problems) == 1
    assert "layers.0.attn.wq_b.scale: element 1 [1, 0] is scale 2^120 (byte 0xf7)" in ei.value.problems[0]
    d, files = _corrupt(src, tmp_path / "b", (fp4_scale, 2, b"\xfd"))
    with pytest.raises(CheckpointError, match=rf"{files[fp4_scale]}: {fp4_scale}: element 2 \[0, 2\] is scale "
                                              rf"2\^126 \(byte 0xfd\)"):
        load_model(d, OPTS)


def test_every_bad_tensor_is_listed(src, tmp_path):
    d, files = _corrupt(src, tmp_path / "all", *(c[:3] for c in (NORM_NAN, F32_INF, FP8_NAN, SCALE_NAN)))
    with pytest.raises(CheckpointError) as ei:
        load_model(d, OPTS, check_weights=True)
    want = {f"{files[c[0]]}: {c[0]}: {c[3]}" for c in (NORM_NAN, F32_INF, FP8_NAN, SCALE_NAN)}
    assert set(ei.value.problems) == want
    assert "4 problems" in str(ei.value)
    assert set(scan_values(d)) == want


def test_serve_launch_path_checks_weights(bad):
    pytest.importorskip("fastapi")
    from ascend_v4.server.launch import ServeOptions, build_app

    d, file = bad(NORM_NAN)
    with pytest.raises(CheckpointError, match=f"{file}: {NORM_NAN[0]}: element 17 is nan"):
        build_app(ServeOptions(model=str(d), device="cpu", check_weights=True))


# ---------------------------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ascend-v4")
    cmd = [exe] if exe else [sys.executable, "-c", "from ascend_v4.cli import main; main()"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)


def test_generate_check_weights_cli(bad):
    d, file = bad(NORM_NAN)
    p = _cli("generate", "--model", str(d), "--check-weights", "--prompt", "hi", "--max-tokens", "1")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert f"{file}: {NORM_NAN[0]}: element 17 is nan (BF16)" in p.stderr


# ---------------------------------------------------------------------------------------------- --verify-checkpoint
@pytest.fixture(scope="module")
def converted(src, tmp_path_factory) -> Path:
    from ascend_v4.quant.tool import quantize

    out = tmp_path_factory.mktemp("w8a8")
    quantize(read_checkpoint(src), out, "w8a8", read_baseline="off")
    return out


def _tamper(converted: Path, dst: Path) -> tuple[Path, str]:
    """Copy of the conversion with one bit flipped in the data region of one of its shards."""
    _copy(converted, dst)
    shard = sorted(p for p in dst.glob("*.safetensors"))[-1]
    _own(shard)
    t = next(iter(read_safetensors_header(shard).tensors.values()))
    with open(shard, "r+b") as f:
        f.seek(t.begin)
        b = f.read(1)
        f.seek(t.begin)
        f.write(bytes([b[0] ^ 0x01]))
    return dst, shard.name


def test_verify_files(converted, tmp_path):
    assert verify_files(converted) == []
    verify_checkpoint_files(converted)
    d, name = _tamper(converted, tmp_path / "t")
    probs = verify_files(d)
    assert len(probs) == 1 and probs[0].startswith(f"{name}: sha256 ") and "the manifest says" in probs[0]
    with pytest.raises(CheckpointError, match=name):
        verify_checkpoint_files(d)
    with open(d / name, "ab") as f:
        f.write(b"\0")
    assert verify_files(d) == [f"{name}: {(converted / name).stat().st_size + 1} bytes, the manifest says "
                               f"{(converted / name).stat().st_size} (sha256 not computed)"]
    (d / name).unlink()
    assert verify_files(d)[0].startswith(f"{name}: missing")


def test_verify_without_manifest(src):
    with pytest.raises(NoManifestError, match=f"nothing to verify: no {MANIFEST_NAME}"):
        verify_files(src)
    with pytest.raises(CheckpointError, match="nothing to verify"):
        verify_checkpoint_files(src)


def test_generate_verify_checkpoint_cli_passes_untampered(converted):
    p = _cli("generate", "--model", str(converted), "--verify-checkpoint", "--prompt-ids", "0,5", "--max-tokens", "1")
    assert p.returncode == 0, p.stderr


def test_generate_verify_checkpoint_cli_names_tampered_file(converted, tmp_path):
    d, name = _tamper(converted, tmp_path / "t")
    p = _cli("generate", "--model", str(d), "--verify-checkpoint", "--prompt-ids", "0,5", "--max-tokens", "1")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert f"{name}: sha256" in p.stderr and "the manifest says" in p.stderr
