"""Load the kernel modules for testing: compiled on a CUDA machine, under the Triton interpreter elsewhere.

`@triton.jit` picks the interpreter when a function is *decorated* with TRITON_INTERPRET=1 set, and that
includes triton's own standard-library helpers (tl.zeros, ...), which are decorated when `triton` is
first imported. So on CPU, `triton` and the kernel modules must be imported with the variable set; this
module does that and restores the variable afterwards so it does not leak into the rest of the process.
Interpreted kernels also read it while they run: callers set it around launches (`interpreter_env()`, or
pytest's monkeypatch.setenv). If `triton` was already imported without it, the interpreter cannot be used
in this process and `InterpreterUnavailable` is raised (the tests then re-run themselves in a subprocess).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from collections.abc import Iterator

import torch

_MODULES = ("_common", "attention", "gemm", "mhc")  # dependency order: _common first


class InterpreterUnavailable(RuntimeError):
    """triton was imported in compiled mode before TRITON_INTERPRET=1 could be set in this process."""


@contextlib.contextmanager
def interpreter_env() -> Iterator[None]:
    """TRITON_INTERPRET=1 inside the block, the previous value (or none) after it."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _interpreted(fn: object) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def kernel_modules(device: str | None = None) -> tuple[types.SimpleNamespace, torch.device]:
    """(namespace with the attention / gemm / mhc / _common modules, device to put test tensors on).

    device: None = "cuda" when available, else "cpu" (interpreted). Raises ImportError without triton and
    InterpreterUnavailable as described in the module docstring.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pkg = __name__.rsplit(".", 1)[0]
    if dev.type == "cuda":
        mods = {m: importlib.import_module(f"{pkg}.{m}") for m in _MODULES}
        return types.SimpleNamespace(**mods), dev
    with interpreter_env():
        import triton.language.standard as tl_std

        probe = getattr(tl_std, "zeros", None)
        if probe is not None and not _interpreted(probe):
            raise InterpreterUnavailable("triton was imported before TRITON_INTERPRET=1 was set in this process")
        common = sys.modules.get(f"{pkg}._common")
        stale = common is not None and not _interpreted(common.mma)  # imported compiled earlier: re-import
        mods = {}
        for name in _MODULES:
            mod = importlib.import_module(f"{pkg}.{name}")
            mods[name] = importlib.reload(mod) if stale else mod
    return types.SimpleNamespace(**mods), dev


_RERUN_FLAG = "ASCEND_V4_TRITON_RERUN"


def rerun_pytest_isolated(test_file: str, timeout_s: float = 600) -> None:
    """Run one test module in a fresh interpreter (where it imports triton first); raise with its output on
    failure. Used when `kernel_modules()` raised InterpreterUnavailable in the current pytest process."""
    import pathlib
    import subprocess
    import tempfile

    if os.environ.get(_RERUN_FLAG):
        raise InterpreterUnavailable("triton is imported before the kernels even in a fresh pytest process")
    path = pathlib.Path(test_file).resolve()
    root = next(p for p in path.parents if (p / "pyproject.toml").exists())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[_RERUN_FLAG] = "1"
    with tempfile.TemporaryDirectory() as cwd:  # not the repo root: it would shadow the installed package
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                            str(root / "pyproject.toml"), "--rootdir", str(root), str(path)],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        raise AssertionError(f"isolated run of {path.name} failed:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}")
