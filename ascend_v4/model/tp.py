"""Attention tensor parallelism: which tensors a TP rank holds a slice of, how they are sliced, and the two
collectives the sharded modules need (injected by the runtime; the model never imports it).

With `--tp T` the T ranks of a TP group run the same tokens. What is split (one home for the rule: the loader
slices the checkpoint with it, `runtime/planner.py` counts bytes with it):

    tensor (official key)                 split along                    after it
    embed.weight [V, D]                   rows (vocab)  V/T per rank     all-reduce of the [T, D] lookup
    head.weight [V, D]                    rows (vocab)                   all-gather of the logits [T, V]
    layers.i.attn.wq_b (+ scale)          rows (query heads) H/T heads   -
    layers.i.attn.attn_sink [H]           heads
    layers.i.attn.wo_a (+ scale)          rows (output groups) G/T       -
    layers.i.attn.wo_b (+ scale)          columns (G/T groups x r)       all-reduce (fp32) of [T, D]
    (mtp.j.attn.* likewise)

Replicated, because the math needs them whole on every rank or splitting saves little and costs a collective:
wq_a + q_norm (the low-rank q is shared by all heads), wkv + kv_norm and the KV cache (one K=V latent shared by
all heads: TP splits heads, never the cache), the compressors, the indexer (its top-k ranks the sum of all index
heads' scores over every compressed entry: splitting it would all-reduce [tokens x entries] scores per CSA
layer), mHC, norms, MoE gate and shared expert. Routed experts are split over all ranks by expert parallelism.

Only the vocab rows of embed / head are summed or gathered, so those two are exact; the wo_b all-reduce adds T
fp32 partial sums (one rounding to the activation dtype at the end), so TP outputs equal one device up to
summation order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch

# Official checkpoint keys of the tensors a TP rank holds a slice of (weights and their scales / int extras).
_SPLIT = re.compile(r"^(embed|head)\.weight$|^(layers|mtp)\.\d+\.attn\.(wq_b|wo_a|wo_b)\.|^(layers|mtp)\.\d+\.attn\."
                    r"attn_sink$")


def is_tp_split(name: str) -> bool:
    """Whether checkpoint tensor `name` is sliced across the ranks of a TP group (module docstring)."""
    return _SPLIT.search(name) is not None


class TPComm(Protocol):
    """The collectives of one TP group (runtime/tensor_parallel.py implements them on a process group)."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the group (same shape, every rank)."""

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation of every rank's `t` along the last dim, in rank order."""


@dataclass(frozen=True)
class TPShard:
    """This rank's place in its attention TP group (it fixes the shapes the model is built with). The
    collectives come later: the runtime calls `Transformer.set_tp_comm` once the process groups exist, as it
    injects `MoE.expert_parallel`."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"TP rank {self.rank} outside [0, {self.size})")

    def part(self, n: int) -> slice:
        """This rank's contiguous share of n items (n divisible by size: `check_tp`)."""
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)


def check_tp(args, size: int) -> None:
    """Raise ValueError when a model cannot be split into `size` attention TP ranks, naming the config key.

    Heads split by output group (wo_a's groups must stay whole), the vocab evenly, and every FP8 weight slice
    must cover whole 128 x 128 scale blocks (so each rank's UE8M0 scales are a plain slice of the checkpoint's).
    """
    if size < 1:
        raise ValueError(f"--tp must be >= 1, got {size}")
    if size == 1:
        return
    problems = []
    if args.o_groups % size:
        problems.append(f"o_groups={args.o_groups} (each rank needs whole output groups)")
    if args.vocab_size % size:
        problems.append(f"vocab_size={args.vocab_size}")
    if not problems:
        heads = args.n_heads // size
        if heads * args.head_dim % 128:
            problems.append(f"num_attention_heads / tp x head_dim = {heads * args.head_dim} (FP8 scale blocks "
                            f"are 128 rows)")
        if args.o_groups // size * args.o_lora_rank % 128:
            problems.append(f"o_groups / tp x o_lora_rank = {args.o_groups // size * args.o_lora_rank} (FP8 scale "
                            f"blocks are 128 wide)")
    if problems:
        raise ValueError(f"attention tensor parallelism {size} does not divide this model: " + "; ".join(problems))


def slice_dim(name: str, ckpt_shape: tuple[int, ...], local_shape: tuple[int, ...], size: int) -> int | None:
    """The dim along which TP rank slices checkpoint tensor `name` into `local_shape` (None: whole tensor),
    or raise ValueError when the shapes do not describe a 1/size slice."""
    if size == 1 or not is_tp_split(name) or tuple(ckpt_shape) == tuple(local_shape):
        return None
    dims = [d for d, (c, l) in enumerate(zip(ckpt_shape, local_shape)) if c != l]
    if len(ckpt_shape) != len(local_shape) or len(dims) != 1 or ckpt_shape[dims[0]] != local_shape[dims[0]] * size:
        raise ValueError(f"checkpoint shape {list(ckpt_shape)} is not {size} slices of the TP rank's "
                         f"{list(local_shape)}")
    return dims[0]


__all__ = ["TPShard", "TPComm", "is_tp_split", "check_tp", "slice_dim"]
