"""Fixtures shared by the NPU-path tests: the torch_npu test double (tests/unit/npu/double/torch_npu)."""

import importlib
import sys
from pathlib import Path

import pytest

DOUBLE = Path(__file__).with_name("double")


@pytest.fixture
def tnpu(monkeypatch):
    """Import the torch_npu double in place of any real torch_npu, with its call log cleared."""
    monkeypatch.syspath_prepend(str(DOUBLE))
    sys.modules.pop("torch_npu", None)
    mod = importlib.import_module("torch_npu")
    assert mod.__file__.startswith(str(DOUBLE)), mod.__file__
    mod.CALLS.clear()
    yield mod
    sys.modules.pop("torch_npu", None)
