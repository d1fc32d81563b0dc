"""The native CPU kernels (ops/cpu_native.c through ops/cpu.py) equal the torch references of the FP8 / FP4 QAT
round-trips bit for bit (NaN bit patterns, signed zeros, subnormals, ties and scales just above a power of two
included), are what CPU tensors run, and fall back to the references without a C compiler."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from ascend_v4 import ops
from ascend_v4.ops import cpu, cpu_native
from ascend_v4.ops.reference import formats

needs_cc = pytest.mark.skipif(shutil.which((os.environ.get("CC") or "cc").split()[0]) is None,
                                reason="no C compiler: the CPU runs the references (tested below in a subprocess)")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Rows at scales 2^-40 .. 2^20, exact zeros, fp32 subnormals and negative zeros sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-40, 20, (*shape[:-1], 1), generator=g).float())
    flat = x.view(-1)
    flat[::97] = 0.0
    flat[3::101] = -0.0
    flat[5::1000] *= 1e-30
    flat[7::1001] = -1e-42  # an fp32 subnormal
    return x


def _adversarial(qmax: float, block: int) -> torch.Tensor:
    """One row per case: block maxima at, just above and just below qmax * 2^k (where the scale exponent turns),
    ties of the e4m3 / e2m1 grids, NaN of both signs, infinities, all-zero rows."""
    cases = [qmax * 2.0 ** k * f for k in range(-45, 30) for f in (1.0, 1 + 2 ** -23, 1 - 2 ** -24, 1.5, 0.875)]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(cases) + 8, block, generator=g) * 0.1
    x[: len(cases), 1] = torch.tensor(cases, dtype=torch.float32)
    n = len(cases)
    x[n, 2], x[n + 1, 3], x[n + 2, 4], x[n + 3, 5] = float("nan"), -float("nan"), float("inf"), -float("inf")
    x[n + 4], x[n + 5] = 0.0, -0.0
    x[n + 6] = torch.linspace(-qmax, qmax, block)  # every grid step (and its midpoints) at scale 1
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid.abs() <= qmax)].unique()
    mids = ((grid[1:] + grid[:-1]) / 2)[:block]
    x[n + 7, : mids.numel()] = mids  # ties: e4m3 midpoints (and, for FP4, values between its steps)
    return x


@needs_cc
@pytest.mark.parametrize("shape", [(1, 128), (16, 512), (128, 512), (700, 4, 128), (2048, 512)])
def test_fp8_roundtrip_is_the_reference_bit_for_bit(shape):
    x = _random(shape, sum(shape))
    assert _same(cpu.fp8_roundtrip(x, 128), formats.fp8_roundtrip(x, 128))
    assert _same(cpu.fp8_roundtrip(x, 64), formats.fp8_roundtrip(x, 64))  # the KV cache's 1x64 runs


@needs_cc
@pytest.mark.parametrize("shape", [(1, 128), (16, 16, 128), (2048, 16, 128)])
def test_fp4_roundtrip_is_the_reference_bit_for_bit(shape):
    x = _random(shape, sum(shape))
    assert _same(cpu.fp4_roundtrip(x, 32), formats.fp4_roundtrip(x, 32))


@needs_cc
def test_edge_values_are_the_reference_bit_for_bit():
    x8, x4 = _adversarial(formats.FP8_MAX, 128), _adversarial(formats.FP4_MAX, 32)
    assert _same(cpu.fp8_roundtrip(x8, 128), formats.fp8_roundtrip(x8, 128))
    assert _same(cpu.fp4_roundtrip(x4, 32), formats.fp4_roundtrip(x4, 32))
    # the cases are real: NaN blocks stay NaN, the grids round, and the rows are not left unchanged
    y = cpu.fp8_roundtrip(x8, 128)
    assert y[-8].isnan().all() and not torch.equal(y, x8)


@needs_cc
def test_non_contiguous_and_other_dtypes():
    x = _random((64, 256), 3)
    t = x.t().contiguous().t()  # same values, transposed strides
    assert _same(cpu.fp8_roundtrip(t, 128), formats.fp8_roundtrip(x, 128))
    b = x.bfloat16()  # not fp32: the reference itself
    assert torch.equal(cpu.fp8_roundtrip(b, 128), formats.fp8_roundtrip(b, 128))
    e = torch.empty(0, 128)
    assert cpu.fp8_roundtrip(e, 128).shape == (0, 128)


@needs_cc
def test_cpu_tensors_run_the_native_kernels():
    assert cpu_native.load() is not None
    assert ops._CPU["fp8_roundtrip"] is cpu.fp8_roundtrip and ops._CPU["fp4_roundtrip"] is cpu.fp4_roundtrip
    x = _random((16, 512), 11)
    assert _same(ops.fp8_roundtrip(x, 128), formats.fp8_roundtrip(x, 128))


def test_without_a_compiler_the_references_run(tmp_path):
    """CC names no program: one warning, the references' results, nothing built."""
    code = ("import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
            "from ascend_v4.ops import cpu, cpu_native\n"
            "from ascend_v4.ops.reference import formats\n"
            "x = torch.randn(4, 256)\n"
            "print(cpu_native.load() is None, torch.equal(cpu.fp8_roundtrip(x), formats.fp8_roundtrip(x)))\n")
    env = {**os.environ, "CC": "no-such-compiler-ascend-v4", "ASCEND_V4_CACHE_DIR": str(tmp_path)}
    with tempfile.TemporaryDirectory() as cwd:
        r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["True", "True"], r.stderr
    assert "no C compiler (no-such-compiler-ascend-v4)" in r.stderr
    assert not (tmp_path / "cpu_native").exists()


def test_a_failed_build_is_reported_and_the_references_run(tmp_path):
    """A compiler that fails: a warning with its message, the references, no partial library left behind."""
    fake = tmp_path / "badcc"
    fake.write_text("#!/bin/sh\necho 'badcc: cannot compile' >&2\nexit 3\n")
    fake.chmod(0o755)
    code = ("import torch\nfrom ascend_v4.ops import cpu_native\nprint(cpu_native.load() is None)\n")
    env = {**os.environ, "CC": str(fake), "ASCEND_V4_CACHE_DIR": str(tmp_path / "cache")}
    with tempfile.TemporaryDirectory() as cwd:
        r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["True"], r.stderr
    assert "exited with 3" in r.stderr and "badcc: cannot compile" in r.stderr
    assert list((tmp_path / "cache" / "cpu_native").iterdir()) == []


@needs_cc
@pytest.mark.parametrize("T", [1, 16, 300, 2048])
def test_sinkhorn_is_the_reference_bit_for_bit(T):
    from ascend_v4.ops.reference import mhc

    g = torch.Generator().manual_seed(T)
    comb = torch.softmax(torch.randn(T, 4, 4, generator=g) * 3, dim=-1) + 1e-6
    assert _same(cpu.sinkhorn(comb.clone(), 1e-6, 20), mhc.sinkhorn(comb, 1e-6, 20))
    assert _same(cpu.sinkhorn(comb.clone(), 1e-6, 20), cpu.sinkhorn_numpy(comb.clone(), 1e-6, 20))


@needs_cc
@pytest.mark.parametrize("shape", [(1, 128), (16, 16, 128), (2048, 16, 128), (3, 512), (5, 1), (7, 2)])
def test_hadamard_is_the_reference_bit_for_bit(shape):
    x = _random(shape, sum(shape))
    assert _same(cpu.hadamard(x), formats.hadamard(x))
    assert ops._CPU["hadamard"] is cpu.hadamard


@needs_cc
@pytest.mark.parametrize("shape", [(1, 8, 512), (16, 8, 512), (2048, 512), (300, 2, 64), (5, 3, 7, 128)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_is_the_reference_bit_for_bit(shape, inverse):
    from ascend_v4.model.args import ModelArgs
    from ascend_v4.model.rope import cos_sin, inv_freq
    from ascend_v4.ops.reference import rope

    args = ModelArgs.from_preset("tiny")
    g = torch.Generator().manual_seed(shape[0])
    pos = torch.randint(0, 1 << 20, (shape[0],), generator=g)
    cos, sin = cos_sin(inv_freq(args, compressed=True), pos)
    cos, sin = cos[:, : min(64, shape[-1])].contiguous(), sin[:, : min(64, shape[-1])].contiguous()
    x = _random(shape, sum(shape))
    want = rope.apply_rope(x.clone(), cos, sin, inverse)
    got = cpu.apply_rope(x.clone(), cos, sin, inverse)
    assert _same(got, want) and not torch.equal(got, x)
    assert _same(ops.apply_rope(x.clone(), cos, sin, inverse), want)  # the seam's CPU path is this kernel


def test_doctor_names_the_missing_compiler(tmp_path):
    code = ("from ascend_v4.cli.doctor import collect\n"
            "c = {c.name: c for c in collect(probe=False).checks}['CPU kernels (C)']\n"
            "print(c.ok, '|', c.detail, '|', c.fix)\n")
    env = {**os.environ, "CC": "no-such-compiler-ascend-v4", "ASCEND_V4_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ok, detail, fix = (p.strip() for p in r.stdout.strip().splitlines()[-1].split("|"))
    assert ok == "False" and "no C compiler (no-such-compiler-ascend-v4)" in detail and "CC" in fix
