"""Build a `Transformer` on the meta device and fill it from a checkpoint directory (official layout)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ascend_v4.checkpoint.loader import load_checkpoint

from .args import ModelArgs
from .layers import ModelOptions
from .placement import EXPERT_TENSOR
from .tp import TPShard
from .transformer import Transformer




def expert_skip(experts: range | None) -> Callable[[str], bool] | None:
    """Loader filter: True for routed-expert tensors whose global id is not in `experts` (None: load all)."""
    if experts is None:
        return None
    keep = set(experts)

    def skip(name: str) -> bool:
        m = EXPERT_TENSOR.match(name)
        return m is not None and int(m.group(1)) not in keep

    return skip


def load_model(path: str | Path, opts: ModelOptions | None = None, *, device: str | torch.device = "cpu",
               progress: bool = False, experts: range | None = None, check_weights: bool = False,
               tp: TPShard = TPShard()) -> Transformer:
    """Read `<path>/config.json`, build the model without allocating weights, load every shard (mmap,
    one shard at a time, FP8/FP4 kept packed unless `opts.dequantize_weights`), move it to `device`.

    `experts`: build and load only these routed experts (global ids; expert parallelism), skipping the
    other experts' tensors in the checkpoint. `check_weights`: also check every float tensor for NaN / inf
    (UE8M0 scales are always checked; `ascend_v4.checkpoint.loader`). `tp`: build and read only this rank's
    slice of the attention TP-split tensors (model/tp.py), straight from the official files."""
    args = ModelArgs.from_dir(path)
    with torch.device("meta"):
        model = Transformer(args, opts or ModelOptions(), experts=experts, tp=tp)
    load_checkpoint(model, path, args=args, progress=progress, skip=expert_skip(experts),
                    check_weights=check_weights, tp=tp)
    return model.to(device).eval()
