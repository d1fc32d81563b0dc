"""`ascend-v4 plan`: does a model fit a deployment, in which format, with how much context, how fast (roofline).

Everything is arithmetic on the exact tensor inventory (`ascend_v4.checkpoint.spec.expected_tensors`, the draft
module `mtp.*` included: April MTP blocks or DSpark stages with their extras) converted with the same recipes as
`ascend-v4 quantize`, so weight bytes are those the converter writes (scales, offsets and int4 `scale_bias`
included). The draft module's share is reported apart (`WeightSplit.draft`, `PlanReport.draft_per_card`); it is
placed by the same rules as the main layers (its routed experts over EP, its attention over TP, the DSpark Markov
and confidence heads replicated).

Layout: `npus` cards; attention data-parallel groups of `tp` cards (DP = npus / tp); routed experts
expert-parallel over all cards (EP = npus, each card E / npus experts of every MoE layer). What a TP rank holds a
slice of is `ascend_v4.model.tp` (embed, head, wq_b, wo_a, wo_b, attn_sink; the indexer stays whole) and what
each tensor costs once loaded is `ascend_v4.model.placement`: the rules the runtime loads and measures by.

KV cache (model-spec.md §10): growing bytes per token = sum over layers of main-entry bytes / ratio (CSA 4,
HCA 128) + indexer-entry bytes / 4 (CSA); fixed per sequence = sliding-window ring (main + MTP layers x window x
main entry) + fp32 compressor state. A sequence's cache lives on every card of its TP group (V4 has one
shared KV latent, TP splits heads, not the cache).

Reserve per card = runtime/framework `RUNTIME_RESERVE` + communication buffers `COMM_RESERVE` (npus > 1) +
activations of one prefill chunk (`prefill_chunk` tokens x `ACT_BYTES_PER_TOKEN_PER_DIM` x dim). These are
estimates, stated as such in the output.

Roofline decode (an upper bound: real kernels reach a fraction of it): one step for `batch` sequences per DP
group at context L reads every local non-expert weight, the local experts hit by the step's routing (uniform
routing: P(hit) = 1 - (1 - k/E)^tokens), and per sequence per layer the indexer keys (L/4 entries), the selected
`index_topk` compressed entries + window (CSA), all L/128 entries + window (HCA) or the window; it computes
2 x active parameters per token plus the attention / indexer dot products. Step time = max(bytes / bandwidth,
flops / peak); tok/s per card = batch / tp / step time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ascend_v4.model import kv_layout
from ascend_v4.model.kv_layout import KVFormat, kv_formats
from ascend_v4.model.placement import DRAFT_PREFIX, REPLICATED, ROUTED, TP, placement, resident_nbytes
from ascend_v4.quant import get_format, recipes
from ascend_v4.quant.st_io import tensor_nbytes

GIB = 1 << 30
RUNTIME_RESERVE = 2 * GIB  # framework/runtime context, allocator slack (estimate)
COMM_RESERVE = 1 * GIB  # HCCL/NCCL buffers of the EP / TP communicators (ascend-notes §11: 0.5-2.5 GB each)
ACT_BYTES_PER_TOKEN_PER_DIM = 64  # live activation bytes per prefill token, in units of `dim` (estimate)
DEFAULT_PREFILL_CHUNK = 8192
ACT_BYTES = 2  # BF16 activations on the device (the dtype of dense weights expanded at load)


@dataclass(frozen=True)
class Hardware:
    name: str
    hbm_bytes: int
    bandwidth: float  # bytes/s
    bf16_flops: float  # dense, /s
    lowp_flops: float  # int8 (Ascend A2/A3) or fp8/int8 (950, Hopper) dense, /s
    runnable: tuple[str, ...]  # output formats with native matmul support
    default_kv: str
    source: str


_VENDOR = "vendor figure (unverified)"
HARDWARE: dict[str, Hardware] = {
    "910b": Hardware("Ascend 910B (Atlas 800 A2), per NPU", 64 * GIB, 1.6e12, 313e12, 626e12,
                     ("w8a8", "w4a8", "bf16"), "bf16-int8idx",
                     f"{_VENDOR}: 64 GB HBM2e, ~1.6 TB/s, ~313 TFLOPS FP16/BF16, 2x that in INT8 (910B3-class)"),
    "910c": Hardware("Ascend 910C (Atlas 800 A3), per die", 64 * GIB, 1.6e12, 400e12, 800e12,
                     ("w8a8", "w4a8", "bf16"), "bf16-int8idx",
                     f"{_VENDOR}: per package 128 GB HBM, ~3.2 TB/s, ~800 TFLOPS FP16, two dies; halved per die"),
    "950": Hardware("Ascend 950DT, per card", 144 * GIB, 4.0e12, 500e12, 1000e12,
                    ("w8a8", "w4a8", "bf16", "fp8-experts", "native"), "fp8",
                    f"{_VENDOR}: 144 GB HiZQ 2.0 HBM, 4 TB/s, 1 PFLOPS FP8 (2 PFLOPS FP4); BF16 taken as half of FP8"),
    "h100": Hardware("NVIDIA H100 SXM", 81559 * (1 << 20), 3.35e12, 989e12, 1979e12,
                     ("w8a8", "bf16", "fp8-experts", "native"), "fp8",
                     f"{_VENDOR}: 80 GB HBM3 (81559 MiB usable), 3.35 TB/s, 989 TFLOPS BF16, 1979 TOPS FP8/INT8 "
                     f"dense; native FP4 experts run through FP4->BF16 kernels (no FP4 tensor cores)"),
    "h200": Hardware("NVIDIA H200 SXM", 143771 * (1 << 20), 4.8e12, 989e12, 1979e12,
                     ("w8a8", "bf16", "fp8-experts", "native"), "fp8",
                     f"{_VENDOR}: 141 GB HBM3e (143771 MiB usable), 4.8 TB/s, compute as H100"),
}
NOT_RUNNABLE_WHY = {
    "910b": "A2 has no FP8/FP4 matmul (ascend-notes §0): convert to w8a8 / w4a8 / bf16",
    "910c": "A3 has no FP8/FP4 matmul (ascend-notes §0): convert to w8a8 / w4a8 / bf16",
    "h100": "no W4A8 (int4 x int8) kernels assumed on Hopper",
    "h200": "no W4A8 (int4 x int8) kernels assumed on Hopper",
}


class InventoryEntry(Protocol):
    shape: tuple[int, ...]
    dtype: str
    kind: str


@dataclass
class WeightSplit:
    """Bytes of the converted checkpoint once loaded (`model.placement.resident_nbytes`), by how they are placed,
    and `stored`: the same tensors' bytes in the files."""

    replicated: int = 0
    tp_split: int = 0
    routed_experts: int = 0  # all experts of all MoE layers (incl. the draft module's)
    params: int = 0
    stored: int = 0
    # The draft module (`mtp.*`: MTP blocks or DSpark stages), already counted above: {placement: loaded bytes}.
    draft: dict[str, int] = field(default_factory=lambda: {REPLICATED: 0, TP: 0, ROUTED: 0})

    @property
    def total(self) -> int:
        return self.replicated + self.tp_split + self.routed_experts

    @property
    def draft_total(self) -> int:
        return sum(self.draft.values())

    def draft_per_card(self, tp: int, npus: int) -> int:
        """The draft module's loaded bytes on one card: as every weight, its replicated tensors, 1/tp of its
        TP-split ones and 1/npus of its routed experts."""
        return int(self.draft[REPLICATED] + self.draft[TP] / tp + self.draft[ROUTED] / npus)


@functools.lru_cache(maxsize=None)
def _linear_bytes(fmt: str, o: int, i: int, down: bool) -> int:
    return sum(lay.nbytes for lay in get_format(fmt).layout(o, i, down).values())


def weight_split(specs: Mapping[str, InventoryEntry], output_format: str) -> WeightSplit:
    """Place every tensor of the official inventory, converted to `output_format`, at the bytes it takes once
    loaded (`ascend_v4.model.placement`: the same rules a running rank's `resident_bytes` measures)."""
    ws = WeightSplit()
    for name, s in specs.items():
        base, _, leaf = name.rpartition(".")
        if s.kind in ("fp8", "fp4") and leaf == "weight":
            o, i = s.shape[0], s.shape[1] * (2 if s.kind == "fp4" else 1)
            fmt = recipes.target_format(output_format, base) or ("fp8_block" if s.kind == "fp8" else "fp4_mx")
            b = _linear_bytes(fmt, o, i, recipes.is_down_proj(base))
            numel = o * i
        elif s.kind == "scale" and f"{base}.weight" in specs:
            continue  # counted with its weight
        else:
            b = tensor_nbytes(s.shape, s.dtype)
            numel = math.prod(s.shape)
        ws.params += numel
        ws.stored += b
        b = resident_nbytes(name, numel, b, ACT_BYTES)
        where = placement(name)
        if name.startswith(DRAFT_PREFIX):
            ws.draft[where] += b
        if where == ROUTED:
            ws.routed_experts += b
        elif where == TP:
            ws.tp_split += b
        else:
            ws.replicated += b
    return ws


@dataclass
class PlanReport:
    model: str
    output_format: str
    hardware: Hardware
    npus: int
    tp: int
    context: int
    batch: int
    kv: KVFormat
    runnable: bool
    runnable_note: str
    weights: WeightSplit
    weights_per_card: int
    draft_per_card: int  # the draft module's part of weights_per_card
    kv_per_token_by_kind: dict[str, float]  # bytes per token of context, per layer of that kind
    layers_by_kind: dict[str, int]
    kv_per_token: float
    fixed_per_seq: int
    reserve_per_card: int
    free_per_card: int  # HBM - weights - reserve (may be negative)
    seqs_per_card: int  # sequences of length `context` that fit in free_per_card (per TP group)
    max_context_at_batch: int  # longest context with `batch` sequences per DP group (0: none fits)
    decode_step_s: float
    decode_tok_s_per_card: float
    decode_bound: str  # "memory" / "compute"
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """Runnable on this hardware, and `batch` sequences of `context` tokens fit next to the weights."""
        return self.runnable and self.free_per_card > 0 and self.seqs_per_card >= self.batch

    @property
    def hardware_key(self) -> str:
        return next(k for k, h in HARDWARE.items() if h is self.hardware)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the layout, the memory model's numbers (bytes) and the verdict."""
        fits = self.fits
        return {
            "model": self.model, "format": self.output_format, "hardware": self.hardware_key,
            "layout": {"npus": self.npus, "tp": self.tp, "dp": self.npus // self.tp, "ep": self.npus},
            "context": self.context, "batch": self.batch, "runnable": self.runnable, "fits": fits,
            "verdict": self.verdict,
            "kv": {"format": self.kv.name, "main_entry_bytes": self.kv.main_entry,
                   "index_entry_bytes": self.kv.index_entry, "bytes_per_token": self.kv_per_token,
                   "bytes_per_token_by_kind": self.kv_per_token_by_kind, "fixed_bytes_per_seq": self.fixed_per_seq},
            "bytes_per_card": {"hbm": self.hardware.hbm_bytes, "weights": self.weights_per_card,
                               "draft_weights": self.draft_per_card, "reserve": self.reserve_per_card,
                               "free_for_kv": self.free_per_card},
            "weights": {"total": self.weights.total, "stored": self.weights.stored,
                        "routed_experts": self.weights.routed_experts, "tp_split": self.weights.tp_split,
                        "replicated": self.weights.replicated, "draft": self.weights.draft_total},
            "seqs_per_card": self.seqs_per_card, "max_context_at_batch": self.max_context_at_batch,
            "decode_tok_s_per_card": self.decode_tok_s_per_card if fits else None, "notes": self.notes,
        }

    @property
    def verdict(self) -> str:
        if not self.runnable:
            return f"DOES NOT RUN: {self.runnable_note}"
        return "FITS" if self.fits else "DOES NOT FIT"

    def table(self) -> str:
        g = 1e9
        h = self.hardware
        dp = self.npus // self.tp
        lines = [
            f"{self.model} as {self.output_format} on {self.npus} x {h.name} (EP {self.npus}, TP {self.tp}, DP {dp})",
            f"  hardware: {h.hbm_bytes / GIB:.1f} GiB, {h.bandwidth / 1e12:.2f} TB/s, {h.bf16_flops / 1e12:.0f} "
            f"TFLOPS bf16, {h.lowp_flops / 1e12:.0f} TOPS low-precision - {h.source}",
            f"  runnable here: {'yes' if self.runnable else 'NO'}"
            + (f" - {self.runnable_note}" if self.runnable_note else ""),
            f"  weights: total {self.weights.total / g:.1f} GB loaded ({self.weights.stored / g:.1f} GB in the files, "
            f"{self.weights.params / 1e9:.1f}B params): "
            f"routed experts {self.weights.routed_experts / g:.1f} GB, TP-split {self.weights.tp_split / g:.1f} GB, "
            f"replicated {self.weights.replicated / g:.1f} GB",
            f"  weights per card: {self.weights_per_card / g:.2f} GB"
            + (f" (draft module mtp.*: {self.draft_per_card / g:.2f} GB of it, {self.weights.draft_total / g:.2f} GB "
               f"in all)" if self.weights.draft_total else ""),
            f"  KV cache ({self.kv.name}: {self.kv.note}): main entry {self.kv.main_entry} B, indexer key "
            f"{self.kv.index_entry} B",
        ]
        for kind, per in self.kv_per_token_by_kind.items():
            lines.append(f"    {kind:<6} x{self.layers_by_kind.get(kind, 0):>3} layers: {per:.2f} B/token each")
        lines += [
            f"    total {self.kv_per_token:.1f} B per token of context ({self.kv_per_token * (1 << 20) / GIB:.2f} GiB "
            f"per 1M tokens); fixed {self.fixed_per_seq / (1 << 20):.1f} MiB per sequence (window rings + "
            f"compressor state)",
            f"  reserve per card (runtime + comm + activations, estimate): {self.reserve_per_card / g:.2f} GB",
            f"  free for KV per card: {self.free_per_card / g:.2f} GB",
            f"  sequences of {self.context:,} tokens that fit: {self.seqs_per_card} per card/TP group, "
            f"{self.seqs_per_card * dp} in total",
            f"  longest context with {self.batch} sequence(s) per DP group: {self.max_context_at_batch:,} tokens",
            f"  roofline decode at batch {self.batch}, context {self.context:,}: "
            + (f"step {self.decode_step_s * 1e3:.2f} ms ({self.decode_bound}-bound), "
               f"{self.decode_tok_s_per_card:.1f} tok/s per card (upper bound)" if self.fits
               else "- (the layout does not fit / run)"),
            f"  verdict: {self.verdict}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def make_plan(args: Any, specs: Mapping[str, InventoryEntry], output_format: str, hardware: str, npus: int, *,
              tp: int = 1, context: int = 131072, batch: int = 1, kv: str | KVFormat | None = None,
              prefill_chunk: int = DEFAULT_PREFILL_CHUNK, model: str | None = None,
              weights: WeightSplit | None = None) -> PlanReport:
    """The deployment estimate (module docstring). `specs`: the official inventory of `args`, MTP included;
    `weights`: `weight_split(specs, output_format)` when the caller already has it."""
    if output_format not in recipes.OUTPUT_FORMATS:
        raise ValueError(f"unknown format {output_format!r}; one of {', '.join(recipes.OUTPUT_FORMATS)}")
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; one of {', '.join(HARDWARE)}")
    if npus < 1 or tp < 1 or npus % tp:
        raise ValueError(f"--tp {tp} must divide --npus {npus}")
    if batch < 1 or context < 1:
        raise ValueError("batch and context must be >= 1")
    hw = HARDWARE[hardware]
    kvf = kv if isinstance(kv, KVFormat) else kv_formats(args)[kv or hw.default_kv]
    ws = weights if weights is not None else weight_split(specs, output_format)
    notes: list[str] = []
    E = args.n_routed_experts
    if E % npus:  # expert parallelism places E / npus experts of every MoE layer on each card
        good = [d for d in range(1, E + 1) if E % d == 0]
        raise ValueError(f"--npus {npus} does not divide the {E} routed experts: expert parallelism places "
                         f"E / npus experts on every card; use one of {', '.join(map(str, good))}")
    local_frac = 1 / npus
    weights_card = ws.replicated + ws.tp_split / tp + ws.routed_experts * local_frac

    # KV bytes: the memory model the engine's pool uses (ascend_v4.model.kv_layout).
    per_kind = kv_layout.bytes_per_token_by_kind(args, kvf)
    kinds = [args.kind(i) for i in range(args.n_layers)]
    layers_by_kind = {k: kinds.count(k) for k in per_kind}
    kv_tok = kv_layout.kv_bytes_per_token(args, kvf)
    fixed = kv_layout.fixed_bytes_per_seq(args, kvf)

    act = prefill_chunk * ACT_BYTES_PER_TOKEN_PER_DIM * args.dim
    reserve = RUNTIME_RESERVE + (COMM_RESERVE if npus > 1 else 0) + act
    free = hw.hbm_bytes - weights_card - reserve
    per_seq = context * kv_tok + fixed
    seqs = max(0, int(free // per_seq)) if free > 0 else 0
    max_ctx = int(min(args.max_seq_len, max(0.0, (free / batch - fixed) / kv_tok))) if free > 0 else 0

    # Roofline decode step for `batch` sequences per DP group.
    dp = npus // tp
    tokens_global = batch * dp
    k = args.n_activated_experts
    p_hit = 1 - (1 - k / E) ** tokens_global
    weight_read = ws.replicated + ws.tp_split / tp + ws.routed_experts * local_frac * p_hit
    topk, win = args.index_topk, args.window_size
    read_seq = 0.0
    flops_tok = 0.0
    heads = args.n_heads / tp
    for kind, n in layers_by_kind.items():
        if kind == "csa":
            entries = min(topk, context / 4) + win
            read_seq += n * (context / 4 * kvf.index_entry + entries * kvf.main_entry)
            flops_tok += n * (2 * context / 4 * args.index_n_heads * args.index_head_dim
                              + 4 * entries * heads * args.head_dim)
        elif kind == "hca":
            entries = context / 128 + win
            read_seq += n * entries * kvf.main_entry
            flops_tok += n * 4 * entries * heads * args.head_dim
        else:
            read_seq += n * win * kvf.main_entry
            flops_tok += n * 4 * win * heads * args.head_dim
    pc = args.param_counts()
    dense_params = pc["total"] - pc["routed_experts"] - args.vocab_size * args.dim  # the embedding is a lookup
    expert_params = pc["routed_experts"] / (args.n_layers * E)  # one expert (3 matrices)
    flops = batch * (2 * dense_params / tp + flops_tok) + 2 * expert_params * tokens_global * k * args.n_layers / npus
    mem_bytes = weight_read + batch * read_seq
    lowp = output_format in ("w8a8", "w4a8") or (output_format in ("native", "fp8-experts") and hardware != "910b"
                                                  and hardware != "910c")
    peak = hw.lowp_flops if lowp else hw.bf16_flops
    t_mem, t_cmp = mem_bytes / hw.bandwidth, flops / peak
    step = max(t_mem, t_cmp)
    runnable = output_format in hw.runnable
    why = "" if runnable else NOT_RUNNABLE_WHY.get(hardware, "no kernels for this format assumed")
    if seqs < batch:
        notes.append(f"{batch} sequence(s) of {context:,} tokens need {batch * per_seq / 1e9:.2f} GB per card; "
                     f"{max(free, 0) / 1e9:.2f} GB are free")
    return PlanReport(model or getattr(args, "name", "model"), output_format, hw, npus, tp, context, batch, kvf,
                      runnable, why, ws, int(weights_card), ws.draft_per_card(tp, npus), per_kind, layers_by_kind,
                      kv_tok, int(fixed), int(reserve), int(free), seqs, max_ctx, step, batch / tp / step,
                      "memory" if t_mem >= t_cmp else "compute", notes)


class DeploymentError(ValueError):
    """A layout the planner says cannot work on the named hardware (refused before anything is loaded)."""


def checkpoint_format(path: Any) -> str:
    """The `ascend-v4 quantize` format a checkpoint directory holds (`native` for an official one)."""
    from ascend_v4.quant import manifest

    m = manifest.read_manifest(path)
    if m is not None:
        return m["format"]
    desc = manifest.read_json(Path(path) / recipes.DESCRIPTION_NAME)
    if isinstance(desc, dict):  # an msModelSlim ascendV1 directory: int4 experts if any tensor is W4A8
        return recipes.W4A8 if "W4A8_DYNAMIC" in desc.values() else recipes.W8A8
    return recipes.NATIVE


def check_deployment(args: Any, output_format: str, hardware: str, npus: int, *, context: int, kv: KVFormat,
                     model: str, tp: int = 1) -> PlanReport:
    """The engine's layout for `npus` cards (routed experts split, attention DP npus/tp x TP `tp`; one sequence of
    `context` tokens, the engine's own KV format) checked with the same memory model the pool uses.

    Raises:
        DeploymentError: naming the verdict and the numbers (weights, reserve, free bytes per card).
    """
    from ascend_v4.checkpoint.spec import expected_tensors

    r = make_plan(args, expected_tensors(args), output_format, hardware, npus, tp=tp, context=context, kv=kv,
                  model=model)
    if not r.fits:
        g = 1e9
        attn = f"attention DP {npus // tp} x TP {tp}"
        raise DeploymentError(
            f"{model} as {output_format} on {npus} x {hardware} (EP {npus}, {attn}): {r.verdict}. "
            f"Per card: weights {r.weights_per_card / g:.1f} GB + reserve {r.reserve_per_card / g:.1f} GB of "
            f"{r.hardware.hbm_bytes / g:.1f} GB leaves {r.free_per_card / g:.2f} GB; one {context:,}-token sequence "
            f"needs {(context * r.kv_per_token + r.fixed_per_seq) / g:.2f} GB of KV cache ({r.kv.name}). "
            f"`ascend-v4 plan --model {model} --format {output_format} --npus {npus} --hardware {hardware}` lists "
            f"the layouts that fit. Nothing was loaded.")
    return r


__all__ = ["make_plan", "check_deployment", "checkpoint_format", "DeploymentError", "PlanReport", "HARDWARE", "Hardware", "kv_formats", "KVFormat", "weight_split",
           "WeightSplit", "RUNTIME_RESERVE", "COMM_RESERVE", "ACT_BYTES_PER_TOKEN_PER_DIM"]
