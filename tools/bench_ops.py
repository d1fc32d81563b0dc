"""Time the ascend_v4 ops at DeepSeek-V4 Flash / Pro decode and prefill shapes: reference vs Triton.

For each op: median time of the reference (`ops/reference`) and, when CUDA is available, of the Triton
launcher (`ops/triton`); the speed-up; and the achieved GB/s and TFLOP/s of the faster of the two (from a
simple bytes / FLOPs model per op, below) as a fraction of a roofline measured on the same device: a large
device-to-device copy for bandwidth, a bf16 matmul for compute (on a CPU the faster of bf16 / fp32).

    python tools/bench_ops.py                      # flash + pro, decode + prefill (needs a big GPU)
    python tools/bench_ops.py --small              # tiny preset, reduced shapes: runs on a CPU in seconds
    python tools/bench_ops.py --model flash --phase decode --batch 64 --context 65536 --ops sparse_attn

Without CUDA only the reference runs (on CPU); use --small there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ascend_v4.model.args import ModelArgs
from ascend_v4.ops.reference import attention as ref_attn
from ascend_v4.ops.reference import gemm as ref_gemm
from ascend_v4.ops.reference import mhc as ref_mhc

REFERENCE: dict[str, Callable] = {
    "sparse_attn": ref_attn.sparse_attn, "indexer_topk": ref_attn.indexer_topk, "compress_kv": ref_attn.compress_kv,
    "quant_gemm": ref_gemm.quant_gemm, "moe_experts": ref_gemm.moe_experts,
    "hc_pre": ref_mhc.hc_pre, "hc_post": ref_mhc.hc_post, "hc_head": ref_mhc.hc_head,
}
BF16 = torch.bfloat16
E8M0_ONE = 127  # UE8M0 byte of 2^0


@dataclasses.dataclass
class Workload:
    op: str  # ascend_v4 op name
    label: str  # what it stands for in the model
    shape: str
    args: tuple
    bytes: float  # minimum memory traffic (each input read once, output written once)
    flops: float


@dataclasses.dataclass
class Shapes:
    """Per-phase sizes: `tokens` queries, each seeing `context` earlier tokens of its own sequence."""
    model: str
    phase: str
    tokens: int
    context: int
    seqs: int


def _rand(*shape, dtype=BF16, device="cpu", scale=1.0):
    return (scale * torch.randn(*shape, device=device)).to(dtype)


def _fp8_weight(n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Random e4m3 bytes (NaN patterns avoided) with scales near 2^-7: a valid packed FP8 weight, built in O(bytes).
    w = torch.randint(0, 256, (n, k), dtype=torch.uint8, device=device)
    w = torch.where((w & 0x7F) == 0x7F, w - 1, w).view(torch.float8_e4m3fn)
    s = torch.randint(E8M0_ONE - 9, E8M0_ONE - 5, (math.ceil(n / 128), math.ceil(k / 128)), dtype=torch.uint8,
                      device=device)
    return w, s.view(torch.float8_e8m0fnu)


def _fp4_weight(n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randint(-128, 128, (n, k // 2), dtype=torch.int8, device=device)
    s = torch.randint(E8M0_ONE - 6, E8M0_ONE - 2, (n, k // 32), dtype=torch.uint8, device=device)
    return w, s.view(torch.float8_e8m0fnu)


def _weight_bytes(w: torch.Tensor, s: torch.Tensor) -> int:
    return w.numel() * w.element_size() + s.numel()


def workloads(a: ModelArgs, sh: Shapes, device: torch.device) -> list[Workload]:
    """The op calls of one layer at these shapes (CSA layer for attention; FP8 linears; FP4 routed experts)."""
    T, C, dev = sh.tokens, sh.context, device
    H, hd, D, n = a.n_heads, a.head_dim, a.dim, a.hc_mult
    win, topk, ih, idim = a.window_size, a.index_topk, a.index_n_heads, a.index_head_dim
    out: list[Workload] = []
    g = torch.Generator(device="cpu").manual_seed(0)

    # -- indexer: each query scores the compressed entries of its own sequence (causal ranges in prefill)
    if sh.phase == "decode":
        ent = C // 4
        k_start = torch.arange(T, device=dev) * ent
        k_len = torch.full((T,), ent, device=dev)
        n_keys = T * ent
    else:
        k_start = torch.zeros(T, dtype=torch.long, device=dev)
        k_len = (torch.arange(T, device=dev) + 1) // 4
        n_keys = T // 4
    scored = int(k_len.sum())
    keys = _rand(max(n_keys, 1), idim, device=dev)
    out.append(Workload("indexer_topk", "CSA indexer", f"T={T} h={ih} d={idim} keys/q~{scored // max(T, 1)}",
                        (_rand(T, ih, idim, device=dev), keys, _rand(T, ih, device=dev), k_start, k_len, topk),
                        2 * (scored * idim + T * ih * idim + T * ih) + 8 * T * topk, 2 * scored * ih * idim))

    # -- sparse attention: window + top-k compressed entries per query, gathered from one kv buffer
    K = win + topk
    n_kv = max(T * (win + C // 4) if sh.phase == "decode" else T + T // 4, 1)
    idx = torch.randint(0, n_kv, (T, K), generator=g).to(dev)
    out.append(Workload("sparse_attn", "CSA attention", f"T={T} H={H} D={hd} K={K}",
                        (_rand(T, H, hd, device=dev), _rand(n_kv, hd, device=dev), idx,
                         torch.randn(H, device=dev), hd ** -0.5),
                        2 * (T * K * hd + 2 * T * H * hd) + 8 * T * K, 4 * T * H * K * hd))

    # -- compressor pooling: entries emitted by these tokens (decode: up to one per sequence)
    for ratio, L, d in ((4, 8, 2 * hd), (128, 128, hd)):
        N = T if sh.phase == "decode" else max(T // ratio, 1)
        out.append(Workload("compress_kv", f"compressor m={ratio}", f"N={N} L={L} d={d}",
                            (torch.randn(N, L, d, device=dev), torch.randn(N, L, d, device=dev)),
                            4 * (2 * N * L * d + N * d), 4 * N * L * d))

    # -- FP8 linears (1x128 activation quantisation on)
    for label, n_out, k_in in (("wq_a", a.q_lora_rank, D), ("wq_b", H * hd, a.q_lora_rank),
                               ("wo_b", D, a.o_groups * a.o_lora_rank)):
        w, s = _fp8_weight(n_out, k_in, dev)
        out.append(Workload("quant_gemm", f"{label} fp8", f"M={T} N={n_out} K={k_in}",
                            (_rand(T, k_in, device=dev), w, s, True),
                            _weight_bytes(w, s) + 2 * T * (k_in + n_out), 2 * T * n_out * k_in))

    # -- routed experts (FP4), uniform random routing
    E, k, I = a.n_routed_experts, a.n_activated_experts, a.moe_inter_dim
    ws = {name: [] for name in ("w1", "s1", "w2", "s2", "w3", "s3")}
    for _ in range(E):
        for nm, (o, i) in (("1", (I, D)), ("3", (I, D)), ("2", (D, I))):
            w, s = _fp4_weight(o, i, dev)
            ws["w" + nm].append(w)
            ws["s" + nm].append(s)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(dev)
    hit = int(torch.unique(ids).numel())
    per_expert = sum(_weight_bytes(ws[f"w{j}"][0], ws[f"s{j}"][0]) for j in "123")
    out.append(Workload("moe_experts", f"{E} experts fp4", f"T={T} k={k} D={D} I={I} hit={hit}",
                        (_rand(T, D, device=dev), ids, torch.rand(T, k, device=dev), ws["w1"], ws["s1"], ws["w2"],
                         ws["s2"], ws["w3"], ws["s3"], a.swiglu_limit, True),
                        hit * per_expert + 2 * T * D + 4 * T * D, 2 * T * k * 3 * D * I))

    # -- mHC
    x = _rand(T, n, D, device=dev)
    fn, base, scale = torch.randn((2 + n) * n, n * D, device=dev) * 0.01, torch.randn((2 + n) * n, device=dev), \
        torch.rand(3, device=dev)
    out.append(Workload("hc_pre", "mHC pre", f"T={T} n={n} D={D}",
                        (x, fn, base, scale, a.norm_eps, a.hc_eps, a.hc_sinkhorn_iters),
                        2 * T * n * D + 4 * fn.numel() + 2 * T * D + 4 * T * n * (n + 1),
                        2 * T * fn.shape[0] * n * D))
    out.append(Workload("hc_post", "mHC post", f"T={T} n={n} D={D}",
                        (_rand(T, D, device=dev), x, 2 * torch.rand(T, n, device=dev), torch.rand(T, n, n, device=dev)),
                        2 * (T * D + 2 * T * n * D), 2 * T * n * n * D + 2 * T * n * D))
    out.append(Workload("hc_head", "mHC head", f"T={T} n={n} D={D}",
                        (x, fn[:n].contiguous(), base[:n].contiguous(), scale[:1].contiguous(), a.norm_eps, a.hc_eps),
                        2 * T * n * D + 4 * n * n * D + 2 * T * D, 2 * T * n * n * D))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(fn: Callable, args: tuple, device: torch.device, iters: int, warmup: int = 1) -> float:
    """Median wall time of fn(*args) in seconds (device synchronised around each call)."""
    for _ in range(warmup):
        fn(*args)
    _sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(*args)
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def roofline(device: torch.device, small: bool) -> tuple[float, float]:
    """(bytes/s of a large copy, FLOP/s of a dense matmul) measured on `device`."""
    n_bytes = (64 << 20) if small or device.type == "cpu" else (2 << 30)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_op(lambda: dst.copy_(src), (), device, iters=5)
    bw = 2 * n_bytes / t  # read + write
    m = 512 if small or device.type == "cpu" else 8192
    # bf16 on a GPU; on a CPU without bf16 units fp32 is faster (and is what the references mostly run in)
    best = math.inf
    for dtype in (BF16,) if device.type == "cuda" else (BF16, torch.float32):
        a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
        best = min(best, time_op(torch.matmul, (a, b), device, iters=5))
    return bw, 2 * m ** 3 / best


def run(models: list[str], phases: list[str], small: bool, batch: int, context: int, prefill: int, iters: int,
        only: set[str], device: torch.device) -> list[dict]:
    triton_fns: dict[str, Callable] = {}
    if device.type == "cuda":
        try:
            from ascend_v4.ops.triton import launchers
            triton_fns = launchers()
        except ImportError as e:
            print(f"# triton unavailable ({e}): reference only", file=sys.stderr)
    bw, peak = roofline(device, small)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    mm = "bf16 matmul" if device.type == "cuda" else "best of bf16/fp32 matmul"
    print(f"# device {name}: copy {bw / 1e9:.1f} GB/s, {mm} {peak / 1e12:.3g} TFLOP/s"
          + ("" if triton_fns else "  (no CUDA: reference only)"))
    print(f"{'model':6s} {'phase':8s} {'op':13s} {'what':18s} {'shape':36s} {'ref ms':>9s} {'triton ms':>9s} "
          f"{'speedup':>7s} {'GB/s':>8s} {'%bw':>5s} {'TFLOP/s':>8s} {'%mm':>5s}")
    rows = []
    for model in models:
        a = ModelArgs.from_preset(model)
        for phase in phases:
            T = batch if phase == "decode" else prefill
            sh = Shapes(model, phase, T, context if phase == "decode" else prefill, T if phase == "decode" else 1)
            for w in workloads(a, sh, device):
                if only and w.op not in only:
                    continue
                t_ref = time_op(REFERENCE[w.op], w.args, device, iters)
                t_tri = time_op(triton_fns[w.op], w.args, device, iters) if w.op in triton_fns else None
                best = min(t for t in (t_ref, t_tri) if t is not None)
                row = {"model": model, "phase": phase, "op": w.op, "what": w.label, "shape": w.shape,
                       "ref_ms": 1e3 * t_ref, "triton_ms": None if t_tri is None else 1e3 * t_tri,
                       "speedup": None if t_tri is None else t_ref / t_tri,
                       "GBps": w.bytes / best / 1e9, "bw_frac": w.bytes / best / bw,
                       "TFLOPs": w.flops / best / 1e12, "mm_frac": w.flops / best / peak}
                rows.append(row)
                tri = "-" if t_tri is None else f"{row['triton_ms']:.3f}"
                spd = "-" if t_tri is None else f"{row['speedup']:.2f}x"
                print(f"{model:6s} {phase:8s} {w.op:13s} {w.label:18s} {w.shape:36s} {row['ref_ms']:9.3f} {tri:>9s} "
                      f"{spd:>7s} {row['GBps']:8.1f} {100 * row['bw_frac']:5.1f} {row['TFLOPs']:8.3f} "
                      f"{100 * row['mm_frac']:5.1f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="flash,pro", help="comma-separated presets (flash, pro, small, tiny)")
    ap.add_argument("--phase", default="decode,prefill", help="decode, prefill or both")
    ap.add_argument("--small", action="store_true", help="tiny preset and reduced shapes (CPU-friendly)")
    ap.add_argument("--batch", type=int, default=None, help="decode: sequences, one token each (default 32)")
    ap.add_argument("--context", type=int, default=None, help="decode: tokens of context per sequence (16384)")
    ap.add_argument("--prefill", type=int, default=None, help="prefill: tokens of one sequence (4096)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per op (median reported)")
    ap.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    small = args.small
    models = ["tiny"] if small and args.model == "flash,pro" else args.model.split(",")
    rows = run(models, args.phase.split(","), small,
               batch=args.batch or (4 if small else 32), context=args.context or (256 if small else 16384),
               prefill=args.prefill or (128 if small else 4096), iters=args.iters or (2 if small else 10),
               only={o for o in args.ops.split(",") if o}, device=device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
