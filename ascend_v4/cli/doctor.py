"""`ascend-v4 doctor`: what this machine has for running ascend-v4 on Ascend NPUs, and what is missing.

Checks the Ascend driver (HDK), the CANN toolkit, torch / torch_npu (versions and whether they match), the
ascend-v4 op library (ops/_lib, built by tools/build_npu_ops.sh), visible NPUs, HCCL / runtime settings, and
what ascend-v4 would run on. torch_npu is never imported in this process: when it is installed, a child
process imports it (with a timeout), so a broken install (no CANN: `libhccl.so` missing, ascend-notes §9)
is reported instead of crashing the doctor. Works on CPU-only machines too: it then says why the NPU path is
off and how to turn it on.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import platform as _platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

DRIVER_ROOT = Path("/usr/local/Ascend/driver")
CANN_DEFAULT = Path("/usr/local/Ascend/ascend-toolkit/latest")
# the set docker/Dockerfile.npu inherits from vllm-ascend 0.23.0.post1's image (its requirements.txt, Dockerfile)
PINNED = {"torch": "2.10.0", "torch-npu": "2.10.0.post4", "CANN": "9.1.0"}
HCCL_VARS = ("HCCL_BUFFSIZE", "HCCL_IF_IP", "HCCL_SOCKET_IFNAME", "HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT",
             "HCCL_OP_EXPANSION_MODE", "HCCL_INTRA_PCIE_ENABLE", "HCCL_INTRA_ROCE_ENABLE", "GLOO_SOCKET_IFNAME")
RUNTIME_VARS = ("ASCEND_RT_VISIBLE_DEVICES", "ASCEND_CUSTOM_OPP_PATH", "TASK_QUEUE_ENABLE", "PYTORCH_NPU_ALLOC_CONF",
                "TORCH_DEVICE_BACKEND_AUTOLOAD", "ASCEND_V4_DEVICE", "ASCEND_V4_OP_BACKEND")
PROBE = ("import json, torch, torch_npu; n = torch_npu.npu.device_count(); "
         "print(json.dumps({'devices': n, 'soc': torch_npu.npu.get_soc_version() if n else None}))")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    settings: dict[str, str | None] = field(default_factory=dict)

    def add(self, name: str, ok: bool, detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, ok, detail, "" if ok else fix))

    @property
    def missing(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_kv(path: Path, key: str) -> str | None:
    """Value of `key=value` in an Ascend info file (version.info, ascend_toolkit_install.info)."""
    try:
        for line in path.read_text(errors="replace").splitlines():
            k, _, v = line.partition("=")
            if k.strip().lower() == key.lower():
                return v.strip()
    except OSError:
        return None
    return None


def check_driver(report: Report, driver_root: Path, dev_glob: str) -> None:
    version = _read_kv(driver_root / "version.info", "Version")
    report.add("driver (HDK)", version is not None,
               f"{driver_root}/version.info: Version={version}" if version else f"no {driver_root}/version.info",
               "install the Ascend driver + firmware on the host; in a container mount "
               "/usr/local/Ascend/driver/{lib64,version.info} (docs/npu.md)")
    devices = sorted(d for d in glob.glob(dev_glob) if d.rstrip("0123456789") != d)
    report.add("NPU device nodes", bool(devices), ", ".join(devices) or f"none matching {dev_glob}",
               "pass --device /dev/davinciN plus /dev/davinci_manager /dev/devmm_svm /dev/hisi_hdc to docker")
    smi = shutil.which("npu-smi")
    detail = "not on PATH"
    if smi:
        try:
            r = subprocess.run([smi, "info", "-l"], capture_output=True, text=True, timeout=20)
            detail = f"{smi}: " + (r.stdout.strip().splitlines() or ["(no output)"])[0]
        except (OSError, subprocess.TimeoutExpired) as e:
            detail = f"{smi} failed: {e}"
    report.add("npu-smi", smi is not None, detail, "mount /usr/local/bin/npu-smi and /usr/local/dcmi (docs/npu.md)")


def check_cann(report: Report) -> None:
    home = os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")
    root = Path(home) if home else CANN_DEFAULT
    version = None
    for info in (root / "version.cfg", root / "ascend_toolkit_install.info", root.parent / "ascend_toolkit_install.info"):
        version = _read_kv(info, "version") or _read_kv(info, "runtime_running_version")
        if version:
            break
    report.add("CANN toolkit", root.is_dir(),
               f"{root} (version {version or 'unknown'})" + ("" if home else "; ASCEND_HOME_PATH not set"),
               f"install CANN {PINNED['CANN']} and `source /usr/local/Ascend/ascend-toolkit/set_env.sh`")
    libs = [lib for lib in ("libascendcl.so", "libhccl.so", "libopapi.so")
            if not any(Path(d, lib).exists() for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d)]
    report.add("CANN libraries on LD_LIBRARY_PATH", not libs, "all found" if not libs else f"missing {', '.join(libs)}",
               "source the toolkit's set_env.sh (it extends LD_LIBRARY_PATH); torch_npu cannot import without them")
    report.add("build tools (msopgen, cmake)", bool(shutil.which("msopgen")) and bool(shutil.which("cmake")),
               f"msopgen={shutil.which('msopgen')}, cmake={shutil.which('cmake')}",
               "only needed to build the op library: CANN toolkit (msopgen) + cmake, then tools/build_npu_ops.sh")


def check_torch(report: Report, probe: bool) -> dict | None:
    torch_v, npu_v = _version("torch"), _version("torch-npu")
    report.add("torch", torch_v is not None, f"torch {torch_v}", f"pip install torch=={PINNED['torch']}")
    if npu_v is None:
        report.add("torch_npu", False, "not installed",
                   f"pip install torch-npu=={PINNED['torch-npu']} (needs a CPU build of torch {PINNED['torch']})")
        return None
    same = torch_v is not None and torch_v.split("+")[0].split(".")[:2] == npu_v.split("+")[0].split(".")[:2]
    report.add("torch / torch_npu versions", same, f"torch {torch_v}, torch_npu {npu_v}",
               "install the matching pair (torch_npu X.Y.* needs torch X.Y.*); a mismatch gives "
               "`undefined symbol ... torch::Library` (ascend-notes §0.10)")
    if not probe:
        return None
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    try:
        r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        report.add("import torch_npu", False, "timed out after 120 s", "check the driver with npu-smi")
        return None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        report.add("import torch_npu", False, last,
                   "libhccl.so / libascendcl.so missing means CANN is not set up: source set_env.sh; keep "
                   "TORCH_DEVICE_BACKEND_AUTOLOAD=0 on machines without CANN so `import torch` still works")
        return None
    info = json.loads(r.stdout.strip().splitlines()[-1])
    report.add("import torch_npu", True, f"ok, {info['devices']} NPU(s) visible, SoC id {info['soc']}")
    report.add("visible NPUs", info["devices"] > 0, f"torch.npu.device_count() = {info['devices']}",
               "check ASCEND_RT_VISIBLE_DEVICES and the device mounts; `npu-smi info` must list the NPUs")
    return info


def check_op_library(report: Report) -> None:
    from ascend_v4.ops.npu import status

    s = status()
    built = s["op_library_state"] == "built, not loaded yet"
    report.add("ascend-v4 op library", built, f"{s['op_library']}: {s['op_library_state']}",
               "tools/build_npu_ops.sh --soc ascend910b (A2) | ascend910_93 (A3) | ascend950; without it "
               "sparse_attn falls back to triton-ascend / the reference and moe_experts to npu_grouped_matmul")


def check_ops(report: Report, size: str = "all", timeout: float = 900.0) -> dict | None:
    """The device self-check (ops/npu/selfcheck.py) in a child process that imports torch_npu: every usable
    backend of every op against the CPU reference. Returns the child's JSON (rows, chosen backend per op)."""
    cmd = [sys.executable, "-m", "ascend_v4.ops.npu.selfcheck", "--json", "--size", size]
    env = dict(os.environ, ASCEND_V4_NPU_SELFCHECK="0")  # the child runs the check itself, once, with a table
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        report.add("op self-check", False, f"timed out after {timeout:.0f} s", "run it again with --ops-size small")
        return None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        report.add("op self-check", False, f"did not run: {last}",
                   "the self-check needs torch_npu importable and an NPU; without them every op runs the CPU "
                   "reference")
        return None
    out = json.loads(r.stdout.strip().splitlines()[-1])
    failed = [f"{row['op']} on {row['backend']}" for row in out["rows"] if row["status"] == "FAIL"]
    report.add("op self-check", not failed,
               f"{len(out['rows'])} (op, backend) pairs on {out['device']}; " +
               (f"failed: {', '.join(failed)} (not used)" if failed else "every usable backend passed"),
               "a failed backend is skipped (the next one runs); send the table (ascend-v4 doctor --ops --json) "
               "with the issue")
    return out


def collect(probe: bool = True, driver_root: Path = DRIVER_ROOT, dev_glob: str = "/dev/davinci*") -> Report:
    """All checks; `probe` imports torch_npu in a child process when it is installed."""
    report = Report()
    report.add("python", sys.version_info >= (3, 10), f"{sys.version.split()[0]} on {_platform.machine()}",
               "ascend-v4 needs Python >= 3.10")
    check_driver(report, driver_root, dev_glob)
    check_cann(report)
    check_torch(report, probe)
    check_op_library(report)
    from ascend_v4.ops import cpu_native

    ok, detail = cpu_native.status()
    report.add("CPU kernels (C)", ok, detail, "install a C compiler with OpenMP (gcc) or point CC at one: without "
               "it the CPU path runs the torch references (same results, slower)")
    from ascend_v4.platform import detect_platform

    p = detect_platform()
    report.add("ascend-v4 device", p.device_type == "npu", f"{p.device} ({p.reason}); op backend {p.op_backend}",
               "the NPU path needs the driver, CANN and torch_npu checks above to pass")
    report.settings = {v: os.environ.get(v) for v in (*RUNTIME_VARS, *HCCL_VARS)}
    report.settings["/etc/hccn.conf"] = "present" if Path("/etc/hccn.conf").exists() else "absent"
    return report


def render(report: Report) -> str:
    lines = []
    for c in report.checks:
        lines.append(f"[{'ok' if c.ok else '--'}] {c.name}: {c.detail}")
    lines.append("")
    lines.append("settings (HCCL / runtime; unset = default):")
    for k, v in report.settings.items():
        lines.append(f"  {k}={v if v is not None else '(unset)'}")
    lines.append("")
    if report.missing:
        lines.append("missing, with fixes:")
        for c in report.missing:
            lines.append(f"  - {c.name}: {c.fix}")
    else:
        lines.append("nothing missing: the NPU path is available")
    return "\n".join(lines)


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--no-probe", is_flag=True, help="do not import torch_npu in a child process")
@click.option("--ops", "run_ops", is_flag=True,
              help="also run the device self-check: every usable backend of every op (vllm-ascend, torch_npu, "
                   "our Ascend C, triton-ascend) on small and real V4 shapes against the CPU reference, in a "
                   "child process; prints which backend each op uses and why the others are not")
@click.option("--ops-size", type=click.Choice(["small", "real", "all"]), default="all", show_default=True,
              help="shapes the self-check runs (real = V4-Flash per-device shapes, slower)")
@click.option("--first-run", "first_run", is_flag=True,
              help="day-one kit for a new Atlas machine: this report, the op self-check, a tiny dummy generate, "
                   "a 2-device expert-parallel generate and a `small` throughput figure, each in its own process "
                   "with a time limit, all into one report directory to send back (docs/npu.md)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("ascend-v4-first-run"),
              show_default=True, help="with --first-run: the report directory")
@click.option("--quick", is_flag=True, help="with --first-run: small self-check shapes, no throughput step")
def doctor(as_json: bool, no_probe: bool, run_ops: bool, ops_size: str, first_run: bool, out: Path,
           quick: bool) -> None:
    """Check driver, CANN, torch_npu, the op libraries, visible NPUs and HCCL settings; say what is missing.

    With --ops, also self-check every NPU op backend against the CPU reference (the same check the engine runs
    at its first NPU call) and list, per op, the backend in use.

    \b
    Examples:
      ascend-v4 doctor
      ascend-v4 doctor --json
      ascend-v4 doctor --ops              # + the op table (needs torch_npu and an NPU)
      ascend-v4 doctor --ops --json > doctor.json
      ascend-v4 doctor --first-run --out report/   # day one on an Atlas box: send report/ back
    """
    if first_run:
        from ascend_v4.cli.first_run import first_run as run_kit

        path = run_kit(out, quick=quick)
        click.echo(f"first-run report: {path} and {path.with_suffix('.txt')}")
        return
    if "torch" not in sys.modules and _version("torch-npu") is not None:
        # An unusable torch_npu makes `import torch` itself fail through torch's backend autoload
        # (ascend-notes §9); the doctor imports torch_npu only in its child probe.
        os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    report = collect(probe=not no_probe)
    ops = check_ops(report, ops_size) if run_ops else None
    if as_json:
        click.echo(json.dumps({**asdict(report), **({"ops": ops} if run_ops else {})}, indent=2))
        return
    click.echo(render(report))
    if ops is not None:
        from ascend_v4.ops.npu.selfcheck import Row, render as render_ops

        click.echo("")
        click.echo(f"op self-check on {ops['device']} (SoC id {ops['soc_version']}; vllm-ascend ops: "
                   f"{ops['vllm_ascend']}; ascend-v4 op library: {ops['op_library']}):")
        click.echo(render_ops([Row(**r) for r in ops["rows"]], ops["chosen"]))


__all__ = ["doctor", "collect", "render", "Report", "Check"]
