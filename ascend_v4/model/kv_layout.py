"""The KV-cache memory model of DeepSeek-V4 (model-spec.md §10), in one place.

Every number about cache bytes comes from here: the paged pool's block sizes (`model.cache.CachePool`, hence the
engine's cache sizing), the planner (`ascend_v4.runtime.planner`, `ascend-v4 plan`) and `ascend-v4 info`. A layer
with compression ratio m (`args.ratio(l)`: 0 window-only, 4 CSA, 128 HCA) stores one main entry per m tokens; a
CSA layer (`args.kind(l) == CSA`) also one indexer key per m tokens. Every layer (main and MTP) keeps a
sliding-window ring of `window_size` main entries per sequence, and each compressed layer a running fp32
compressor state.

Entry formats (`KVFormat`): the main entry is `head_dim` values in the activation dtype, or vLLM's
`fp8_ds_mla` entry (`ops.kv_fp8_entry_bytes`: e4m3 nope dims + bf16 rope dims + UE8M0 scales, 584 B for V4);
the indexer key is `index_head_dim` values in the activation dtype, int8 + an fp32 scale, FP8 + an fp32 scale, or
MXFP4 (e2m1 + one UE8M0 per 32: 68 B for 128 dims).
"""

from __future__ import annotations

from dataclasses import dataclass

from ascend_v4 import ops
from ascend_v4.model.args import CSA, ModelArgs

FP32 = 4
# The deployment formats `plan` and `info` describe; the engine's own pool is `runtime_format(...)`.
PLAN_FORMATS = ("bf16", "bf16-int8idx", "fp8", "fp8-fp8idx")


@dataclass(frozen=True)
class KVFormat:
    """Bytes of one main KV entry (window row or compressed entry) and of one indexer key."""

    name: str
    main_entry: int
    index_entry: int
    note: str = ""


def fp8_main_entry(args: ModelArgs) -> int:
    """vLLM's `fp8_ds_mla` entry (584 B for V4): the layout the FP8 cache ops pack."""
    return ops.kv_fp8_entry_bytes(args.head_dim, args.rope_head_dim)


def fp4_index_entry(args: ModelArgs) -> int:
    """One MXFP4 indexer key: packed e2m1 + one UE8M0 per 32 dims (68 B for 128 dims)."""
    return args.index_head_dim // 2 + args.index_head_dim // 32


def kv_formats(args: ModelArgs) -> dict[str, KVFormat]:
    """The deployment formats, by name (`PLAN_FORMATS`)."""
    hd, ih = args.head_dim, args.index_head_dim
    fp8 = fp8_main_entry(args)
    return {
        "bf16": KVFormat("bf16", 2 * hd, 2 * ih, "BF16 KV, BF16 indexer keys"),
        "bf16-int8idx": KVFormat("bf16-int8idx", 2 * hd, ih + FP32,
                                 "BF16 KV (A2/A3 sparse-attention kernels), int8 indexer keys + 4-B scale"),
        "fp8": KVFormat("fp8", fp8, fp4_index_entry(args), "fp8_ds_mla KV, MXFP4 indexer keys (deployment)"),
        "fp8-fp8idx": KVFormat("fp8-fp8idx", fp8, ih + FP32, "fp8_ds_mla KV, FP8 indexer keys + fp32 scale"),
    }


def runtime_format(args: ModelArgs, kv_format: str, act_bytes: int) -> KVFormat:
    """The format the engine's pool stores: main entries in the activation dtype (`kv_format="auto"`) or the FP8
    entry (`"fp8"`); indexer keys always in the activation dtype (`act_bytes` per value)."""
    main = fp8_main_entry(args) if kv_format == "fp8" else args.head_dim * act_bytes
    return KVFormat(f"engine-{kv_format}", main, args.index_head_dim * act_bytes,
                    "engine pool: " + ("FP8 entries" if kv_format == "fp8" else "activation dtype")
                    + ", indexer keys in the activation dtype")


def layer_bytes_per_token(args: ModelArgs, fmt: KVFormat, layer: int) -> float:
    """Growing cache bytes per token of context of one layer (main or MTP)."""
    m = args.ratio(layer)
    if not m:
        return 0.0
    return (fmt.main_entry + (fmt.index_entry if args.kind(layer) == CSA else 0)) / m


def kv_bytes_per_token(args: ModelArgs, fmt: KVFormat) -> float:
    """Growing cache bytes per token of context over the main layers (window rings excluded)."""
    return sum(layer_bytes_per_token(args, fmt, l) for l in range(args.n_layers))


def kv_bytes_at(args: ModelArgs, fmt: KVFormat, context: int) -> int:
    """Growing cache bytes of one sequence of `context` tokens over the main layers (whole entries only)."""
    total = 0
    for l in range(args.n_layers):
        m = args.ratio(l)
        if m:
            total += (context // m) * (fmt.main_entry + (fmt.index_entry if args.kind(l) == CSA else 0))
    return total


def bytes_per_token_by_kind(args: ModelArgs, fmt: KVFormat) -> dict[str, float]:
    """{layer kind: bytes per token of one main layer of that kind} for the kinds the model has."""
    return {args.kind(l): layer_bytes_per_token(args, fmt, l) for l in range(args.n_layers)}


def comp_block_bytes(args: ModelArgs, fmt: KVFormat, block_size: int) -> int:
    """Bytes of one paged comp block of `block_size` tokens over every layer (main and MTP): the entries and
    indexer keys those tokens produce."""
    return sum(int(block_size * layer_bytes_per_token(args, fmt, l))
               for l in range(args.n_layers + args.n_draft_layers))


def window_ring_bytes(args: ModelArgs, fmt: KVFormat) -> int:
    """The sliding-window rows of one sequence over every layer (main and MTP)."""
    return (args.n_layers + args.n_draft_layers) * args.window_size * fmt.main_entry


def running_state_shapes(args: ModelArgs, layer: int) -> dict[str, tuple[tuple[int, int], tuple[int, int] | None]]:
    """Per-sequence running compressor state of one layer, as the paged pool stores it (`CachePool.run`): per
    compressor ("comp", and "index" in CSA layers) the (kv, score) rows of the incomplete window [m, c*dc]
    (c = 2 with CSA's overlap) and, CSA only, the (kv, score) A-half of the last complete window [m, dc]
    (None otherwise). All fp32. Empty for window-only layers."""
    m = args.ratio(layer)
    if not m:
        return {}
    if args.kind(layer) == CSA:
        return {"comp": ((m, 2 * args.head_dim), (m, args.head_dim)),
                "index": ((m, 2 * args.index_head_dim), (m, args.index_head_dim))}
    return {"comp": ((m, args.head_dim), None)}


def compressor_state_bytes(args: ModelArgs, layers: range | None = None) -> int:
    """One sequence's running fp32 compressor state (one run slot of the pool) over `layers` (default: the
    main layers; MTP blocks are window-only): (kv, score) x `running_state_shapes`."""
    total = 0
    for l in range(args.n_layers) if layers is None else layers:
        for buf, prev in running_state_shapes(args, l).values():
            total += 2 * (buf[0] * buf[1] + (prev[0] * prev[1] if prev else 0)) * FP32
    return total


def state_slot_bytes(args: ModelArgs, layers: range | None = None) -> int:
    """One block-end state slot of the paged pool (prefix caching): per CSA layer the (kv, score) A-half of the
    last complete window, m rows of the main and the indexer compressor, fp32 (`CachePool.state`); over `layers`
    (default all, main and MTP)."""
    return sum(2 * args.ratio(l) * (args.head_dim + args.index_head_dim) * FP32
               for l in (range(args.n_layers + args.n_draft_layers) if layers is None else layers)
               if args.kind(l) == CSA)


def fixed_bytes_per_seq(args: ModelArgs, fmt: KVFormat) -> int:
    """Bytes a sequence holds whatever its length: window rings + compressor state."""
    return window_ring_bytes(args, fmt) + compressor_state_bytes(args)


__all__ = ["KVFormat", "PLAN_FORMATS", "kv_formats", "runtime_format", "fp8_main_entry", "fp4_index_entry",
           "layer_bytes_per_token", "kv_bytes_per_token", "kv_bytes_at", "bytes_per_token_by_kind", "comp_block_bytes",
           "window_ring_bytes", "running_state_shapes", "compressor_state_bytes", "state_slot_bytes",
           "fixed_bytes_per_seq"]
