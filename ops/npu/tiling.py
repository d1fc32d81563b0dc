"""Host tiling of the two Ascend C ops (`ops/ascendc/sparse_attn`, `ops/ascendc/moe_gemm`), in plain Python.

No CANN, no torch: this module is the specification of the tiling. The op_host tiling functions in C++ call
`ops/ascendc/common/tiling_rules.h`, a line-by-line port of this file (same candidate lists, same loop order,
same buffer formulas). They are kept in sync by `tests/unit/npu/test_tiling.py::test_cpp_rules_match_python`,
which compiles that header with the host g++ (it includes nothing from CANN) and compares every field for the
Flash/Pro shape grid. Change both files together. The 950 native MX path of moe_gemm (`moe_gemm_mx_tiling`)
is ported in `ops/ascendc/moe_gemm/op_host/moe_gemm_mx_rules.h` (on top of tiling_rules.h), compared the same
way.

On-chip capacities per SoC (bytes per core; OpDef compute-unit names):

| SoC          | UB (per AIV) | L1     | L0A   | L0B   | L0C    | source |
|--------------|--------------|--------|-------|-------|--------|--------|
| ascend910b   | 192 KiB      | 512 KiB| 64 KiB| 64 KiB| 128 KiB| catlass `include/catlass/arch/arch.hpp` (`AtlasA2`); CANN `Ascend910B*.ini` `[AICoreSpec]` |
| ascend910_93 | 192 KiB      | 512 KiB| 64 KiB| 64 KiB| 128 KiB| per die as 910B: CANN `Ascend910_93*.ini` `ub_size=196608`, 24 cube / 48 vector cores |
| ascend950    | 248 KiB      | 512 KiB| 64 KiB| 64 KiB| 256 KiB| catlass `include/catlass/arch/arch.hpp` (`Ascend950`) |

At run time the C++ tiling reads the real values (`PlatformAscendC::GetCoreMemSize`, `GetCoreNumAic`) and
passes them in `SocCaps`; the table is what CPU tests and the docs use. We keep `UB_RESERVED` bytes of UB
free because the runtime hands the tiling slightly less than the ini value (196352 vs 196608 on 910B3).
Cube core counts are not fixed per SoC (910B3/B4: 20, 910B1/B2 and each 910_93 die: 24, 950: not known
here), so every tiling function takes `core_num` from the caller.

Kernel structure both ops assume: `KERNEL_TYPE_MIX_AIC_1_2` (one cube core + two vector cores per block);
the cube side stages operands GM -> L1 -> L0A/L0B and accumulates in L0C; the vector side works in UB;
the two sides exchange tiles through a per-core GM workspace with cross-core flags (A2/A3 have no UB<->L1
path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

KIB = 1024
DOUBLE = 2  # ping-pong buffers
CUBE = 16  # fractal edge of the cube unit for 16-bit operands (16x16)
UB_ALIGN = 32  # UB / DataCopy granularity in bytes
UB_RESERVED = 1 * KIB
BF16 = 2
FP32 = 4
INT32 = 4


@dataclass(frozen=True)
class SocCaps:
    """On-chip buffer capacities (bytes) of one AI core and whether the cube takes FP8/MX operands."""

    soc: str
    ub: int
    l1: int
    l0a: int
    l0b: int
    l0c: int
    native_mx: bool
    typical_cube_cores: tuple[int, ...] = ()

    @property
    def ub_usable(self) -> int:
        return self.ub - UB_RESERVED


SOCS: dict[str, SocCaps] = {
    "ascend910b": SocCaps("ascend910b", 192 * KIB, 512 * KIB, 64 * KIB, 64 * KIB, 128 * KIB, False, (20, 24)),
    "ascend910_93": SocCaps("ascend910_93", 192 * KIB, 512 * KIB, 64 * KIB, 64 * KIB, 128 * KIB, False, (24,)),
    "ascend950": SocCaps("ascend950", 248 * KIB, 512 * KIB, 64 * KIB, 64 * KIB, 256 * KIB, True, ()),
}
MEMS = ("ub", "l1", "l0a", "l0b", "l0c")


class TilingError(ValueError):
    """No block configuration fits the SoC's buffers for these shapes."""


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def align(a: int, b: int) -> int:
    return ceil_div(a, b) * b


@dataclass(frozen=True)
class Buffer:
    name: str
    mem: str  # one of MEMS
    nbytes: int


def _usage(buffers: tuple[Buffer, ...]) -> dict[str, int]:
    used = dict.fromkeys(MEMS, 0)
    for b in buffers:
        used[b.mem] += b.nbytes
    return used


def _fits(caps: SocCaps, buffers: tuple[Buffer, ...]) -> bool:
    u = _usage(buffers)
    return (u["ub"] <= caps.ub_usable and u["l1"] <= caps.l1 and u["l0a"] <= caps.l0a and u["l0b"] <= caps.l0b
            and u["l0c"] <= caps.l0c)


# ================================================================================================ sparse_attn
# q [T, H, D] bf16; kv [N, D] bf16 (A2/A3) or e4m3 + one UE8M0 per 64 dims (950 variant); idx [T, K] int32.
# A work unit is (query token t, head tile hb, kv split s). The cube core loads q[t, hb] into L1 once, then for
# each block of `kv_block` index slots gathers those kv rows into L1 (K = V: one copy serves both matmuls):
#   mm1  S[h, kb]  = q[h, D] . K[kb, D]^T      over D in `d_qk` chunks (L0A q, L0B K, L0C S fp32)
#   vec  online softmax of S*scale on the two vector cores (h_tile/2 rows each), P -> bf16
#   mm2  O[h, D]  += P[h, kb] . V[kb, D]        over D in `d_pv` chunks (L0A P, L0B V, L0C O fp32)
# When a split is not the whole index list (decode with few units), the partial (O, m, l) goes to GM and a
# combine pass (vector cores, after SyncAll) merges the splits with the sink: out = sum_s O_s e^(m_s-M) /
# (sum_s l_s e^(m_s-M) + e^(sink-M)), M = max(max_s m_s, sink).
HEAD_TILES = (128, 64, 32, 16)
KV_BLOCKS = (512, 256, 128, 64, 32, 16)
D_CHUNKS = (512, 256, 128, 64)  # at least 64 wide: narrower chunks starve the cube
FP8_SCALE_BLOCK = 64  # one UE8M0 scale per 64 kv dims in the 950 FP8-KV layout
DQ_ROWS = 16  # kv rows the vector core dequantises per step (950 FP8-KV variant)

SPARSE_KEY_BF16 = 0
SPARSE_KEY_FP8_KV = 1
SPARSE_KEY_SPLIT = 10  # + when the index list is split across cores (combine pass)


@dataclass(frozen=True)
class SparseAttnTiling:
    T: int
    H: int
    D: int
    K: int
    kv_fp8: bool
    core_num: int
    h_tile: int
    kv_block: int
    d_qk: int
    d_pv: int
    n_hblk: int
    n_kvblk: int
    kv_splits: int
    blocks_per_split: int
    units: int
    used_cores: int
    workspace_bytes: int
    tiling_key: int
    buffers: tuple[Buffer, ...] = field(repr=False)
    workspace: SparseAttnWorkspace | None = field(repr=False, default=None)  # GM layout (sparse_attn_workspace)

    def usage(self) -> dict[str, int]:
        return _usage(self.buffers)


def sparse_attn_buffers(h_tile: int, kv_block: int, d_qk: int, d_pv: int, D: int, kv_fp8: bool) -> tuple[Buffer, ...]:
    """Every on-chip buffer of one (cube + 2 vector) block, in bytes. UB figures are per vector core.

    The UB entries are the kernel's own InitBuffer list (op_kernel/sparse_attn_kernel.h and, FP8 KV,
    sparse_attn_kv_fp8.h: each InitBuffer line carries a `// tiling: <name>` tag); test_tiling.py parses those
    lines and checks that names and sizes equal this list. L1 / L0 are the Matmul API's estimated staging."""
    r = h_tile // 2  # head rows per vector core
    a = lambda n: align(n, UB_ALIGN)  # noqa: E731
    bufs = [
        Buffer("q", "l1", h_tile * D * BF16),
        Buffer("kv", "l1", DOUBLE * kv_block * D * BF16),
        Buffer("p", "l1", DOUBLE * h_tile * kv_block * BF16),
        Buffer("a", "l0a", DOUBLE * max(h_tile * d_qk, h_tile * kv_block) * BF16),
        Buffer("b", "l0b", DOUBLE * max(d_qk * kv_block, kv_block * d_pv) * BF16),
        Buffer("c", "l0c", DOUBLE * max(h_tile * kv_block, h_tile * d_pv) * FP32),
        Buffer("s", "ub", DOUBLE * a(r * kv_block * FP32)),
        Buffer("p_out", "ub", DOUBLE * a(r * kv_block * BF16)),
        Buffer("idx", "ub", DOUBLE * a(kv_block * INT32)),
        Buffer("o_blk", "ub", DOUBLE * a(r * d_pv * FP32)),
        Buffer("o_acc", "ub", a(r * D * FP32)),
        Buffer("stats", "ub", 4 * a(r * FP32)),  # running max, running sum, rescale factor, scratch
        Buffer("row_out", "ub", DOUBLE * a(D * BF16)),  # one output / zero row on its way to GM (VECOUT)
    ]
    if kv_fp8:  # vector cores decode one gathered FP8 entry at a time to bf16 for the cube
        bufs += [
            Buffer("dq_in", "ub", DOUBLE * a(DQ_ROWS * D)),  # entry bytes (AlignUp(entry, 32) <= DQ_ROWS * D)
            Buffer("dq_f32", "ub", a(D * FP32)),  # fp32 scratch of the decode (nope e4m3 and rope bf16 -> fp32)
            Buffer("dq_out", "ub", DOUBLE * a(DQ_ROWS * D * BF16)),
        ]
    else:  # GM -> UB -> GM row copy of the gather (TQueBind<VECIN, VECOUT>: MTE2 -> MTE3 ordering)
        bufs.append(Buffer("row_copy", "ub", DOUBLE * a(D * BF16)))
    return tuple(bufs)


def sparse_attn_tiling(caps: SocCaps, T: int, H: int, D: int, K: int, core_num: int,
                       kv_fp8: bool = False) -> SparseAttnTiling:
    """Block sizes and core split of sparse_attn for q [T, H, D], idx [T, K] on `core_num` cube cores.

    Preference order: the largest head tile (the gathered kv block is reused by all heads of a tile, and
    decode is bound by these gathers), then the largest kv block, then the largest D chunks.
    """
    if min(T, H, D, K, core_num) <= 0:
        raise TilingError(f"sparse_attn: empty shape T={T} H={H} D={D} K={K} cores={core_num}")
    if D % D_CHUNKS[-1]:
        raise TilingError(f"sparse_attn: head dim {D} is not a multiple of {D_CHUNKS[-1]}")
    if kv_fp8 and (not caps.native_mx or D % FP8_SCALE_BLOCK):
        raise TilingError(f"sparse_attn: the FP8-KV variant needs ascend950 and D % {FP8_SCALE_BLOCK} == 0")
    h_max, k_max = align(H, CUBE), max(CUBE, align(K, CUBE))
    for h in HEAD_TILES:
        if h > h_max:
            continue
        for kb in KV_BLOCKS:
            if kb > k_max:
                continue
            for dq in D_CHUNKS:
                if dq > D or D % dq:
                    continue
                for dp in D_CHUNKS:
                    if dp > D or D % dp:
                        continue
                    bufs = sparse_attn_buffers(h, kb, dq, dp, D, kv_fp8)
                    if _fits(caps, bufs):
                        return _sparse_split(caps, T, H, D, K, core_num, kv_fp8, h, kb, dq, dp, bufs)
    raise TilingError(f"sparse_attn: nothing fits {caps.soc} for H={H} D={D} K={K}")


def _sparse_split(caps, T, H, D, K, core_num, kv_fp8, h, kb, dq, dp, bufs) -> SparseAttnTiling:
    n_hblk, n_kvblk = ceil_div(H, h), ceil_div(K, kb)
    base = T * n_hblk
    splits = 1
    if base < core_num:  # decode: split the index list so every core gets work (flash-decoding)
        splits = min(n_kvblk, ceil_div(core_num, base))
    bps = ceil_div(n_kvblk, splits)
    splits = ceil_div(n_kvblk, bps)  # no empty split
    units = base * splits
    used = min(core_num, units)
    ws = sparse_attn_workspace(h, kb, D, used, units, splits)
    key = (SPARSE_KEY_FP8_KV if kv_fp8 else SPARSE_KEY_BF16) + (SPARSE_KEY_SPLIT if splits > 1 else 0)
    return SparseAttnTiling(T, H, D, K, kv_fp8, core_num, h, kb, dq, dp, n_hblk, n_kvblk, splits, bps, units,
                            used, ws.total, key, bufs, ws)


# GM workspace of sparse_attn (bytes; every region starts on a SPARSE_WS_ALIGN boundary). One table, used by
# the host tiling in Python and C++ (tiling_rules.h ComputeSparseAttnWorkspace) and passed to the kernel as
# offsets in the tiling data (wsPerCore, wsKvOff, wsSOff, wsPOff, wsOOff, wsPartOOff, wsPartStatOff), so the
# kernel does no layout arithmetic of its own. Per core c, at c * per_core:
#   kv [2][kv_block][D]    16-bit  gathered (FP8 KV: decoded) kv tile, ping-pong   (AIV MTE3 -> AIC mm1/mm2)
#   s  [2][h_tile][kv_block] fp32  mm1 output S, row stride kv_block              (AIC -> AIV)
#   p  [2][h_tile][kv_block] 16-bit softmax P, row stride kv_block                 (AIV -> AIC mm2)
#   o  [2][h_tile][D]       fp32   mm2 output O block, row stride D                (AIC -> AIV)
# then, with kv_splits > 1, after every core's area: partial O [units][h_tile][D] fp32 and partial (m, l)
# [units][2][h_tile] fp32 (unit u = (t * n_hblk + hb) * kv_splits + s), merged by the combine pass.
SPARSE_WS_ALIGN = 512
SPARSE_WS_CORE_REGIONS = ("kv", "s", "p", "o")


@dataclass(frozen=True)
class SparseAttnWorkspace:
    kv: int  # offsets inside one core's area
    s: int
    p: int
    o: int
    per_core: int
    part_o: int  # offsets from the workspace start (0 size when kv_splits == 1)
    part_stats: int
    total: int
    sizes: dict = field(repr=False, compare=False)  # region name -> bytes


def sparse_attn_workspace(h_tile: int, kv_block: int, D: int, used_cores: int, units: int,
                          kv_splits: int) -> SparseAttnWorkspace:
    al = lambda n: align(n, SPARSE_WS_ALIGN)  # noqa: E731
    sizes = {
        "kv": DOUBLE * kv_block * D * BF16,
        "s": DOUBLE * h_tile * kv_block * FP32,
        "p": DOUBLE * h_tile * kv_block * BF16,
        "o": DOUBLE * h_tile * D * FP32,
        "part_o": units * h_tile * D * FP32 if kv_splits > 1 else 0,
        "part_stats": units * 2 * h_tile * FP32 if kv_splits > 1 else 0,
    }
    off, cur = {}, 0
    for name in SPARSE_WS_CORE_REGIONS:
        off[name] = cur
        cur += al(sizes[name])
    per_core = cur
    part_o = used_cores * per_core
    part_stats = part_o + al(sizes["part_o"])
    total = part_stats + al(sizes["part_stats"])
    return SparseAttnWorkspace(off["kv"], off["s"], off["p"], off["o"], per_core, part_o, part_stats, total, sizes)


@dataclass(frozen=True)
class AttnWork:
    """One piece of work as the kernel schedules it. `final` items write out[t, h0:h1, :]."""

    core: int
    t: int
    h0: int
    h1: int
    slot0: int  # index slots [slot0, slot1) of idx[t] (empty for a combine item)
    slot1: int
    final: bool
    combine: bool = False


def sparse_attn_schedule(tl: SparseAttnTiling) -> Iterator[AttnWork]:
    """The work items in kernel order: unit u = (t*n_hblk + hb)*splits + s runs on core u % used_cores;
    with splits > 1, combine task c = t*n_hblk + hb runs on core c % used_cores after a SyncAll."""
    for u in range(tl.units):
        s = u % tl.kv_splits
        th = u // tl.kv_splits
        t, hb = divmod(th, tl.n_hblk)
        h0, h1 = hb * tl.h_tile, min(tl.H, (hb + 1) * tl.h_tile)
        b0, b1 = s * tl.blocks_per_split, min(tl.n_kvblk, (s + 1) * tl.blocks_per_split)
        yield AttnWork(u % tl.used_cores, t, h0, h1, b0 * tl.kv_block, min(tl.K, b1 * tl.kv_block),
                       final=tl.kv_splits == 1)
    if tl.kv_splits > 1:
        for c in range(tl.T * tl.n_hblk):
            t, hb = divmod(c, tl.n_hblk)
            h0, h1 = hb * tl.h_tile, min(tl.H, (hb + 1) * tl.h_tile)
            yield AttnWork(c % tl.used_cores, t, h0, h1, 0, 0, final=True, combine=True)


# ================================================================================================ moe_gemm
# y[M, N] = x[M, K] . W_g[N, K]^T for the rows of each group g (rows sorted by group, counts in a device
# tensor, so the host does not know them: the kernel builds its unit list on device). Weights are per group
# (an aclTensorList), packed FP8 e4m3 [N, K] or FP4 e2m1 [N, K/2] with UE8M0 scales per (bn x bk) block:
# FP8 (128, 128), FP4 (1, 32). Dequant path (A2/A3; also valid on 950): the vector cores dequantise the unit's
# [n_tile, K] weight slab, k_tile columns at a time (FP4 via a 16-entry LUT, times 2^(s-127)), to bf16 in the
# per-core workspace (ping-pong across units), then the cube multiplies bf16 x bf16 with fp32 accumulation.
# Native MX path (950 only, `moe_gemm_mx_tiling` below).
M_TILES = (16, 32, 64, 128)  # smallest tile that covers the expected rows per group
N_TILES = (256, 128, 64, 32, 16)
K_TILES = (512, 256, 128, 64, 32)
K_STEPS = (4, 2, 1)  # k tiles staged in L1 per load
WEIGHT_BITS = {"fp8": 8, "fp4": 4, "bf16": 16}
SCALE_BLOCKS = {"fp8": (128, 128), "fp4": (1, 32), "bf16": (1, 1)}

# Whether the 950 native MX kernel (op_kernel/moe_gemm_mx_kernel.h) is proven. It is written only (never
# compiled or run), so False; ops/npu/kernels.py selects it only when ASCEND_V4_NPU_MX_GEMM=1 asks for it
# (docs/npu.md). The host tiling never reads this: the kernel variant is requested per call by weight_fmt.
MX_KERNEL_READY = False
MOE_KEY_FMT = {"bf16": 0, "fp8": 1, "fp4": 2}
MOE_KEY_MX = 10  # + on the 950 native MX path; also the weight_fmt attribute value that requests it


@dataclass(frozen=True)
class MoeGemmTiling:
    M: int
    N: int
    K: int
    E: int
    fmt: str
    core_num: int
    native_mx: bool
    m_tile: int
    n_tile: int
    k_tile: int
    k_step: int
    n_ntile: int
    max_units: int
    workspace_bytes: int
    tiling_key: int
    buffers: tuple[Buffer, ...] = field(repr=False)

    def usage(self) -> dict[str, int]:
        return _usage(self.buffers)


def moe_gemm_buffers(m: int, n: int, k: int, step: int, fmt: str) -> tuple[Buffer, ...]:
    """On-chip buffers of the dequant path (bf16 operands to the cube). UB figures are per vector core."""
    bits = WEIGHT_BITS[fmt]
    bn, bk = SCALE_BLOCKS[fmt]
    a = lambda v: align(v, UB_ALIGN)  # noqa: E731
    kl1 = k * step
    half = max(1, n // 2)  # weight rows dequantised per vector core
    bufs = [
        Buffer("a", "l1", DOUBLE * m * kl1 * BF16),
        Buffer("b", "l1", DOUBLE * n * kl1 * BF16),
        Buffer("a0", "l0a", DOUBLE * m * k * BF16),
        Buffer("b0", "l0b", DOUBLE * k * n * BF16),
        Buffer("c0", "l0c", DOUBLE * m * n * FP32),
    ]
    if fmt != "bf16":
        scale_cols = ceil_div(k, bk)
        scale_rows = ceil_div(half, bn)
        bufs += [
            Buffer("w_in", "ub", DOUBLE * a(half * k * bits // 8)),
            Buffer("w_scale", "ub", DOUBLE * a(scale_rows * scale_cols)),
            Buffer("w_work", "ub", a(half * k * FP32)),  # codes -> fp32 values -> times scale
            Buffer("w_out", "ub", DOUBLE * a(half * k * BF16)),
            # table decode, one row's k tile at a time (no fp8 Cast on A2/A3): bytes as fp16 (FP4: then the
            # gathered fp16 pairs), Gather byte offsets, and the 256-entry table (fp32 / fp16 pair per byte)
            Buffer("w_cvt", "ub", a(k * BF16)),
            Buffer("w_idx", "ub", a(k * INT32)),
            Buffer("lut", "ub", a(256 * FP32)),
        ]
    return tuple(bufs)


def _aligned_to_block(tile: int, block: int) -> bool:
    return tile % block == 0 or block % tile == 0


def _m_tile(M: int, E: int) -> int:
    rows = ceil_div(M, min(E, M))  # expected rows per non-empty group
    return next((c for c in M_TILES if c >= rows), M_TILES[-1])


def _check_moe_args(M: int, N: int, K: int, E: int, fmt: str, core_num: int) -> None:
    if fmt not in WEIGHT_BITS:
        raise TilingError(f"moe_gemm: unknown weight format {fmt!r}")
    if min(M, N, K, E, core_num) <= 0:
        raise TilingError(f"moe_gemm: empty shape M={M} N={N} K={K} E={E} cores={core_num}")
    if N % CUBE or K % 32:
        raise TilingError(f"moe_gemm: N={N} must be a multiple of {CUBE} and K={K} of 32")


def moe_gemm_tiling(caps: SocCaps, M: int, N: int, K: int, E: int, fmt: str, core_num: int,
                    allow_mx: bool = MX_KERNEL_READY) -> MoeGemmTiling:
    """Block sizes for the grouped GEMM of M routed rows over E groups, weights [N, K] in `fmt`.
    `allow_mx`: take the native MX path (`moe_gemm_mx_tiling`) where it applies (`mx_applicable`)."""
    _check_moe_args(M, N, K, E, fmt, core_num)
    if allow_mx and mx_applicable(caps, fmt, K):
        return moe_gemm_mx_tiling(caps, M, N, K, E, fmt, core_num)
    bits = WEIGHT_BITS[fmt]
    bn, bk = SCALE_BLOCKS[fmt]
    m = _m_tile(M, E)
    for n in N_TILES:
        if n > N or not _aligned_to_block(n, bn):
            continue
        for k in K_TILES:
            if k > K or not _aligned_to_block(k, bk) or (k * bits // 8) % UB_ALIGN:
                continue
            for step in K_STEPS:
                if k * step > align(K, k):
                    continue
                bufs = moe_gemm_buffers(m, n, k, step, fmt)
                if _fits(caps, bufs):
                    n_ntile = ceil_div(N, n)
                    max_units = (ceil_div(M, m) + min(E, M)) * n_ntile  # sum_g ceil(c_g/m) <= M/m + groups
                    if fmt != "bf16":
                        ws = core_num * DOUBLE * n * K * BF16  # dequantised [n_tile, K] weight slabs, vector -> cube
                    else:
                        ws = 0
                    return MoeGemmTiling(M, N, K, E, fmt, core_num, False, m, n, k, step, n_ntile, max_units, ws,
                                         MOE_KEY_FMT[fmt], bufs)
    raise TilingError(f"moe_gemm: nothing fits {caps.soc} for M={M} N={N} K={K} fmt={fmt}")


# ------------------------------------------------------------------------------------------ native MX (950)
# The contract (asc-devkit docs, "MxMatmul" scenario of the Matmul API, and the C API `asc_mmad_mx`):
# C = (scaleA (x) A) . (scaleB (x) B), one fp8_e8m0 scale per 32 consecutive K elements of each operand, element
# types fp8 x fp8 or fp4 x fp4 (no fp8 x fp4 pair), scales in GM as [rows, K/64, 2] = row-major [rows, K/32]
# with K/32 even. So, per call:
#   1. pre-pass (all vector cores): x [M, K] bf16 -> e4m3 [M, K] + e8m0 [M, K/32] in the workspace, 1x32
#      blocks, scale = smallest power of two >= amax/448 (ops/reference/mx.py); SyncAll;
#   2. per unit (group, m tile, n tile), the two vector cores of the block prepare their half of the n tile:
#      FP4 -> e4m3 bytes (a 256-entry byte-pair table, lossless) into a per-core workspace slab, the 1x32
#      scales are used as stored; FP8 -> bytes used in place, the 128x128 block scales expanded to 1x32
#      rows in a per-core scale slab; then the cube runs the MX matmul with fp32 accumulation in L0C.
# L1 / L0A / L0B hold e4m3 tiles plus their scale tiles (k/32 bytes per row); MX scale tiles must cover an
# even number of 32-blocks, hence k tiles (and K) multiples of 64.
MX_BLOCK = 32  # K elements per e8m0 scale
MX_K_ALIGN = 2 * MX_BLOCK  # K and every k tile: an even number of MX blocks (scale K dim [.., K/64, 2])
MX_K_TILES = (512, 256, 128, 64)
MX_ACT_ROWS = 16  # pre-pass step: rows x columns of x quantised per step on one vector core
MX_ACT_COLS = 512
MX_WIDEN_BYTES = 4096  # FP4 prologue step: packed weight bytes widened per step on one vector core
FP8 = 1
GM_ALIGN = 512  # workspace regions start on 512-byte boundaries


def mx_applicable(caps: SocCaps, fmt: str, K: int) -> bool:
    """The native MX path exists for this SoC, weight format and K."""
    return caps.native_mx and fmt in ("fp8", "fp4") and K % MX_K_ALIGN == 0


def moe_gemm_mx_buffers(m: int, n: int, k: int, step: int, fmt: str, K: int) -> tuple[Buffer, ...]:
    """On-chip buffers of the native MX path. UB figures are per vector core (pre-pass + weight prologue)."""
    a = lambda v: align(v, UB_ALIGN)  # noqa: E731
    kl1 = k * step
    sc = lambda rows, cols: rows * ceil_div(cols, MX_BLOCK)  # noqa: E731  (e8m0 bytes of a [rows, cols] tile)
    r, c = MX_ACT_ROWS, MX_ACT_COLS
    bufs = [
        Buffer("a", "l1", DOUBLE * m * kl1 * FP8),
        Buffer("a_scale", "l1", DOUBLE * sc(m, kl1)),
        Buffer("b", "l1", DOUBLE * n * kl1 * FP8),
        Buffer("b_scale", "l1", DOUBLE * sc(n, kl1)),
        Buffer("a0", "l0a", DOUBLE * (m * k * FP8 + sc(m, k))),  # MX scales sit in L0A / L0B next to the data
        Buffer("b0", "l0b", DOUBLE * (k * n * FP8 + sc(n, k))),
        Buffer("c0", "l0c", DOUBLE * m * n * FP32),
        # pre-pass: bf16 in, fp32 values and |values|, per-block amax, per-block 2^-e broadcast to one 32-byte
        # block (for the strided multiply), e4m3 out, e8m0 out with rows padded to 32 bytes (DataCopyPad)
        Buffer("x_in", "ub", DOUBLE * a(r * c * BF16)),
        Buffer("x_f32", "ub", a(r * c * FP32)),
        Buffer("x_abs", "ub", a(r * c * FP32)),
        Buffer("x_amax", "ub", a(r * c // MX_BLOCK * FP32)),
        Buffer("x_inv", "ub", a(r * c // MX_BLOCK * UB_ALIGN)),
        Buffer("x_out", "ub", DOUBLE * a(r * c * FP8)),
        Buffer("x_scale", "ub", DOUBLE * r * a(c // MX_BLOCK)),
    ]
    if fmt == "fp4":  # bytes -> f16 -> int32 byte offsets -> Gather from a 256 x uint16 table (2 e4m3 out)
        w = MX_WIDEN_BYTES
        bufs += [
            Buffer("w_in", "ub", DOUBLE * a(w)),
            Buffer("w_f16", "ub", a(w * 2)),
            Buffer("w_idx", "ub", a(w * INT32)),
            Buffer("w_out", "ub", DOUBLE * a(w * 2)),
            Buffer("w_table", "ub", a(256 * 2)),
        ]
    else:  # one 128-row block of FP8 scales in, one expanded 1x32 row out
        bufs += [
            Buffer("s_in", "ub", a(ceil_div(K, SCALE_BLOCKS["fp8"][1]))),
            Buffer("s_out", "ub", DOUBLE * a(K // MX_BLOCK)),
        ]
    return tuple(bufs)


@dataclass(frozen=True)
class MxWorkspace:
    """Byte offsets of the native MX path's GM workspace regions (passed to the kernel in the tiling data)."""

    xq: int  # e4m3 activations [align(M, 16), K]
    xs: int  # e8m0 activation scales [align(M, 16), K/32]
    slab: int  # per core, ping-pong: FP4 -> e4m3 weight slab [n_tile, K]; FP8 -> e8m0 scale slab [n_tile, K/32]
    slab_per_core: int
    total: int


def mx_workspace(M: int, K: int, n: int, core_num: int, fmt: str) -> MxWorkspace:
    rows = align(M, CUBE)
    xq_bytes = align(rows * K * FP8, GM_ALIGN)
    xs_bytes = align(rows * (K // MX_BLOCK), GM_ALIGN)
    slab_row = K * FP8 if fmt == "fp4" else K // MX_BLOCK
    per_core = align(DOUBLE * n * slab_row, GM_ALIGN)
    return MxWorkspace(0, xq_bytes, xq_bytes + xs_bytes, per_core, xq_bytes + xs_bytes + core_num * per_core)


def moe_gemm_mx_tiling(caps: SocCaps, M: int, N: int, K: int, E: int, fmt: str, core_num: int) -> MoeGemmTiling:
    """Block sizes of the 950 native MX path (tiling key MOE_KEY_FMT[fmt] + MOE_KEY_MX). Same unit list and
    preference order as the dequant path: the widest n tile, then the deepest k tile, then the most k tiles
    per L1 load."""
    _check_moe_args(M, N, K, E, fmt, core_num)
    if not mx_applicable(caps, fmt, K):
        raise TilingError(f"moe_gemm: no native MX path on {caps.soc} for fmt={fmt} K={K} (needs ascend950, "
                          f"FP8/FP4 weights and K % {MX_K_ALIGN} == 0)")
    m = _m_tile(M, E)
    for n in N_TILES:
        if n > N:
            continue
        for k in MX_K_TILES:
            if k > K:
                continue
            for step in K_STEPS:
                if k * step > align(K, k):
                    continue
                bufs = moe_gemm_mx_buffers(m, n, k, step, fmt, K)
                if _fits(caps, bufs):
                    n_ntile = ceil_div(N, n)
                    max_units = (ceil_div(M, m) + min(E, M)) * n_ntile
                    ws = mx_workspace(M, K, n, core_num, fmt).total
                    return MoeGemmTiling(M, N, K, E, fmt, core_num, True, m, n, k, step, n_ntile, max_units, ws,
                                         MOE_KEY_FMT[fmt] + MOE_KEY_MX, bufs)
    raise TilingError(f"moe_gemm: nothing fits {caps.soc} for the MX path, M={M} N={N} K={K} fmt={fmt}")


@dataclass(frozen=True)
class GemmWork:
    core: int
    group: int
    row0: int  # rows [row0, row1) of x / y
    row1: int
    col0: int  # columns [col0, col1) of y
    col1: int


def moe_gemm_schedule(tl: MoeGemmTiling, counts: list[int]) -> Iterator[GemmWork]:
    """Units in kernel order (built on device from the group counts): for each group with rows, its m tiles
    times the n tiles; unit u runs on core u % core_num."""
    if len(counts) != tl.E or sum(counts) != tl.M:
        raise ValueError(f"counts must have E={tl.E} entries summing to M={tl.M}")
    u, start = 0, 0
    for g, c in enumerate(counts):
        for mi in range(ceil_div(c, tl.m_tile)):
            r0, r1 = start + mi * tl.m_tile, start + min(c, (mi + 1) * tl.m_tile)
            for ni in range(tl.n_ntile):
                yield GemmWork(u % tl.core_num, g, r0, r1, ni * tl.n_tile, min(tl.N, (ni + 1) * tl.n_tile))
                u += 1
        start += c


__all__ = ["SocCaps", "SOCS", "MEMS", "TilingError", "Buffer", "SparseAttnTiling", "sparse_attn_tiling",
           "sparse_attn_buffers", "sparse_attn_schedule", "AttnWork", "MoeGemmTiling", "moe_gemm_tiling",
           "moe_gemm_buffers", "moe_gemm_mx_tiling", "moe_gemm_mx_buffers", "mx_applicable", "mx_workspace",
           "MxWorkspace", "moe_gemm_schedule", "GemmWork", "ceil_div", "align",
           "sparse_attn_workspace", "SparseAttnWorkspace", "SPARSE_WS_ALIGN", "SPARSE_WS_CORE_REGIONS"]
