"""`ascend-v4 doctor` on a CPU machine, with a fake driver tree, and with the torch_npu test double installed."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

doc = importlib.import_module("ascend_v4.cli.doctor")  # (ascend_v4.cli.doctor is also the command's name)

DOUBLE = Path(__file__).with_name("double")


def test_collect_on_this_machine_names_what_is_missing(tmp_path):
    r = doc.collect(probe=True, driver_root=tmp_path / "nodriver", dev_glob=str(tmp_path / "davinci*"))
    names = {c.name: c for c in r.checks}
    assert names["python"].ok
    assert not names["driver (HDK)"].ok and "driver" in names["driver (HDK)"].fix
    assert not names["ascend-v4 op library"].ok and "build_npu_ops.sh" in names["ascend-v4 op library"].fix
    assert all(c.fix for c in r.missing), "every missing item comes with a fix"
    cpu = names["CPU kernels (C)"]  # this machine has a C compiler: built and cached
    assert cpu.ok and "cpu_native-" in cpu.detail and "GEMM tiles" in cpu.detail
    assert set(doc.HCCL_VARS) <= set(r.settings)
    text = doc.render(r)
    assert "missing, with fixes:" in text and "HCCL_BUFFSIZE" in text


def test_driver_and_device_nodes_are_read(tmp_path):
    (tmp_path / "driver").mkdir()
    (tmp_path / "driver" / "version.info").write_text("Version=25.5.0\nascendhal_version=7.35.23\n")
    for i in range(2):
        (tmp_path / f"davinci{i}").touch()
    (tmp_path / "davinci_manager").touch()
    r = doc.collect(probe=False, driver_root=tmp_path / "driver", dev_glob=str(tmp_path / "davinci*"))
    names = {c.name: c for c in r.checks}
    assert names["driver (HDK)"].ok and "25.5.0" in names["driver (HDK)"].detail
    assert names["NPU device nodes"].ok and "davinci1" in names["NPU device nodes"].detail
    assert "davinci_manager" not in names["NPU device nodes"].detail


def test_cli_json():
    res = CliRunner().invoke(doc.doctor, ["--json", "--no-probe"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert {"checks", "settings"} <= set(data) and any(c["name"] == "torch" for c in data["checks"])


def test_probe_reports_torch_npu_from_a_child_process(tmp_path):
    # The double (version 2.13.0+double, no devices) stands in for an installed torch_npu; it needs dist-info
    # for importlib.metadata, which we add in a temp site dir.
    site = tmp_path / "site"
    site.mkdir()
    (site / "torch_npu").symlink_to(DOUBLE / "torch_npu", target_is_directory=True)
    info = site / "torch_npu-2.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch-npu\nVersion: 2.13.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_V4_")}
    env["PYTHONPATH"] = str(site)
    code = ("import json, importlib; collect = importlib.import_module('ascend_v4.cli.doctor').collect; "
            "r = collect(probe=True); "
            "print(json.dumps({c.name: [c.ok, c.detail] for c in r.checks}))")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    checks = json.loads(r.stdout.strip().splitlines()[-1])
    assert checks["torch / torch_npu versions"][0]
    assert checks["import torch_npu"] == [True, "ok, 0 NPU(s) visible, SoC id None"]
    assert checks["visible NPUs"][0] is False


@pytest.mark.skipif(not os.environ.get("AV4_TORCH_NPU_SITE"),
                    reason="set AV4_TORCH_NPU_SITE to a dir with a real torch_npu wheel installed (--target)")
def test_real_torch_npu_without_cann(tmp_path):
    # Manual check with the real wheel: pip install --no-deps --target DIR torch_npu-2.13.0-*.whl
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_V4_")}
    env["PYTHONPATH"] = os.environ["AV4_TORCH_NPU_SITE"]
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)  # the doctor must cope with the autoload trap itself
    r = subprocess.run([sys.executable, "-c", "from ascend_v4.cli import main; main()", "doctor", "--json"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert not checks["import torch_npu"]["ok"] and "libhccl" in checks["import torch_npu"]["detail"]
