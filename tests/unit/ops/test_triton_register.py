"""Registration contract of the Triton backend (`ops/triton/__init__.py`), checked without a GPU."""

from __future__ import annotations

import inspect
import subprocess
import sys
import tempfile

import pytest
import torch

import ascend_v4.ops  # noqa: F401  (defines the ascend_v4:: ops)
from ascend_v4.ops import triton as triton_backend
from ascend_v4.ops._library import ALL_OPS
from ascend_v4.ops.reference import attention, gemm, mhc

REFERENCES = {"sparse_attn": attention.sparse_attn, "indexer_topk": attention.indexer_topk,
              "compress_kv": attention.compress_kv, "quant_gemm": gemm.quant_gemm, "moe_experts": gemm.moe_experts,
              "hc_pre": mhc.hc_pre, "hc_post": mhc.hc_post, "hc_head": mhc.hc_head}


def test_every_kernel_targets_a_defined_op():
    assert set(triton_backend.OPS) == set(REFERENCES)
    assert set(triton_backend.OPS) <= set(ALL_OPS)


def test_launchers_take_the_reference_arguments():
    pytest.importorskip("triton", reason="triton is not installed", exc_type=ImportError)
    for op, fn in triton_backend.launchers().items():
        assert list(inspect.signature(fn).parameters) == list(inspect.signature(REFERENCES[op]).parameters), op


def test_register_is_a_no_op_without_cuda():
    # Fresh process: importing the ops on a CPU-only machine must neither import triton nor register anything.
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = ("import sys, ascend_v4.ops as o; from ascend_v4.ops.triton import register; "
            "print(o.active_backends(), register(), 'triton' in sys.modules)")
    with tempfile.TemporaryDirectory() as cwd:  # not the repo root (it would shadow the installed package)
        r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["{'cpu':", "'cpu'}", "{}", "False"]


def test_register_with_cuda_registers_each_launcher(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed", exc_type=ImportError)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.library, "register_kernel", lambda op, dev, fn: calls.append((op, dev, fn)))
    assert triton_backend.register() == {"cuda": "triton"}
    fns = triton_backend.launchers()
    assert sorted(calls, key=lambda c: c[0]) == sorted(((f"ascend_v4::{op}", "cuda", fn) for op, fn in fns.items()),
                                                       key=lambda c: c[0])


def test_register_without_triton_warns_and_returns_nothing(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def missing():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(triton_backend, "launchers", missing)
    with caplog.at_level("WARNING", logger="ascend_v4.ops"):
        assert triton_backend.register() == {}
    assert "Triton kernels cannot be imported" in caplog.text

