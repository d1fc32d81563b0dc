"""`ascend-v4 dummy-checkpoint`: write a random checkpoint with the exact layout of an official one.

A thin wrapper around `ascend_v4.checkpoint.dummy.write_dummy_checkpoint` (imported lazily: it needs
torch). The files have the official names, shapes and dtypes (FP8 / FP4 / UE8M0), so the loader, the
converters and the model run on them end to end; the outputs are of course meaningless.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from ascend_v4.model.args import ModelArgs, preset_names

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1GB' / '1GiB' / '1G' -> 2**30, '512MB' -> 512 * 2**20, '4096' -> 4096 bytes.

    All suffixes are binary (a shard "1GB" is 1 GiB), matching the writer's default of 1 << 30.
    """
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 1GB, 512MB, 4096)")
    value = int(float(m.group(1)) * (1 << (10 * " kmgt".index(m.group(2).lower() or " "))))
    if value < 1:
        raise ValueError(f"{text!r}: the size must be at least 1 byte")
    return value


def make_dummy_checkpoint(preset: str, out: Path, *, seed: int = 0, shard_bytes: int = 1 << 30,
                          force: bool = False, progress: bool = True) -> Path:
    """Write a dummy checkpoint of `preset` into `out`; returns the checkpoint directory.

    Raises:
        FileExistsError: `out` exists, is not empty (or is a file) and `force` is False.
        ConfigError: unknown preset.
    """
    args = ModelArgs.from_preset(preset)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; choose an empty directory or pass --force "
                              "(the config, tokenizer, index and shards there are replaced, other files kept)")
    from ascend_v4.checkpoint.dummy import write_dummy_checkpoint

    return Path(write_dummy_checkpoint(args, out, seed=seed, shard_bytes=shard_bytes, progress=progress))


class _Size(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


@click.command("dummy-checkpoint")
@click.option("--preset", "-p", required=True, type=click.Choice(preset_names()),
              help="Model preset whose layout to write.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (created if missing; must be empty unless --force).")
@click.option("--seed", default=0, show_default=True, help="Random seed: the same seed gives the same bytes.")
@click.option("--shard-size", "shard_bytes", default="1GB", show_default=True, type=_Size(),
              help="Largest safetensors shard (binary units: 1GB = 2^30 bytes).")
@click.option("--force", is_flag=True,
              help="Write into a non-empty directory: replaces config, tokenizer, index and shards there.")
def dummy_checkpoint(preset: str, out: Path, seed: int, shard_bytes: int, force: bool) -> None:
    """Write a random checkpoint with the exact layout of an official DeepSeek-V4 one.

    Writes config.json, the tokenizer files and sharded safetensors with the official tensor names,
    shapes and dtypes (FP8 weights with UE8M0 block scales, FP4 routed experts), seeded, with a
    progress bar. Use it to exercise loading and inference without downloading real weights; the
    generated text is noise. `tiny` is a few tens of MB and takes seconds; `flash` and `pro` are
    full size (about 160 GB and 865 GB): check `ascend-v4 info --model PRESET` first.

    \b
    Examples:
      ascend-v4 dummy-checkpoint --preset tiny --out /tmp/v4-tiny
      ascend-v4 dummy-checkpoint --preset small --out ./small --seed 1 --shard-size 256MB
    """
    try:
        path = make_dummy_checkpoint(preset, out, seed=seed, shard_bytes=shard_bytes, force=force)
    except (FileExistsError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    files = [f for f in path.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    click.echo(f"wrote {preset} dummy checkpoint to {path} ({len(files)} files, {size / (1 << 20):,.1f} MiB)")
