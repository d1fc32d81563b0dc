"""Shared fixtures and markers only (markers are declared in pyproject.toml).

* Tests marked `cuda` / `npu` are skipped when that device is absent.
* The session runs hermetically: the user's ASCEND_V4_* variables are removed and
  ASCEND_V4_CACHE_DIR points at a per-session temp dir (so tests never write into ~/.cache).
  Tests that set ASCEND_V4_DEVICE must call `ascend_v4.platform.detect_platform.cache_clear()`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

# torch_npu installed without CANN would break `import torch` (ascend-notes.md §9); subprocesses inherit it.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _has_npu() -> bool:
    # Never import torch_npu just to skip tests on machines without it.
    return importlib.util.find_spec("torch_npu") is not None and shutil.which("npu-smi") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    checks = {"cuda": _has_cuda, "npu": _has_npu}
    present: dict[str, bool] = {}
    for item in items:
        for marker, check in checks.items():
            if item.get_closest_marker(marker) is not None:
                if marker not in present:
                    present[marker] = check()
                if not present[marker]:
                    item.add_marker(pytest.mark.skip(reason=f"needs a {marker.upper()} device"))


@pytest.fixture(scope="session", autouse=True)
def _hermetic_env(tmp_path_factory: pytest.TempPathFactory):
    saved = {k: v for k, v in os.environ.items() if k.startswith("ASCEND_V4_")}
    for k in saved:
        del os.environ[k]
    os.environ["ASCEND_V4_CACHE_DIR"] = str(tmp_path_factory.mktemp("ascend_v4_cache"))
    yield
    os.environ.pop("ASCEND_V4_CACHE_DIR", None)
    os.environ.update(saved)


@pytest.fixture
def tiny_args():
    """ModelArgs of the `tiny` preset (4 layers, 8 experts): the default model for CPU tests."""
    from ascend_v4.model.args import ModelArgs

    return ModelArgs.from_preset("tiny")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module's tests (multi-process tests: ranks must not oversubscribe the cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
