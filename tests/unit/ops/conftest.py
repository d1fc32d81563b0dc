"""Triton kernel tests: the interpreter switch every test of a Triton module needs.

A Triton test module sets DEV (where its kernels run) and ISOLATED (why they cannot run in this process, or
None) at import; see ascend_v4.ops.triton._interpret. Modules without DEV are left alone.
"""

import pytest


@pytest.fixture(autouse=True)
def _triton_interpreter(request, monkeypatch):
    """Skip a Triton module's tests when only its isolated re-run can test it; on CPU run under
    TRITON_INTERPRET=1 (set only while the test runs)."""
    dev = getattr(request.module, "DEV", None)
    if dev is None:
        return
    isolated = getattr(request.module, "ISOLATED", None)
    if isolated and request.node.name != "test_isolated_rerun":
        pytest.skip(f"{isolated}; run by test_isolated_rerun")
    if dev.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
