"""Import discipline (code-style.md §5, ascend-notes.md §9).

1. Dependencies point one way: ops <- quant <- model <- runtime <- api / server / cli, checked by
   parsing every .py file of the package with `ast` (lazy imports inside functions count too).
2. `import ascend_v4` (and the light modules) never imports torch_npu.
3. A broken torch_npu (installed without CANN) neither breaks `import ascend_v4` nor `detect_platform()`,
   which falls back to CPU with exactly one warning.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# source folder -> import name of its package (setup.py maps the three top-level folders into ascend_v4)
SOURCES = {"ascend_v4": "ascend_v4", "ops": "ascend_v4.ops", "quant": "ascend_v4.quant",
           "runtime": "ascend_v4.runtime"}

# Layer of each first-level name under ascend_v4. A new module or subpackage must be added here.
LAYER_OF = {
    "ops": "ops",
    "quant": "quant",
    "envs": "base", "platform": "base",  # leaf utilities: import nothing else from the project
    "model": "model", "checkpoint": "model", "chat": "model", "tokenizer": "model",
    "runtime": "runtime", "config": "runtime",
    "peers": "peers",  # transformers peer for parity tests / benchmarks
    "api": "top", "server": "top", "cli": "top", "bench": "top",
}
BELOW_API = {"ops", "quant", "base", "model", "runtime"}
ALLOWED = {
    "ops": {"ops"},
    "quant": {"ops", "quant"},
    "base": {"base"},
    "model": {"ops", "quant", "base", "model"},
    "runtime": {"ops", "quant", "base", "model", "runtime"},
    "peers": BELOW_API | {"peers"},
    "top": BELOW_API | {"peers", "top", "root"},
    "root": BELOW_API | {"peers", "top", "root"},  # ascend_v4/__init__.py: the lazy public facade
}


def _modules(root: Path = ROOT) -> list[tuple[str, Path, bool]]:
    """(dotted module name, file, is_package) of every source file, under its installed name."""
    out = []
    for folder, pkg in SOURCES.items():
        base = root / folder
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("")
            if folder == "ascend_v4" and rel.parts[0] in ("ops", "quant", "runtime"):
                continue  # not a source of the mapped packages
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join([pkg, *parts]), f, f.name == "__init__.py"))
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts == ["ascend_v4"]:  # the facade itself (`from ascend_v4 import __version__`)
        return "root"
    layer = LAYER_OF.get(parts[1])
    assert layer, (f"{module}: unclassified first-level name {parts[1]!r}; add it to LAYER_OF in "
                   f"tests/unit/test_imports.py (see code-style.md §5 for the layering)")
    return layer


def _imports(module: str, path: Path, is_pkg: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every project import in the file; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "ascend_v4":  # `from ascend_v4 import ops` imports ascend_v4.ops; `__version__` the facade
                found += [(node.lineno, f"ascend_v4.{a.name}" if a.name in LAYER_OF else target)
                          for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def _violations(root: Path) -> list[str]:
    errors = []
    for module, path, is_pkg in _modules(root):
        src_layer = _layer(module)
        for line, target in _imports(module, path, is_pkg):
            where = f"{path.relative_to(root)}:{line}"
            top = target.split(".")[0]
            if top in ("ops", "quant", "runtime"):
                errors.append(f"{where}: `{target}` - import it as ascend_v4.{target} (code-style.md §7.2)")
                continue
            if top != "ascend_v4":
                continue
            dst_layer = _layer(target)
            if dst_layer not in ALLOWED[src_layer]:
                errors.append(f"{where}: {module} ({src_layer}) must not import {target} ({dst_layer})")
    return errors


def test_dependency_direction():
    assert len(_modules()) > 5, f"found only {_modules()} under {ROOT}"
    errors = _violations(ROOT)
    assert not errors, "import direction ops <- quant <- model <- runtime <- api/server/cli broken:\n" + \
        "\n".join(errors)


def test_checker_catches_violations(tmp_path):
    files = {
        "ops/__init__.py": "from .reference import x\nfrom ascend_v4.ops.reference import y\n",
        "ops/reference/__init__.py": "def f():\n    from ascend_v4.model import args\n",  # lazy still counts
        "quant/__init__.py": "import ops.reference\nfrom ascend_v4 import ops\n",
        "runtime/__init__.py": "from ascend_v4 import __version__\n",
        "ascend_v4/__init__.py": "def __getattr__(n):\n    from ascend_v4.api import LLM\n",
        "ascend_v4/model/x.py": "from ..runtime import engine\nfrom . import args\n",
        "ascend_v4/cli/__init__.py": "from ascend_v4 import __version__\nfrom ascend_v4.runtime import e\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = sorted(e.split(": ", 1)[0] for e in _violations(tmp_path))
    assert found == ["ascend_v4/model/x.py:1", "ops/reference/__init__.py:2", "quant/__init__.py:1",
                     "runtime/__init__.py:1"], found


def _run(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_V4_")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # so "no NPU" means cpu on a GPU box too
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=extra_path or ROOT.parent,
                          capture_output=True, text=True, timeout=120)


def _fake_torch_npu(tmp_path: Path, body: str) -> Path:
    pkg = tmp_path / "site" / "torch_npu"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    return tmp_path / "site"


def test_import_does_not_import_torch_npu(tmp_path):
    # An importable fake, so an accidental `import torch_npu` would show up in sys.modules.
    site = _fake_torch_npu(tmp_path, "IMPORTED = True\n")
    r = _run("""
        import sys
        import ascend_v4, ascend_v4.envs, ascend_v4.platform
        assert 'torch' not in sys.modules, 'ascend_v4, envs and platform must import without torch'
        import ascend_v4.cli, ascend_v4.model.args, ascend_v4.ops, ascend_v4.quant, ascend_v4.runtime
        leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch_npu', 'acl'))
        assert not leaked, leaked
        print('OK')
    """, site)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_broken_torch_npu_falls_back_to_cpu_with_one_warning(tmp_path):
    site = _fake_torch_npu(tmp_path, "raise ImportError('libhccl.so: cannot open shared object file')\n")
    r = _run("""
        import logging
        records = []
        class H(logging.Handler):
            def emit(self, rec):
                records.append(rec)
        logging.getLogger('ascend_v4').addHandler(H(logging.WARNING))
        import ascend_v4
        from ascend_v4.platform import detect_platform
        p = detect_platform()
        assert detect_platform() is p  # cached: probed once
        assert (p.device_type, p.comm_backend, p.op_backend) == ('cpu', 'gloo', 'reference'), p
        warnings = [r for r in records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert 'torch_npu' in warnings[0].getMessage() and 'libhccl' in warnings[0].getMessage()
        print('OK', p.reason)
    """, site)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_device_override(monkeypatch):
    from ascend_v4 import envs
    from ascend_v4.platform import detect_platform

    monkeypatch.setenv("ASCEND_V4_DEVICE", "cpu")
    monkeypatch.setenv("ASCEND_V4_OP_BACKEND", "reference")
    detect_platform.cache_clear()
    try:
        p = detect_platform()
        assert (p.device_type, p.device, p.comm_backend, p.op_backend) == ("cpu", "cpu", "gloo", "reference")
        monkeypatch.setenv("ASCEND_V4_DEVICE", "tpu")
        with pytest.raises(ValueError, match="ASCEND_V4_DEVICE"):
            envs.device()
    finally:
        detect_platform.cache_clear()


def test_env_registry_lists_every_getter():
    from ascend_v4 import envs

    names = {v["name"] for v in envs.list_env_vars()}
    assert {"ASCEND_V4_CACHE_DIR", "ASCEND_V4_MODEL_DIR", "ASCEND_V4_OP_BACKEND", "ASCEND_V4_DEVICE",
            "ASCEND_V4_LOG_LEVEL"} <= names
    for name in names:  # one getter per variable, named after it
        assert callable(getattr(envs, name.removeprefix("ASCEND_V4_").lower(), None)), f"no getter for {name}"
    # no ASCEND_V4_* variable is mentioned anywhere in the package without being registered
    used = {(m, path.relative_to(ROOT)) for _, path, _ in _modules()
            for m in re.findall(r"ASCEND_V4_[A-Z0-9_]+", path.read_text())}
    unknown = sorted({f"{m} ({where})" for m, where in used if m not in names})
    assert not unknown, f"ASCEND_V4_* variables not registered in ascend_v4/envs.py: {unknown}"
