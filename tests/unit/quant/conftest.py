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
