"""Shared fixtures for the quantize / plan tests: one tiny dummy checkpoint in the official layout, sharded
small (4 MiB) so conversions have several files, and a cache of converted outputs reused across tests."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARD_BYTES = 4 << 20


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    from ascend_v4.checkpoint.dummy import write_dummy_checkpoint
    from ascend_v4.model.args import ModelArgs

    return write_dummy_checkpoint(ModelArgs.from_preset("tiny"), tmp_path_factory.mktemp("tiny_src"),
                                  shard_bytes=SHARD_BYTES)


@pytest.fixture(scope="session")
def tiny_info(tiny_src):
    from ascend_v4.checkpoint.reader import read_checkpoint

    return read_checkpoint(tiny_src)


@pytest.fixture(scope="session")
def converted(tiny_info, tmp_path_factory):
    """converted(fmt, ep=None) -> output directory (converted once per session)."""
    from ascend_v4.quant.tool import quantize

    cache: dict[tuple[str, int | None], Path] = {}

    def get(fmt: str, ep: int | None = None) -> Path:
        key = (fmt, ep)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"out_{fmt}_{ep}")
            quantize(tiny_info, out, fmt, ep=ep, workers=2, read_baseline="off")
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture
def small_fs(tmp_path):
    """small_fs(nbytes) -> a directory on a fresh tmpfs of that size (a real filesystem that fills up; unmounted
    after the test). Needs the right to mount (root, as in CI); skipped otherwise, with the reason."""
    import os
    import subprocess

    mounts: list[Path] = []

    def make(nbytes: int) -> Path:
        mnt = tmp_path / f"fs{len(mounts)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (uid {os.geteuid()}): {r.stderr.strip()}")
        mounts.append(mnt)
        return mnt

    yield make
    for m in mounts:
        subprocess.run(["umount", "-l", str(m)], check=False)
