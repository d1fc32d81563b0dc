"""The kernel developer tools: tools/bench_ops.py (CPU smoke run) and tools/check_ascend_lowering.py (its
kernel table stays in step with the kernels' parameters; its pass/fail rule)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import pathlib
import sys

import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[3] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_av4_tool_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_bench_ops_small_runs_every_op_on_cpu(tmp_path, capsys):
    bench = _tool("bench_ops")
    out = tmp_path / "rows.json"
    assert bench.main(["--small", "--device", "cpu", "--iters", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == set(bench.REFERENCE)
    assert {r["phase"] for r in rows} == {"decode", "prefill"}
    assert all(r["ref_ms"] > 0 and r["triton_ms"] is None and r["GBps"] > 0 for r in rows)
    assert "reference only" in capsys.readouterr().out


def test_lowering_cases_match_kernel_parameters():
    from ascend_v4.ops.triton import _interpret

    try:
        K, _ = _interpret.kernel_modules("cpu")
    except ImportError as e:
        pytest.skip(f"triton is not installed ({e})")
    except _interpret.InterpreterUnavailable:
        import ascend_v4.ops.triton.attention as attention  # compiled-mode modules carry the same parameters
        import ascend_v4.ops.triton.gemm as gemm
        import ascend_v4.ops.triton.mhc as mhc
        K = type("K", (), {"attention": attention, "gemm": gemm, "mhc": mhc})
    tool = _tool("check_ascend_lowering")
    cases = tool.cases(K.gemm.NPU_BLOCK_N)
    kernels = set()
    for case in cases:
        mod, fn = case.kernel.split(".")
        jit = getattr(getattr(K, mod), fn)
        params = list(inspect.signature(jit.fn).parameters)
        assert set(case.signature) | set(case.constants) == set(params), case.name
        assert not set(case.signature) & set(case.constants), case.name
        kernels.add(case.kernel)
    # every @triton.jit kernel of the package is in the table
    for mod in ("attention", "gemm", "mhc"):
        for name, obj in vars(getattr(K, mod)).items():
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                assert f"{mod}.{name}" in kernels


def test_lowering_pass_rule():
    tool = _tool("check_ascend_lowering")
    only_hivmc = ("[ERROR] Failed to run `hivmc --version`.\n[ERROR] Cannot find hivmc under $PATH\n"
                  'loc("k.ttadapter":1:1): error: External hivmc run fails, returning module\n'
                  "[ERROR] Failed to run BiShengIR pipeline\n")
    assert tool._first_error(only_hivmc) == ""
    ub = ("[NOTE] Ub overflow detected; retrying compilation.\n" + only_hivmc +
          'loc("k.ttadapter":2:1): error: Failed to run BiShengHIR pipeline\n'
          'loc("k.ttadapter":3:3): error: ub overflow, requires 2501376 bits while 1572864 bits available!\n')
    assert tool._first_error(ub).startswith("error: ub overflow, requires 2501376 bits")
