"""`ascend-v4` error handling end to end: a bad config.json, an unreadable checkpoint or an OSError in any command
is one `error: ...` line on stderr and a non-zero exit, never a Python traceback (unless --debug /
ASCEND_V4_DEBUG=1). Most tests run the installed `ascend-v4` entry point in a subprocess."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ascend_v4.cli import error_message, main
from ascend_v4.model.args import ConfigError, ModelArgs

ENTRY = Path(sys.executable).with_name("ascend-v4")
pytestmark = pytest.mark.skipif(not ENTRY.is_file(), reason=f"no installed entry point at {ENTRY}")

# (key, bad value) per case; key None = the whole config.json is a JSON list holding the good config.
BAD_CONFIGS = {
    "null": ("n_routed_experts", None),
    "list-valued-int": ("num_hidden_layers", [4]),
    "scalar-compress_ratios": ("compress_ratios", 4),
    "top-level-list": (None, None),
    "string-int": ("hidden_size", "large"),
    "bool-int": ("num_attention_heads", True),
    "negative": ("o_groups", -2),
    "nested-rope_scaling": ("rope_scaling", [16]),
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_V4_")}
    env["ASCEND_V4_CACHE_DIR"] = os.environ.get("ASCEND_V4_CACHE_DIR", tempfile.gettempdir())  # conftest's
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env | extra


def cli(*argv: str, env: dict[str, str] | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRY), *map(str, argv)], check=False, capture_output=True, text=True,
                          env=env or _env(), preexec_fn=preexec_fn, cwd="/", timeout=600)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one error line of a failed run (click's own `Error: ...` or our `error: ...`), no traceback."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.lower().startswith("error: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _expected(case: str) -> list[str]:
    key, value = BAD_CONFIGS[case]
    return ["config.json", "top level must be a JSON object"] if key is None else \
        [f'"{key}"', "null" if value is None else repr(value)]


def _write_config(d: Path, case: str, good: dict) -> Path:
    key, value = BAD_CONFIGS[case]
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps([good] if key is None else good | {key: value}))
    return d


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from ascend_v4.checkpoint.dummy import write_dummy_checkpoint

    d = tmp_path_factory.mktemp("cli-errors") / "tiny"
    write_dummy_checkpoint(ModelArgs.from_preset("tiny"), d)
    return d


def _bad_checkpoint(tiny: Path, d: Path, case: str) -> Path:
    """`d`: the tiny checkpoint's files as symlinks, with a bad config.json of `case`."""
    d.mkdir()
    for f in tiny.iterdir():
        if f.name != "config.json":
            (d / f.name).symlink_to(f)
    return _write_config(d, case, json.loads((tiny / "config.json").read_text()))


# ------------------------------------------------------------------------------------------ bad config.json
@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_info_bad_config(tmp_path, case):
    d = _write_config(tmp_path / "ck", case, ModelArgs.from_preset("tiny").to_hf_config())
    r = cli("info", "--model", d)
    line = error_line(r)
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [line]
    assert str(d / "config.json") in line and all(s in line for s in _expected(case)), line


@pytest.mark.parametrize("case", ["list-valued-int", "top-level-list"])
@pytest.mark.parametrize("command", ["quantize", "generate"])
def test_quantize_and_generate_bad_config(tiny_ckpt, tmp_path, case, command):
    d = _bad_checkpoint(tiny_ckpt, tmp_path / "ck", case)
    argv = ["--out", tmp_path / "out", "-f", "w8a8"] if command == "quantize" else \
        ["--prompt", "hi", "--max-tokens", "1"]
    line = error_line(cli(command, "--model", d, *argv))
    assert all(s in line for s in _expected(case)), line


# ------------------------------------------------------------------------------------------ unreadable files
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _drop_file_caps() -> None:
    """preexec_fn: stay root but lose the capabilities that let root read any file (bounding set, so exec keeps
    them dropped); mode 000 then denies reads as for anyone else."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _as_nobody() -> None:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)


@pytest.fixture
def open_dir():
    """A temp dir any user may traverse and write (tmp_path is 0700 under /tmp/pytest-of-root)."""
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="ascend-v4-perm-"))
    d.chmod(0o777)
    yield d
    for p in [d, *d.rglob("*")]:
        if not p.is_symlink():
            p.chmod(stat.S_IRWXU | p.stat().st_mode)
    shutil.rmtree(d)


@pytest.fixture(scope="module")
def unprivileged():
    """preexec_fn under which chmod 000 really blocks reads (None when not root), or skip with the reason.

    As root, first as user `nobody` (needs the venv's python and the package readable by nobody), else root
    without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH."""
    if os.geteuid() != 0:
        return None
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="ascend-v4-probe-"))
    try:
        d.chmod(0o755)
        (d / "secret").write_text("x")
        (d / "secret").chmod(0)
        probe = "import ascend_v4.cli, sys\ntry:\n  open(sys.argv[1])\nexcept PermissionError:\n  print('denied')"
        why = []
        for name, fn in (("as nobody", _as_nobody), ("without file capabilities", _drop_file_caps)):
            try:
                r = subprocess.run([sys.executable, "-c", probe, str(d / "secret")], check=False,
                                   capture_output=True, text=True, preexec_fn=fn, cwd="/", timeout=120)
            except (OSError, subprocess.SubprocessError, KeyError) as e:
                why.append(f"{name}: {e}")
                continue
            if r.stdout.strip() == "denied":
                return fn
            why.append(f"{name}: {(r.stderr.strip().splitlines() or ['reads the file'])[-1]}")
        pytest.skip("cannot run the CLI unprivileged: " + "; ".join(why))
    finally:
        shutil.rmtree(d)


@pytest.fixture
def readable_copy(tiny_ckpt, open_dir):
    d = open_dir / "ck"
    shutil.copytree(tiny_ckpt, d)
    (open_dir / "out").mkdir(mode=0o777)
    (open_dir / "out").chmod(0o777)
    return d


@pytest.mark.parametrize("command", ["generate", "quantize"])
def test_unreadable_shard(readable_copy, unprivileged, command):
    shard = next(readable_copy.glob("*.safetensors"))
    shard.chmod(0)
    argv = ["--out", readable_copy.parent / "out" / "q", "-f", "w8a8"] if command == "quantize" else \
        ["--prompt", "hi", "--max-tokens", "1"]
    line = error_line(cli(command, "--model", readable_copy, *argv, preexec_fn=unprivileged))
    assert str(shard) in line and "permission denied" in line.lower(), line


@pytest.mark.parametrize("command", ["info", "generate"])
def test_unreadable_checkpoint_dir(readable_copy, unprivileged, command):
    readable_copy.chmod(0)
    argv = ["--prompt", "hi", "--max-tokens", "1"] if command == "generate" else []
    line = error_line(cli(command, "--model", readable_copy, *argv, preexec_fn=unprivileged))
    assert str(readable_copy) in line and "permission denied" in line.lower(), line


def test_unreadable_config(readable_copy, unprivileged):
    (readable_copy / "config.json").chmod(0)
    line = error_line(cli("info", "--model", readable_copy, preexec_fn=unprivileged))
    assert line.endswith(f"{readable_copy / 'config.json'}: cannot read: Permission denied"), line


def test_oserror_in_a_command(tmp_path):
    (tmp_path / "file").write_text("")
    line = error_line(cli("dummy-checkpoint", "--preset", "tiny", "--out", tmp_path / "file" / "sub"))
    assert str(tmp_path / "file") in line and "not a directory" in line.lower(), line


# ------------------------------------------------------------------------------------------ the handler itself
# Runs the real `main` in a subprocess with one extra command `boom` raising the exception given as argv[1].
DRIVER = textwrap.dedent("""
    import errno, sys, click
    from ascend_v4.cli import main
    from ascend_v4.checkpoint.errors import CheckpointError
    from ascend_v4.model.args import ConfigError
    from ascend_v4.quant.errors import QuantizeError
    exc = eval(sys.argv[1])

    @click.command("boom")
    def boom():
        raise exc

    main.add_command(boom)
    main(sys.argv[2:], prog_name="ascend-v4")
""")


def driver(exc: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, exc, *argv], check=False, capture_output=True, text=True,
                          env=env or _env(), cwd="/", timeout=120)


@pytest.mark.parametrize("exc, line", [
    ("ConfigError('config.json: bad')", "error: config.json: bad"),
    ("CheckpointError('shard x: truncated')", "error: shard x: truncated"),
    ("QuantizeError('--out holds another conversion')", "error: --out holds another conversion"),
    ("OSError(errno.ENOSPC, 'No space left on device', '/out/x.safetensors')",
     "error: no space left on device: /out/x.safetensors"),
    ("OSError(errno.EIO, 'Input/output error', '/data/shard')", "error: input/output error: /data/shard"),
    ("PermissionError(errno.EACCES, 'Permission denied', '/data/shard')", "error: permission denied: /data/shard"),
])
def test_project_errors_and_oserrors_are_one_line(exc, line):
    r = driver(exc, "boom")
    assert r.returncode == 1 and r.stderr.splitlines() == [line], r.stderr


def test_debug_shows_the_traceback():
    exc = "FileNotFoundError(errno.ENOENT, 'No such file or directory', '/x/config.json')"
    for r in (driver(exc, "--debug", "boom"), driver(exc, "boom", env=_env(ASCEND_V4_DEBUG="1"))):
        assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "FileNotFoundError" in r.stderr
        assert r.stderr.splitlines()[-1] == "error: no such file or directory: /x/config.json"
    r = driver(exc, "boom", env=_env(ASCEND_V4_DEBUG="0"))
    assert r.returncode == 1 and r.stderr.splitlines() == ["error: no such file or directory: /x/config.json"]


def test_keyboard_interrupt_exits_130():
    r = driver("KeyboardInterrupt()", "boom")
    assert r.returncode == 130 and r.stderr.splitlines() == ["error: interrupted"], r.stderr


def test_other_exceptions_keep_their_traceback():
    r = driver("RuntimeError('a bug')", "boom")  # a bug is not an error message: the traceback stays
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: a bug" in r.stderr


def _with_command(monkeypatch, exc: BaseException) -> None:
    @click.command("boom")
    def boom():
        raise exc

    monkeypatch.setitem(main.commands, "boom", boom)


@pytest.mark.parametrize("exc, code, text", [
    (click.ClickException("wrapped by the command"), 1, "Error: wrapped by the command"),
    (click.UsageError("bad usage"), 2, "Error: bad usage"),
    (click.Abort(), 1, "Aborted!"),
    (click.exceptions.Exit(3), 3, ""),
])
def test_click_exceptions_are_left_to_click(monkeypatch, exc, code, text):
    _with_command(monkeypatch, exc)
    r = CliRunner().invoke(main, ["boom"])
    assert r.exit_code == code and text in r.stderr and "error: " not in r.stderr
    assert CliRunner().invoke(main, ["info", "--bogus"]).exit_code == 2


@pytest.mark.parametrize("exc, text", [
    (OSError(errno.EIO, "Input/output error"), "input/output error"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "invalid cross-device link: /a -> /b"),
    (FileNotFoundError("no shard named x"), "no shard named x"),
    (ConfigError("c"), "c"),
    (OSError(errno.EPIPE, "Broken pipe"), None),  # click exits quietly on a closed stdout
    (ValueError("v"), None),
    (RuntimeError("r"), None),
])
def test_error_message(exc, text):
    assert error_message(exc) == text
