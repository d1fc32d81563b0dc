"""Device self-check: every usable NPU implementation of every op, run against the CPU reference.

On the first NPU call of a process (`kernels.backend()`, unless ASCEND_V4_NPU_SELFCHECK=0) and with
`ascend-v4 doctor --ops`, each candidate of `candidates.py` that can run here is given inputs of a small shape
and of V4's real per-device shapes (`CASES`), on the device; its result is compared with the reference run on
the CPU on the same inputs, within a per-op tolerance. A candidate that raises, returns the wrong shape or
misses the tolerance is dropped (`Backend.verdicts`) and the next one is used; every failure is logged with
the op, the backend and why. The reference itself is the golden and is not checked.

Run as a module (`python -m ascend_v4.ops.npu.selfcheck [--json] [--size small|real|all]`) in a process
that imports torch_npu: that is what `ascend-v4 doctor --ops` does in a child process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..reference import formats as fmt
from ..reference import int_gemm
from ..paged import padded_table
from ..reference import paged as paged_ref

log = logging.getLogger("ascend_v4.ops")

SELFCHECK_ENV = "ASCEND_V4_NPU_SELFCHECK"  # registered in ascend_v4/envs.py (ops imports nothing from it)
DEVICE_ENV = "ASCEND_V4_NPU_SELFCHECK_DEVICE"  # tests: run the check on CPU tensors through a torch_npu double


def self_check_enabled() -> bool:
    """ASCEND_V4_NPU_SELFCHECK: "1" (default) checks every op at the first NPU call, "0" trusts every usable
    backend. Anything else is an error."""
    raw = os.environ.get(SELFCHECK_ENV, "").strip() or "1"
    if raw not in ("0", "1"):
        raise ValueError(f"{SELFCHECK_ENV}={raw!r} is not one of 0, 1")
    return raw == "1"


@dataclass(frozen=True)
class Row:
    """One (op, backend) line of the self-check table."""

    op: str
    backend: str
    status: str  # pass | FAIL | not usable | golden | delegates
    detail: str  # the worst error against its tolerance, why it failed, or why it cannot run
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- inputs
def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _sparse_attn(T: int, H: int, D: int, N: int, K: int):
    def make(g):
        idx = torch.randperm(N, generator=g)[:K].repeat(T, 1)
        idx[:, -K // 8:] = -1  # empty slots, as short sequences have
        idx[0] = -1  # a query with no key at all: sink only
        return (_randn(g, T, H, D), _randn(g, N, D), idx.to(torch.int32), torch.randn(H, generator=g), D ** -0.5)
    return make


def _paged(H: int, D: int, ratio: int, seqs: list[tuple[int, int]], topk: int = 512, window: int = 128,
           block_size: int = 128):
    """One layer's pool and a step over `seqs` ((tokens cached before, new tokens) each) in both forms: random
    physical blocks, window blocks before the window released (-1), CSA picks a random subset of each query's
    complete entries (top-k wide, -1 padded); the row form from `paged_rows`."""
    def make(g):
        Bw, epb = block_size // 4, block_size // ratio if ratio else 0
        used = [a + n for a, n in seqs]
        nw, nc = [-(-u // Bw) for u in used], [-(-u // block_size) for u in used]
        wids = torch.randperm(sum(nw) + 3, generator=g)
        cids = torch.randperm(sum(nc) + 2, generator=g)
        win, comp, w0, c0 = [], [], 0, 0
        for (a, _n), k, c in zip(seqs, nw, nc):
            row = wids[w0:w0 + k].tolist()
            dead = max(0, a - window) // Bw  # blocks no query of this step sees
            win.append([-1] * dead + row[dead:])
            comp.append(cids[c0:c0 + c].tolist())
            w0, c0 = w0 + k, c0 + c
        cu = torch.tensor([0] + [sum(n for _a, n in seqs[:i + 1]) for i in range(len(seqs))], dtype=torch.int32)
        used_t = torch.tensor(used, dtype=torch.int32)
        base = (len(wids)) * Bw
        kv = _randn(g, base + len(cids) * epb, D)
        picks = None
        if ratio == 4:
            _seq, pos = paged_ref.query_positions(cu, used_t)
            picks = torch.full((pos.numel(), topk), -1, dtype=torch.int32)
            for t, p in enumerate(pos.tolist()):
                pick = torch.randperm((p + 1) // 4, generator=g)[:topk]
                picks[t, :pick.numel()] = pick.to(torch.int32)
        wt, ct = padded_table(win), padded_table(comp)
        idx = paged_ref.paged_rows(wt, ct, cu, used_t, picks, window, Bw, base, block_size, ratio)
        return (_randn(g, int(cu[-1]), H, D), kv, idx.to(torch.int32), torch.randn(H, generator=g), D ** -0.5,
                wt, ct, cu, used_t, picks, max(n for _a, n in seqs), max(used), window, Bw, base, block_size, ratio)
    return make


def _packed(g, n: int, k: int, fp4: bool):
    w = torch.randn(n, k, generator=g) * 0.05
    return fmt.quant_fp4(w) if fp4 else fmt.quant_fp8_block(w)


def _quant_gemm(M: int, N: int, K: int, fp4: bool):
    def make(g):
        return (_randn(g, M, K), *_packed(g, N, K, fp4), True)
    return make


def _moe(T: int, E: int, k: int, D: int, inter: int, fp4: bool):
    def make(g):
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        ids[::3, -1] = -1  # another rank's expert
        w = torch.rand(T, k, generator=g)
        lists = [[], [], [], [], [], []]
        for _ in range(E):
            for j, (n, kk) in enumerate(((inter, D), (D, inter), (inter, D))):
                wq, s = _packed(g, n, kk, fp4)
                lists[2 * j].append(wq)
                lists[2 * j + 1].append(s)
        w1, s1, w2, s2, w3, s3 = lists
        return (_randn(g, T, D), ids, w, w1, s1, w2, s2, w3, s3, 10.0, True)
    return make


def _hc(T: int, n: int, D: int):
    def pre(g):
        return (_randn(g, T, n, D), torch.randn((2 + n) * n, n * D, generator=g) * 0.02,
                torch.randn((2 + n) * n, generator=g), torch.rand(3, generator=g), 1e-6, 1e-6, 20)

    def post(g):
        comb = torch.softmax(torch.randn(T, n, n, generator=g), -1)
        return (_randn(g, T, D), _randn(g, T, n, D), torch.rand(T, n, generator=g) * 2, comb)

    def head(g):
        return (_randn(g, T, n, D), torch.randn(n, n * D, generator=g) * 0.02, torch.randn(n, generator=g),
                torch.rand(1, generator=g), 1e-6, 1e-6)
    return pre, post, head


def _indexer(T: int, h: int, d: int, N: int, topk: int):
    def make(g):
        k_len = torch.randint(1, N + 1, (T,), generator=g)
        return (_randn(g, T, h, d), _randn(g, N, d), torch.rand(T, h, generator=g), torch.zeros(T, dtype=torch.long),
                k_len, topk)
    return make


def _compress(N: int, L: int, d: int):
    def make(g):
        score = torch.randn(N, L, d, generator=g)
        score[0, : L // 2] = float("-inf")  # the first CSA entry has no previous window
        return (torch.randn(N, L, d, generator=g), score)
    return make


def _int(M: int, N: int, K: int, int4: bool):
    def make(g):
        q = torch.randint(-8 if int4 else -127, 8 if int4 else 128, (N, K), generator=g, dtype=torch.int8)
        w = int_gemm.pack_int4_rows(q) if int4 else q
        return (_randn(g, M, K), w, torch.rand(N, 1, generator=g) * 0.01)
    return make


def _moe_int(T: int, E: int, k: int, D: int, inter: int, int4: bool):
    def make(g):
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        ids[::3, -1] = -1
        lists = [[], [], [], [], [], []]
        for _ in range(E):
            for j, (n, kk) in enumerate(((inter, D), (D, inter), (inter, D))):
                w = _int(1, n, kk, int4)(g)
                lists[2 * j].append(w[1])
                lists[2 * j + 1].append(w[2])
        w1, s1, w2, s2, w3, s3 = lists
        return (_randn(g, T, D), ids, torch.rand(T, k, generator=g), w1, s1, w2, s2, w3, s3, 10.0, int4)
    return make


def _gate(T: int, E: int, k: int, hashed: bool, vocab: int = 1000):
    def make(g):
        logits = torch.randn(T, E, generator=g) * 2
        # distinct experts per token: k consecutive ids from a random start (vocab rows, cheap at 129,280)
        start = torch.randint(0, E, (vocab, 1), generator=g)
        tid2eid = (start + torch.arange(k)) % E if hashed else None
        bias = None if hashed else torch.randn(E, generator=g) * 0.1
        return (logits, bias, tid2eid, torch.randint(0, vocab, (T,), generator=g), k, 1.5)
    return make


_SMALL_HC, _REAL_HC = _hc(5, 4, 256), _hc(16, 4, 4096)
# op -> {size: [(label, make(generator) -> CPU args)]}; "real": V4-Flash's per-device shapes (H = 64 heads,
# D = 512, window 128 + top-k 512 entries, hidden 4096, expert inter 2048), a few experts only.
CASES: dict[str, dict[str, list[tuple[str, Callable]]]] = {
    "sparse_attn": {"small": [("T3 H4 D64 K40", _sparse_attn(3, 4, 64, 50, 40))],
                    "real": [("T8 H64 D512 K640", _sparse_attn(8, 64, 512, 2048, 640))]},
    # a prefill chunk from 0, a chunk after a prefix, decodes at 700 and 2500 (625 complete CSA entries > top-k)
    "sparse_attn_paged": {"small": [("window H4 D64", _paged(4, 64, 0, [(0, 3), (40, 1)]))],
                          "real": [(f"{name} H64 D512 B128 T11", _paged(64, 512, m, [(0, 5), (300, 4), (699, 1), (2499, 1)]))
                                   for name, m in (("window", 0), ("CSA", 4), ("HCA", 128))]
                          + [("window H128 D512 T2", _paged(128, 512, 0, [(699, 1), (130, 1)])),
                             ("CSA H32 D512 T2", _paged(32, 512, 4, [(699, 1), (130, 1)]))]},
    "quant_gemm": {"small": [("fp8 M3 N256 K256", _quant_gemm(3, 256, 256, False)),
                             ("fp4 M3 N64 K128", _quant_gemm(3, 64, 128, True))],
                   "real": [("fp8 M16 N4096 K4096", _quant_gemm(16, 4096, 4096, False)),
                            ("fp4 M16 N2048 K4096", _quant_gemm(16, 2048, 4096, True))]},
    "moe_experts": {"small": [("fp4 T6 E4 k2 D128 I128", _moe(6, 4, 2, 128, 128, True))],
                    "real": [("fp4 T16 E4 k2 D4096 I2048", _moe(16, 4, 2, 4096, 2048, True))]},
    "fp8_roundtrip": {"small": [("[7, 256]", lambda g: (_randn(g, 7, 256, scale=30.0), 128))],
                      "real": [("[64, 4096]", lambda g: (_randn(g, 64, 4096, scale=30.0), 128))]},
    "moe_gate": {"small": [("scored T5 E16 k4", _gate(5, 16, 4, False)), ("hash T5 E16 k4", _gate(5, 16, 4, True))],
                 "real": [("scored T64 E256 k6", _gate(64, 256, 6, False)),
                          ("hash T64 E256 k6", _gate(64, 256, 6, True, 129280))]},
    "hc_pre": {"small": [("T5 n4 D256", _SMALL_HC[0])], "real": [("T16 n4 D4096", _REAL_HC[0])]},
    "hc_post": {"small": [("T5 n4 D256", _SMALL_HC[1])], "real": [("T16 n4 D4096", _REAL_HC[1])]},
    "hc_head": {"small": [("T5 n4 D256", _SMALL_HC[2])], "real": [("T16 n4 D4096", _REAL_HC[2])]},
    "indexer_topk": {"small": [("T4 h4 d32 N40 top8", _indexer(4, 4, 32, 40, 8))],
                     "real": [("T8 h64 d128 N2048 top512", _indexer(8, 64, 128, 2048, 512))]},
    "compress_kv": {"small": [("N5 L8 d64", _compress(5, 8, 64))], "real": [("N32 L128 d512", _compress(32, 128, 512))]},
    "w8a8_gemm": {"small": [("M3 N64 K128", _int(3, 64, 128, False))], "real": [("M16 N4096 K4096", _int(16, 4096, 4096, False))]},
    "w4a8_gemm": {"small": [("M3 N64 K128", _int(3, 64, 128, True))], "real": [("M16 N4096 K4096", _int(16, 4096, 4096, True))]},
    "moe_experts_int": {"small": [("int8 T6 E4 k2 D128 I128", _moe_int(6, 4, 2, 128, 128, False)),
                                  ("int4 T6 E4 k2 D128 I128", _moe_int(6, 4, 2, 128, 128, True))],
                        "real": [("int8 T16 E4 k2 D4096 I2048", _moe_int(16, 4, 2, 4096, 2048, False))]},
    "int8_act_roundtrip": {"small": [("[5, 128]", lambda g: (_randn(g, 5, 128),))],
                           "real": [("[64, 4096]", lambda g: (_randn(g, 64, 4096),))]},
}
# Relative tolerance on max |out - ref| / max |ref| (bf16 inputs; device kernels accumulate in another order,
# round P to bf16 before the second matmul, ...). fp8_roundtrip must be exact; indexer_topk is compared as the
# share of each query's selected entries the reference also selects.
TOL = {"fp8_roundtrip": 0.0, "indexer_topk": 0.95, "moe_experts": 3e-2, "moe_experts_int": 3e-2}
DEFAULT_TOL = 2e-2


def _to(x: Any, device: str) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, list):
        return [_to(t, device) for t in x]
    return x


def _flat(out: Any) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,))]


def compare(op: str, got: Any, want: Any) -> tuple[bool, str]:
    """(within tolerance, one-line detail) for `op`'s device result against the reference's."""
    got, want = [t.detach().cpu() for t in _flat(got)], _flat(want)
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return False, f"shape {[tuple(g.shape) for g in got]} != reference {[tuple(w.shape) for w in want]}"
    if op == "indexer_topk":
        hits = [len(set(g.tolist()) & set(w.tolist()) - {-1}) / max(1, len(set(w.tolist()) - {-1}))
                for g, w in zip(got[0], want[0])]
        worst = min(hits)
        return worst >= TOL[op], f"worst query keeps {worst:.1%} of the reference's picks (need {TOL[op]:.0%})"
    tol, worst = TOL.get(op, DEFAULT_TOL), 0.0
    for g, w in zip(got, want):
        w32, g32 = w.float(), g.float()
        if not torch.equal(torch.isfinite(g32), torch.isfinite(w32)):
            return False, "non-finite values where the reference has finite ones (or the reverse)"
        fin = torch.isfinite(w32)
        err = (g32[fin] - w32[fin]).abs().max().item() if fin.any() else 0.0
        worst = max(worst, err / max(w32[fin].abs().max().item() if fin.any() else 0.0, 1e-6))
    return worst <= tol, f"max rel err {worst:.2e} (tol {tol:.0e})"


def check_candidate(b, op: str, cand, sizes: tuple[str, ...]) -> Row:
    """Run one candidate on every case of `sizes`; a Row with its verdict."""
    from .candidates import REFERENCE
    from .kernels import use_backend

    t0 = time.perf_counter()
    details = []
    for size in sizes:
        for label, make in CASES.get(op, {}).get(size, []):
            args = make(_g(zlib.crc32(f"{op} {label}".encode())))
            dev_args = tuple(_to(a, b.device) for a in args)
            if not cand.accepts(*dev_args):
                details.append(f"{label}: inputs not taken")
                continue
            try:
                with use_backend(b):
                    got = cand.run(*dev_args)
                if b.device != "cpu":
                    b.torch_npu.npu.synchronize()  # type: ignore[attr-defined]
            except Exception as e:  # any failure of a device backend means: do not use it
                return Row(op, cand.backend, "FAIL", f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                           time.perf_counter() - t0)
            ok, detail = compare(op, got, REFERENCE[op](*args))
            if not ok:
                return Row(op, cand.backend, "FAIL", f"{label}: {detail}", time.perf_counter() - t0)
            details.append(f"{label}: {detail}")
    if not details:
        return Row(op, cand.backend, "pass", "no self-check case for this op", time.perf_counter() - t0)
    return Row(op, cand.backend, "pass", "; ".join(details), time.perf_counter() - t0)


def check_backend(b, sizes: tuple[str, ...] = ("small", "real")) -> list[Row]:
    """Self-check every usable candidate of every op on backend `b`; records the verdicts in `b` (failed
    candidates are never used), logs each failure and each op's choice, returns the table."""
    from .candidates import table

    rows: list[Row] = []
    t0 = time.perf_counter()
    log.warning("NPU self-check: checking %d ops' backends against the CPU reference (%s shapes; "
                "ASCEND_V4_NPU_SELFCHECK=0 skips it) ...", len(table()), "/".join(sizes))
    for op, cands in table().items():
        for c in cands:
            why = c.usable(b)
            if why is not None:
                rows.append(Row(op, c.backend, "not usable", why))
            elif c.delegates_to:
                rows.append(Row(op, c.backend, "delegates", f"runs {c.delegates_to} on its chosen backend"))
            elif not c.checked:
                rows.append(Row(op, c.backend, "golden", "the reference (CPU fallback and test golden)"))
            else:
                row = check_candidate(b, op, c, sizes)
                b.verdicts[(op, c.backend)] = row.status == "pass"
                if row.status != "pass":
                    log.warning("NPU self-check: %s on %s failed (%s); not used", op, c.backend, row.detail)
                rows.append(row)
    b._ranked.clear()
    for op in table():
        log.info("NPU self-check: %s runs on %s", op, b.choice(op))
    failed = sum(r.status == "FAIL" for r in rows)
    log.warning("NPU self-check: done in %.1f s, %d backend(s) failed and will not be used%s",
                time.perf_counter() - t0, failed, " (ascend-v4 doctor --ops lists them)" if failed else "")
    return rows


def render(rows: list[Row], chosen: dict[str, str]) -> str:
    """The table `ascend-v4 doctor --ops` prints."""
    lines = [f"{'op':<20} {'backend':<26} {'status':<11} detail"]
    for r in rows:
        mark = " <- used" if chosen.get(r.op) == r.backend else ""
        lines.append(f"{r.op:<20} {r.backend:<26} {r.status:<11} {r.detail}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Child process of `ascend-v4 doctor --ops`: resolve the NPU backend (imports torch_npu), self-check it,
    print the table (or JSON: rows, chosen backend per op, device)."""
    ap = argparse.ArgumentParser(prog="python -m ascend_v4.ops.npu.selfcheck")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--size", choices=("small", "real", "all"), default="all")
    a = ap.parse_args(argv)
    from .backend import build_backend

    device = os.environ.get(DEVICE_ENV, "").strip() or "npu"
    b = build_backend()
    b.device = device
    rows = check_backend(b, ("small", "real") if a.size == "all" else (a.size,))
    chosen = b.describe()
    if a.json:
        print(json.dumps({"device": device, "soc_version": b.soc_version, "op_library": b.lib.reason,
                          "vllm_ascend": b.vllm.reason, "chosen": chosen, "rows": [asdict(r) for r in rows]}))
    else:
        print(render(rows, chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
