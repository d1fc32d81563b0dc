"""Import hygiene of the NPU backend (ascend-notes.md §0.6, §9): with a torch_npu that cannot load (installed
without CANN), the model still runs on the CPU path with exactly one warning; importing the ops or registering
the NPU kernels never imports torch_npu; the op library is looked up only when an NPU op runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _run(code: str, site: Path | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_V4_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["ASCEND_V4_CACHE_DIR"] = os.environ.get("ASCEND_V4_CACHE_DIR", "")  # the session's temp cache
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=site or ROOT.parent,
                          capture_output=True, text=True, timeout=180)


def _broken_torch_npu(tmp_path: Path) -> Path:
    pkg = tmp_path / "site" / "torch_npu"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('libhccl.so: cannot open shared object file')\n")
    return tmp_path / "site"


def test_broken_torch_npu_model_runs_on_cpu_with_one_warning(tmp_path):
    r = _run("""
        import logging, sys
        records = []
        class H(logging.Handler):
            def emit(self, rec):
                records.append(rec)
        logging.getLogger('ascend_v4').addHandler(H(logging.WARNING))
        import torch
        import ascend_v4.ops as ops
        from ascend_v4.ops import npu
        assert npu.register() == {}               # what ops/_backends.py calls: dispatcher entries only
        assert 'torch_npu' not in sys.modules
        from ascend_v4.platform import detect_platform
        p = detect_platform()                     # tries torch_npu once: the one warning
        assert p.device_type == 'cpu', p
        from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
        from ascend_v4.model.layers import ModelOptions
        from ascend_v4.model.load import load_model
        from ascend_v4.model.cache import StepBatch, new_seq_cache
        m = load_model(ensure_dummy_checkpoint('tiny'), ModelOptions(dtype=torch.float32))
        b = StepBatch.build([(new_seq_cache(m.args, torch.float32), [0, 5, 6, 7])])
        lg = m.logits(m(b))
        assert torch.isfinite(lg).all()
        from ascend_v4.ops.npu import kernels
        assert kernels.backend.cache_info().currsize == 0   # no NPU op ran: library never looked up
        warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and 'libhccl' in warnings[0], warnings
        print('OK', ops.active_backends())
    """, _broken_torch_npu(tmp_path))
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_op_library_status_without_build():
    r = _run("""
        import sys
        from ascend_v4.ops import npu
        s = npu.status()
        assert s['npu_present'] is False and 'tools/build_npu_ops.sh' in s['op_library_state'], s
        assert 'ops' not in s and 'torch_npu' not in sys.modules
        print('OK')
    """, None)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_custom_opp_path_is_prepended_once(monkeypatch, tmp_path):
    from ascend_v4.ops.npu import _loader

    monkeypatch.setenv("ASCEND_CUSTOM_OPP_PATH", "/opt/other/vendors/x")
    v = tmp_path / "vendors" / "ascend_v4"
    assert _loader.prepend_custom_opp_path(v) == f"{v}:/opt/other/vendors/x"
    assert _loader.prepend_custom_opp_path(v) == f"{v}:/opt/other/vendors/x"


def test_binding_schemas_match_the_cpp_source():
    from ascend_v4.ops.npu._loader import BINDING_SCHEMAS

    src = (ROOT / "ops/csrc/torch_binding.cpp").read_text()
    for name, schema in BINDING_SCHEMAS.items():
        assert f'"{schema}"' in src.replace('"\n        "', ""), f"{name}: schema differs from ops/csrc"
