"""Build a `Transformer` on the meta device and fill it from a checkpoint directory (official layout)."""

from __future__ import annotations

from pathlib import Path

import torch

from ascend_v4.checkpoint.loader import load_checkpoint

from .args import ModelArgs
from .layers import ModelOptions
from .transformer import Transformer


def load_model(path: str | Path, opts: ModelOptions | None = None, *, device: str | torch.device = "cpu",
               progress: bool = False) -> Transformer:
    """Read `<path>/config.json`, build the model without allocating weights, load every shard (mmap,
    one shard at a time, FP8/FP4 kept packed unless `opts.dequantize_weights`), move it to `device`."""
    args = ModelArgs.from_dir(path)
    with torch.device("meta"):
        model = Transformer(args, opts or ModelOptions())
    load_checkpoint(model, path, args=args, progress=progress)
    return model.to(device).eval()
