"""The CPU kernels (ops/cpu.py) equal their references bit for bit, and are what CPU tensors run unless the
references are forced."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch

from ascend_v4 import ops
from ascend_v4.ops import cpu
from ascend_v4.ops.reference import mhc


@pytest.mark.parametrize("T", [1, 7, 16, 256, 300])
def test_hc_pre_cpu_kernel_is_the_reference_bit_for_bit(T):
    g = torch.Generator().manual_seed(T)
    n, D = 4, 64
    x = torch.randn(T, n, D, generator=g)
    fn = torch.randn((2 + n) * n, n * D, generator=g) * 0.05
    base, scale = torch.randn((2 + n) * n, generator=g), torch.rand(3, generator=g) * 4
    ref = mhc.hc_pre(x, fn, base, scale, 1e-6, 1e-6, 20)
    got = cpu.hc_pre(x, fn, base, scale, 1e-6, 1e-6, 20)
    for r, k in zip(ref, got):
        assert r.dtype == k.dtype and torch.equal(r, k)
    # and the comb really went through the normalisation (columns sum to ~1)
    torch.testing.assert_close(got[2].sum(-2), torch.ones(T, n), rtol=1e-3, atol=1e-3)


def test_cpu_tensors_run_the_cpu_kernel_unless_references_are_forced():
    assert ops.active_backends()["cpu"] == "cpu" and ops._CPU["hc_pre"] is cpu.hc_pre
    code = "import ascend_v4.ops as o; from ascend_v4.ops.reference import mhc; print(o._CPU['hc_pre'] is mhc.hc_pre)"
    env = {**os.environ, "ASCEND_V4_OP_BACKEND": "reference"}
    with tempfile.TemporaryDirectory() as cwd:
        r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["True"], r.stderr
