"""The wheel ships only `ascend_v4`, with ops/ quant/ runtime/ mapped inside it (code-style.md §7).

Builds the wheel from a copy of the sources (so concurrent builds never share build/ or egg-info
folders), checks its contents, then imports it from a directory outside the repo with PYTHONPATH
pointing at the unzipped wheel only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAPPED = ("ops", "quant", "runtime")
_JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", "_lib", "*.so")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    for folder in ("ascend_v4", *MAPPED):
        shutil.copytree(ROOT / folder, src / folder, ignore=_JUNK)
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"python -m build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    (whl,) = out.glob("ascend_v4-*.whl")
    return whl


def _source_files(folder: str, suffix: str) -> set[str]:
    """Installed paths of the repo's `*suffix` files under `folder` (mapped folders land in ascend_v4/)."""
    base = ROOT / folder
    dest = "ascend_v4" if folder == "ascend_v4" else f"ascend_v4/{folder}"
    return {f"{dest}/{p.relative_to(base).as_posix()}" for p in base.rglob(f"*{suffix}")
            if "_lib" not in p.parts}


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = [t for t in tops if t.endswith(".dist-info")]
    assert len(dist_info) == 1 and tops == {"ascend_v4", *dist_info}, f"top-level entries: {sorted(tops)}"
    for must in ("ascend_v4/ops/reference/formats.py", "ascend_v4/model/configs/flash.json", "ascend_v4/py.typed",
                 "ascend_v4/cli/__init__.py", "ascend_v4/ops/__init__.py", "ascend_v4/quant/__init__.py",
                 "ascend_v4/runtime/__init__.py", "ascend_v4/ops/cpu_native.c"):
        assert must in names, f"{must} missing from {wheel.name}"
    # trap 1 (code-style.md §7.1): every source file, in every (sub)package, reaches the wheel
    wanted = set().union(*(_source_files(f, ".py") for f in ("ascend_v4", *MAPPED)))
    wanted |= {f"ascend_v4/model/configs/{p.name}" for p in (ROOT / "ascend_v4/model/configs").glob("*.json")}
    missing = sorted(wanted - set(names))
    assert not missing, f"in the source tree but not in the wheel (add a package / package-data entry): {missing}"
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info[0]}/entry_points.txt").decode()
    assert "ascend-v4 = ascend_v4.cli:main" in entry_points


@pytest.mark.slow
def test_wheel_imports_outside_the_repo(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    code = f"""
import sys
import ascend_v4.ops, ascend_v4.quant, ascend_v4.runtime, ascend_v4.model.args, ascend_v4.cli
site = {str(site)!r}
for name in ("ascend_v4", "ascend_v4.ops", "ascend_v4.quant", "ascend_v4.runtime", "ascend_v4.cli"):
    f = sys.modules[name].__file__
    assert f and f.startswith(site), f"{{name}} imported from {{f}}, not from the wheel"
from ascend_v4.model.args import ModelArgs
assert ModelArgs.from_preset("flash").n_layers == 43  # package data is inside the wheel
import shutil
from ascend_v4.ops import cpu_native
assert cpu_native.SOURCE.is_file() and str(cpu_native.SOURCE).startswith(site)  # the C source ships too
assert shutil.which("cc") is None or cpu_native.load() is not None  # and builds from there
print("OK")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_V4_")}
    env["PYTHONPATH"] = str(site)
    env["ASCEND_V4_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
