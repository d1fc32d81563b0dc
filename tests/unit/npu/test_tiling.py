"""Host tiling of the Ascend C ops (ops/npu/tiling.py), checked on CPU:

* no on-chip buffer (UB, L1, L0A/B/C) is ever exceeded for V4-Flash / V4-Pro shapes, decode and prefill,
  several batch sizes, contexts, TP splits of the heads and core counts, on every target SoC;
* the kernel schedule covers every output element exactly once (and every index slot / weight column once);
* the 950 native MX path of moe_gemm: capacity, coverage, scale tiles made of whole (and an even number of)
  32-element MX blocks, disjoint workspace regions, for Flash / Pro expert shapes, decode and prefill;
* the C++ port (ops/ascendc/common/tiling_rules.h and ops/ascendc/moe_gemm/op_host/moe_gemm_mx_rules.h, used by
  the op_host tiling) gives identical results: compiled with the host g++ and compared field by field.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ascend_v4.ops.npu import tiling as tl

ROOT = Path(__file__).resolve().parents[3]
CORES = (20, 24, 40)
# (heads per rank, index width K = 128 window + selected/visible compressed entries)
FLASH, PRO = dict(H=64, D=512, topk=512), dict(H=128, D=512, topk=1024)
HCA_1M = 128 + (1 << 20) // 128  # window + every compressed entry of a 1M context (HCA layers)


def _attn_cases():
    for model in (FLASH, PRO):
        for tp in (1, 2, 4, 8, 16):
            H = model["H"] // tp
            if H < 1:
                continue
            for K in (128, 128 + model["topk"], HCA_1M, 128 + 64):  # window-only, CSA, HCA@1M, HCA short
                for T in (1, 4, 32, 256, 2048, 8192):  # decode batch sizes ... prefill chunks
                    yield T, H, model["D"], K


ATTN_CASES = list(_attn_cases())
SOCS = list(tl.SOCS.values())


@pytest.mark.parametrize("caps", SOCS, ids=lambda c: c.soc)
def test_sparse_attn_capacity_never_exceeded(caps):
    n = 0
    for (T, H, D, K), cores in itertools.product(ATTN_CASES, CORES):
        for fp8 in (False, True) if caps.native_mx else (False,):
            t = tl.sparse_attn_tiling(caps, T, H, D, K, cores, kv_fp8=fp8)
            u = t.usage()
            assert u["ub"] <= caps.ub - tl.UB_RESERVED and u["l1"] <= caps.l1, (T, H, K, t)
            assert u["l0a"] <= caps.l0a and u["l0b"] <= caps.l0b and u["l0c"] <= caps.l0c, (T, H, K, t)
            # cube alignment, D chunks tile D exactly, head tile never larger than the padded head count
            assert t.h_tile % 16 == 0 and t.kv_block % 16 == 0 and D % t.d_qk == 0 and D % t.d_pv == 0
            assert t.h_tile <= tl.align(H, 16) and 1 <= t.used_cores <= cores
            n += 1
    assert n > 500


def test_buffer_formulas_match_declared_usage():
    # The usage the solver checks is the sum of the declared buffers, recomputed here independently.
    t = tl.sparse_attn_tiling(tl.SOCS["ascend910b"], 1, 64, 512, 640, 24)
    r = t.h_tile // 2
    ub = 2 * r * t.kv_block * 4 + 2 * r * t.kv_block * 2 + 2 * t.kv_block * 4 + 2 * r * t.d_pv * 4 + r * 512 * 4 + 4 * r * 4
    ub += 2 * 512 * 2 + 2 * 512 * 2  # row_out, row_copy (one 16-bit row each, double-buffered)
    assert t.usage()["ub"] == ub
    assert t.usage()["l0c"] == 2 * max(t.h_tile * t.kv_block, t.h_tile * t.d_pv) * 4


def _check_attn_coverage(t: tl.SparseAttnTiling):
    T, H = t.T, t.H
    writes = torch.zeros(T, H, dtype=torch.int32)
    slots = {}  # (t, h0) -> list of slot ranges
    cores_seen = set()
    for w in tl.sparse_attn_schedule(t):
        assert 0 <= w.core < t.used_cores
        cores_seen.add(w.core)
        if w.final:
            writes[w.t, w.h0:w.h1] += 1
        if not w.combine:
            slots.setdefault((w.t, w.h0), []).append((w.slot0, w.slot1))
    assert bool((writes == 1).all()), "every out[t, h, :] row is written exactly once"
    assert len(cores_seen) == t.used_cores
    for key, ranges in slots.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == t.K, (key, ranges[:3])
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), f"gap/overlap in index slots at {key}"
    assert len(slots) == T * t.n_hblk
    # each unit walks D in d_qk / d_pv chunks: both tile D exactly
    assert t.D % t.d_qk == 0 and t.D % t.d_pv == 0


@pytest.mark.parametrize("T,H,K", [(1, 64, 640), (1, 128, 1152), (3, 64, HCA_1M), (8, 16, 640), (1, 4, 40),
                                   (256, 128, 1152), (2048, 64, 640), (1, 8, 128), (5, 48, 300)])
@pytest.mark.parametrize("cores", [20, 24])
def test_sparse_attn_covers_every_output_once(T, H, K, cores):
    for caps in SOCS:
        _check_attn_coverage(tl.sparse_attn_tiling(caps, T, H, 512, K, cores))


def test_decode_splits_the_index_list_and_prefill_does_not():
    caps = tl.SOCS["ascend910b"]
    dec = tl.sparse_attn_tiling(caps, 1, 64, 512, 640, 24)
    pre = tl.sparse_attn_tiling(caps, 4096, 64, 512, 640, 24)
    assert dec.kv_splits > 1 and dec.tiling_key == tl.SPARSE_KEY_SPLIT
    assert pre.kv_splits == 1 and pre.used_cores == 24 and pre.tiling_key == tl.SPARSE_KEY_BF16


def test_fp8_kv_variant_only_on_950():
    with pytest.raises(tl.TilingError, match="950"):
        tl.sparse_attn_tiling(tl.SOCS["ascend910b"], 1, 64, 512, 640, 24, kv_fp8=True)
    t = tl.sparse_attn_tiling(tl.SOCS["ascend950"], 1, 64, 512, 640, 24, kv_fp8=True)
    assert t.tiling_key % 10 == tl.SPARSE_KEY_FP8_KV


# ------------------------------------------------------------------------------------------------ sparse_attn kernel
# The host tiling against the kernel's own buffer lists: op_kernel/sparse_attn_kernel.h (+ sparse_attn_kv_fp8.h)
# declare every UB buffer with `// tiling: <name>` and every GM workspace tensor with `td-><offset field>`; these
# tests read those lines, evaluate their sizes for real tilings and compare them with ops/npu/tiling.py.
SA_DIR = ROOT / "ops/ascendc/sparse_attn"
SA_KERNEL = SA_DIR / "op_kernel/sparse_attn_kernel.h"
SA_FP8 = SA_DIR / "op_kernel/sparse_attn_kv_fp8.h"
WS_FIELDS = {"wsKvOff": ("kv", "kv"), "wsSOff": ("s", "s"), "wsPOff": ("p", "p"), "wsOOff": ("o", "o"),
             "wsPartOOff": ("part_o", "partO"), "wsPartStatOff": ("part_stats", "partStats")}
C_SIZES = {"float": 4, "int32_t": 4, "T": 2, "bfloat16_t": 2, "uint8_t": 1}


def _code(path: Path) -> str:
    return re.sub(r"//[^\n]*", "", path.read_text())  # comments may name what the code must not use


def _cpp_eval(expr: str, env: dict) -> int:
    py = re.sub(r"sizeof\((\w+)\)", lambda m: str(C_SIZES[m.group(1)]), expr).replace("td->", "")
    return int(eval(py, {"AlignUp": tl.align, "__builtins__": {}}, dict(env)))  # noqa: S307 (our own header)


def _kernel_env(t: tl.SparseAttnTiling) -> dict:
    return dict(rows_=t.h_tile // 2, kvBlock_=t.kv_block, dPv_=t.d_pv, D_=t.D, hTile_=t.h_tile, units=t.units,
                DQ_ROWS=tl.DQ_ROWS)


def _kernel_ub(t: tl.SparseAttnTiling) -> dict[str, int]:
    """name -> bytes of every InitBuffer the kernel runs for this variant (TQue: num x 32-byte aligned len)."""
    got = {}
    for path in (SA_KERNEL, SA_FP8) if t.kv_fp8 else (SA_KERNEL,):
        lines = path.read_text().splitlines()
        for i, ln in enumerate(lines):
            m = re.search(r"InitBuffer\((\w+), (?:(\d+), )?(.+)\);\s*// tiling: (\w+)", ln)
            if not m:
                continue
            if t.kv_fp8 and "!KvDec::PACKED" in lines[i - 1]:
                continue  # the BF16 row-copy queue, not initialised for the FP8 decoder
            num = int(m.group(2) or 1)
            got[m.group(4)] = num * tl.align(_cpp_eval(m.group(3), _kernel_env(t)), tl.UB_ALIGN)
    return got


def _sa_tilings():
    for caps in SOCS:
        for (T, H, D, K), cores in itertools.product(ATTN_CASES[::5], CORES):
            for fp8 in (False, True) if caps.native_mx else (False,):
                yield tl.sparse_attn_tiling(caps, T, H, D, K, cores, kv_fp8=fp8)


def test_kernel_ub_buffers_are_the_host_list():
    assert int(re.search(r"DQ_ROWS = (\d+);", SA_KERNEL.read_text()).group(1)) == tl.DQ_ROWS
    n = 0
    for t in _sa_tilings():
        host = {b.name: b.nbytes for b in t.buffers if b.mem == "ub"}
        assert _kernel_ub(t) == host, (t.kv_fp8, t.h_tile, t.kv_block)
        n += 1
    assert n > 100


def test_kernel_workspace_tensors_are_the_host_layout():
    """Each workspace GlobalTensor starts at a host-computed offset field and its extent fits that region."""
    decl = re.findall(r"(\w+)\.SetGlobalBuffer\(\(__gm__ (\w+) \*\)\((base|ws) \+ td->(\w+)\), (.+?)\);",
                      _code(SA_KERNEL))
    assert sorted(d[3] for d in decl) == sorted(WS_FIELDS), decl
    for _, ctype, origin, field_, _ in decl:
        assert (origin == "ws") == field_.startswith("wsPart"), field_  # partials: from the workspace start
    tiling_cpp = (SA_DIR / "op_host/sparse_attn_tiling.cpp").read_text()
    tiling_h = (SA_DIR / "op_host/sparse_attn_tiling.h").read_text()
    for field_, (_, cpp) in {**WS_FIELDS, "wsPerCore": (None, "perCore")}.items():
        assert f"data.set_{field_}(t.ws.{cpp});" in tiling_cpp, field_
        assert f"TILING_DATA_FIELD_DEF(uint64_t, {field_})" in tiling_h, field_
    assert "base = ws + core * td->wsPerCore;" in _code(SA_KERNEL)
    for t in _sa_tilings():
        w = t.workspace
        for _, ctype, _, field_, extent in decl:
            region = WS_FIELDS[field_][0]
            if region.startswith("part") and t.kv_splits == 1:
                continue  # only the split kernels (SPLIT = true) set these tensors
            assert _cpp_eval(extent, _kernel_env(t)) * C_SIZES[ctype] <= w.sizes[region], (field_, t)


def _kernel_accesses(t: tl.SparseAttnTiling):
    """Largest byte end each workspace index expression of sparse_attn_kernel.h reaches (buf, sub in {0, 1},
    r < rows, j < kvBlock, u < units), region by region."""
    h, kb, D, rows = t.h_tile, t.kv_block, t.D, t.h_tile // 2
    yield "kv", ((1 * kb + (kb - 1)) * D + D) * 2                      # kvWs_[(buf * kvBlock + r) * D] + D
    yield "s", ((1 * h + 1 * rows) * kb + rows * kb) * 4               # sWs_[sOff], nRows * kvBlock values
    yield "p", ((1 * h + 1 * rows) * kb + rows * kb) * 2               # pWs_[sOff]
    yield "o", ((1 * h + 1 * rows + rows - 1) * D + D) * 4             # oWs_[oOff + r * D + d0]
    if t.kv_splits > 1:
        u = t.units - 1
        yield "part_o", ((u * h + rows) * D + (rows - 1) * D + D) * 4  # partO_[oBase + r * D], D values
        yield "part_stats", (u * 2 * h + rows + h + rows) * 4          # partStat_[sBase + hTile], rows values


def test_sparse_workspace_regions_are_disjoint_and_hold_every_access():
    n = 0
    for t in _sa_tilings():
        w = t.workspace
        spans = []
        for c in range(t.used_cores):
            for name in tl.SPARSE_WS_CORE_REGIONS:
                start = c * w.per_core + getattr(w, name)
                spans.append((start, start + w.sizes[name], f"core{c}.{name}"))
        if t.kv_splits > 1:
            spans += [(w.part_o, w.part_o + w.sizes["part_o"], "part_o"),
                      (w.part_stats, w.part_stats + w.sizes["part_stats"], "part_stats")]
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "two workspace regions overlap"
        assert spans[-1][1] <= w.total == t.workspace_bytes
        assert all(s0 % tl.SPARSE_WS_ALIGN == 0 for s0, _, _ in spans) and w.per_core % tl.SPARSE_WS_ALIGN == 0
        for region, end in _kernel_accesses(t):
            assert end <= w.sizes[region], (region, end, w.sizes[region], t)
        n += 1
    assert n > 100


def test_sparse_kernel_sync_and_build_rules():
    """Static guards for the review findings on the sparse-attention kernel (see the cited asc-devkit docs in
    the kernel sources): they check the text, not that it compiles or runs."""
    kernel, entry, entry8 = _code(SA_KERNEL), _code(SA_DIR / "op_kernel/sparse_attn.cpp"), \
        _code(SA_DIR / "op_kernel/sparse_attn_kv_quant.cpp")
    # FP8 only in the 950-only entry: no fp8 type in what A2/A3 compile; the decoder is included by KvQuant only
    for code in (kernel, entry):
        assert not re.search(r"fp8_e\w+_t|hifloat8_t|sparse_attn_kv_fp8\.h", code)
    assert '#include "sparse_attn_kv_fp8.h"' in entry8 and "fp8_e4m3fn_t" in _code(SA_FP8)
    op_def = (SA_DIR / "op_host/sparse_attn_def.cpp").read_text()
    kvq = op_def[op_def.index("class SparseAttnKvQuant"):]
    assert re.findall(r'AddConfig\("(\w+)"', kvq) == ["ascend950"]
    assert 'MakeConfig("sparse_attn_kv_quant")' in kvq and 'MakeConfig("sparse_attn")' in op_def
    # Matmul objects registered in the entry scope, before Init (its InitBuffer calls)
    assert "REGIST_MATMUL_OBJ" not in kernel
    for code in (entry, entry8):
        regs, inits = [m.start() for m in re.finditer("REGIST_MATMUL_OBJ", code)], \
            [m.start() for m in re.finditer(r"op\.Init\(", code)]
        assert len(regs) == len(inits) == 2 and all(r < i for r, i in zip(regs, inits))
    # cross-core flag outside Matmul [0, 2N-1], SyncAll [11, 14] and the KFC sync id 15; wait = set's <mode, pipe>
    flag = int(re.search(r"GATHER_FLAG = (\d+);", kernel).group(1))
    n_mm = len(re.findall(r"matmul::Matmul<", kernel))
    assert flag >= 2 * max(n_mm, 4) and flag not in range(11, 16)
    sets = re.findall(r"CrossCoreSetFlag<(\d), (PIPE_\w+)>", kernel)
    waits = re.findall(r"CrossCoreWaitFlag<(\d), (PIPE_\w+)>", kernel)
    assert sets and sets == waits and "CrossCoreWaitFlag(" not in kernel
    assert all(pipe != "PIPE_S" for mode, pipe in waits if mode in "012")
    # tail blocks: mm1's N, mm2's K and the S / P row stride are all kvBlock_
    assert "mm1.SetOrgShape(nRows, kvBlock_, D_);" in kernel and "mm2.SetOrgShape(nRows, D_, kvBlock_);" in kernel
    # split path: no scalar GM writes of partials; SyncAll kernels get batch mode from the host
    assert not re.search(r"part\w*_\.SetValue", kernel) and "SyncAll<true>()" in kernel
    assert "context->SetScheduleMode(1);" in (SA_DIR / "op_host/sparse_attn_tiling.cpp").read_text()
    # compiler-inserted scalar <-> vector / MTE syncs stay on
    cmake = re.sub(r"#[^\n]*", "", (SA_DIR / "CMakeLists.txt").read_text())
    assert "--cce-auto-sync=off" not in cmake and cmake.count("--cce-auto-sync=on") == 2


# ------------------------------------------------------------------------------------------------ moe_gemm
def _moe_cases():
    # (rows M = tokens * top-k on this rank, N, K, groups E, fmt)
    for model, (D, I, E) in {"flash": (4096, 2048, 256), "pro": (7168, 3072, 384)}.items():
        for ep in (1, 8, 16, 32):
            e_local = E // ep
            for tokens in (1, 8, 64, 512, 4096, 16384):
                M = tokens * 6 // ep or 1
                yield M, I, D, e_local, "fp4"  # w1 / w3: D -> inter
                yield M, D, I, e_local, "fp4"  # w2: inter -> D
        for tokens in (1, 64, 8192):  # dense FP8 linears as one group (quant_gemm), incl. the shared expert
            yield tokens, I, D, 1, "fp8"
            yield tokens, D, I, 1, "fp8"
            yield tokens, 1024, D, 1, "fp8"  # wq_a
            yield tokens, 512, D, 1, "fp8"  # wkv
    yield 7, 4096, 4096, 1, "bf16"


MOE_CASES = list(_moe_cases())


def _assert_fits(caps: tl.SocCaps, t) -> None:
    u = t.usage()
    assert u["ub"] <= caps.ub - tl.UB_RESERVED and u["l1"] <= caps.l1, (caps.soc, t)
    assert u["l0a"] <= caps.l0a and u["l0b"] <= caps.l0b and u["l0c"] <= caps.l0c, (caps.soc, t)


def _assert_mx_layout(t: tl.MoeGemmTiling) -> None:
    """MX scale tiles are whole 32-element blocks, an even number of them (scale K dim [.., K/64, 2]), and
    the buffers the solver checked hold exactly rows x k/32 e8m0 bytes next to rows x k e4m3 bytes."""
    assert t.K % 64 == 0 and t.k_tile % 64 == 0 and (t.k_tile * t.k_step) % 64 == 0, t
    assert t.tiling_key == tl.MOE_KEY_FMT[t.fmt] + tl.MOE_KEY_MX
    b = {x.name: x.nbytes for x in t.buffers}
    kl1 = t.k_tile * t.k_step
    assert b["a"] == 2 * t.m_tile * kl1 and b["a_scale"] == 2 * t.m_tile * (kl1 // 32)
    assert b["b"] == 2 * t.n_tile * kl1 and b["b_scale"] == 2 * t.n_tile * (kl1 // 32)
    assert b["a0"] == 2 * (t.m_tile * t.k_tile + t.m_tile * t.k_tile // 32)
    assert b["b0"] == 2 * (t.n_tile * t.k_tile + t.n_tile * t.k_tile // 32)
    ws = tl.mx_workspace(t.M, t.K, t.n_tile, t.core_num, t.fmt)
    rows = tl.align(t.M, 16)
    slab_row = t.K if t.fmt == "fp4" else t.K // 32  # FP4: widened e4m3 weights; FP8: expanded scales
    assert ws.xq == 0 and ws.xs >= rows * t.K and ws.slab >= ws.xs + rows * t.K // 32, ws
    assert ws.slab_per_core >= 2 * t.n_tile * slab_row and ws.total == ws.slab + t.core_num * ws.slab_per_core
    assert all(v % 512 == 0 for v in (ws.xs, ws.slab, ws.slab_per_core)) and t.workspace_bytes == ws.total


@pytest.mark.parametrize("caps", SOCS, ids=lambda c: c.soc)
@pytest.mark.parametrize("allow_mx", [False, True])
def test_moe_gemm_capacity_never_exceeded(caps, allow_mx):
    for (M, N, K, E, fmt), cores in itertools.product(MOE_CASES, CORES):
        t = tl.moe_gemm_tiling(caps, M, N, K, E, fmt, cores, allow_mx=allow_mx)
        _assert_fits(caps, t)
        assert t.native_mx == (caps.native_mx and allow_mx and fmt != "bf16")  # every V4 K is a multiple of 64
        if t.native_mx:
            _assert_mx_layout(t)
            continue
        bn, bk = tl.SCALE_BLOCKS[fmt]
        assert t.k_tile % bk == 0 or bk % t.k_tile == 0, "a k tile never straddles a scale block"
        assert t.n_tile % bn == 0 or bn % t.n_tile == 0
        assert (t.k_tile * tl.WEIGHT_BITS[fmt] // 8) % 32 == 0, "packed weight rows are 32-byte aligned"


@pytest.mark.parametrize("M,N,K,E,fmt", [(6, 2048, 4096, 256, "fp4"), (6 * 512, 4096, 2048, 256, "fp4"),
                                         (12, 7168, 3072, 24, "fp4"), (1, 1024, 4096, 1, "fp8"),
                                         (300, 4096, 2048, 16, "fp8"), (37, 128, 128, 8, "fp4")])
def test_moe_gemm_covers_every_output_once(M, N, K, E, fmt):
    g = torch.Generator().manual_seed(M + N)
    for caps, cores in itertools.product(SOCS, (20, 24)):
        t = tl.moe_gemm_tiling(caps, M, N, K, E, fmt, cores)
        for trial in range(3):  # skewed, uniform and all-in-one group splits of the M rows
            if trial == 0:
                ids = torch.randint(0, E, (M,), generator=g)
            elif trial == 1:
                ids = torch.arange(M) % E
            else:
                ids = torch.full((M,), E - 1)
            counts = torch.bincount(ids, minlength=E).tolist()
            hits = torch.zeros(M, N, dtype=torch.int32)
            starts = [0] + list(itertools.accumulate(counts))
            n_units = 0
            for w in tl.moe_gemm_schedule(t, counts):
                assert starts[w.group] <= w.row0 < w.row1 <= starts[w.group + 1], "a unit never crosses groups"
                assert w.row1 - w.row0 <= t.m_tile and w.col1 - w.col0 <= t.n_tile
                assert 0 <= w.core < cores
                hits[w.row0:w.row1, w.col0:w.col1] += 1
                n_units += 1
            assert bool((hits == 1).all()), "every y[m, n] is computed exactly once"
            assert n_units <= t.max_units


def test_decode_gemm_uses_small_m_tile_and_prefill_large():
    caps = tl.SOCS["ascend910b"]
    assert tl.moe_gemm_tiling(caps, 6, 2048, 4096, 256, "fp4", 24).m_tile == 16
    assert tl.moe_gemm_tiling(caps, 6 * 8192, 2048, 4096, 256, "fp4", 24).m_tile == 128


# ------------------------------------------------------------------------------------------------ moe_gemm, 950 MX
def _mx_cases():
    # routed experts of Flash / Pro (model-spec §8.4: w1/w3 D -> I, w2 I -> D), FP4 as stored and FP8 as recast
    # by --expert-dtype fp8 (§8.6); rows M = tokens * 6 / EP; decode batches and prefill chunks
    for (D, I, E) in ((4096, 2048, 256), (7168, 3072, 384)):
        for ep in (1, 8, 16, 32):
            for tokens in (1, 4, 32, 128, 2048, 8192, 16384):
                M = max(1, tokens * 6 // ep)
                for fmt in ("fp4", "fp8"):
                    yield M, I, D, E // ep, fmt
                    yield M, D, I, E // ep, fmt


MX_CASES = list(_mx_cases())
CAPS950 = tl.SOCS["ascend950"]


def test_mx_tiling_capacity_and_scale_alignment():
    n = 0
    for (M, N, K, E, fmt), cores in itertools.product(MX_CASES, (20, 24, 32, 40)):
        t = tl.moe_gemm_mx_tiling(CAPS950, M, N, K, E, fmt, cores)
        assert t.native_mx and t == tl.moe_gemm_tiling(CAPS950, M, N, K, E, fmt, cores, allow_mx=True)
        _assert_fits(CAPS950, t)
        _assert_mx_layout(t)
        assert t.n_tile <= N
        n += 1
    assert n > 800
    # decode picks the smallest m tile, prefill the largest; both fit the 950 L0C (256 KiB) with double buffering
    assert tl.moe_gemm_mx_tiling(CAPS950, 6, 2048, 4096, 256, "fp4", 32).m_tile == 16
    assert tl.moe_gemm_mx_tiling(CAPS950, 6 * 8192, 2048, 4096, 256, "fp4", 32).m_tile == 128


@pytest.mark.parametrize("M,N,K,E,fmt", [(6, 2048, 4096, 256, "fp4"), (6 * 512, 4096, 2048, 256, "fp4"),
                                         (12, 7168, 3072, 24, "fp4"), (1, 1024, 4096, 1, "fp8"),
                                         (300, 4096, 2048, 16, "fp8"), (37, 128, 128, 8, "fp4"),
                                         (6 * 2048 // 16, 3072, 7168, 24, "fp8")])
def test_mx_tiling_covers_every_output_once(M, N, K, E, fmt):
    g = torch.Generator().manual_seed(M + N + 1)
    for cores in (20, 32):
        t = tl.moe_gemm_mx_tiling(CAPS950, M, N, K, E, fmt, cores)
        for ids in (torch.randint(0, E, (M,), generator=g), torch.arange(M) % E, torch.full((M,), E - 1)):
            counts = torch.bincount(ids, minlength=E).tolist()
            hits = torch.zeros(M, N, dtype=torch.int32)
            starts = [0] + list(itertools.accumulate(counts))
            units = list(tl.moe_gemm_schedule(t, counts))
            for w in units:
                assert starts[w.group] <= w.row0 < w.row1 <= starts[w.group + 1]
                assert w.row1 - w.row0 <= t.m_tile and w.col1 - w.col0 <= t.n_tile and 0 <= w.core < cores
                hits[w.row0:w.row1, w.col0:w.col1] += 1
            assert bool((hits == 1).all()), "every y[m, n] is computed exactly once"
            assert len(units) <= t.max_units
        # each unit walks K in k tiles of whole MX blocks: the k tiles tile K exactly
        edges = list(range(0, K, t.k_tile)) + [K]
        assert all((b - a) % 64 == 0 for a, b in itertools.pairwise(edges))


def test_mx_path_only_where_it_applies():
    caps = tl.SOCS["ascend910b"]
    assert not tl.moe_gemm_tiling(caps, 6, 2048, 4096, 256, "fp4", 24, allow_mx=True).native_mx  # no MX cube
    assert not tl.moe_gemm_tiling(CAPS950, 6, 2048, 4096, 256, "fp4", 24, allow_mx=False).native_mx
    assert not tl.moe_gemm_tiling(CAPS950, 6, 2048, 96, 8, "fp4", 24, allow_mx=True).native_mx  # K % 64
    assert not tl.moe_gemm_tiling(CAPS950, 7, 4096, 4096, 1, "bf16", 24, allow_mx=True).native_mx
    for args in ((caps, 6, 2048, 4096, 256, "fp4"), (CAPS950, 6, 2048, 96, 8, "fp4"), (CAPS950, 6, 64, 64, 1, "bf16")):
        with pytest.raises(tl.TilingError, match="no native MX path"):
            tl.moe_gemm_mx_tiling(*args, 24)
    with pytest.raises(tl.TilingError, match="N=100"):
        tl.moe_gemm_mx_tiling(CAPS950, 4, 100, 4096, 1, "fp8", 24)


def test_impossible_shapes_raise():
    caps = tl.SOCS["ascend910b"]
    with pytest.raises(tl.TilingError):
        tl.moe_gemm_tiling(caps, 4, 100, 4096, 1, "fp8", 24)  # N not a multiple of 16
    with pytest.raises(tl.TilingError):
        tl.sparse_attn_tiling(caps, 1, 64, 520, 640, 24)  # D not a multiple of 64
    with pytest.raises(tl.TilingError):
        tl.sparse_attn_tiling(caps, 0, 64, 512, 640, 24)


# ------------------------------------------------------------------------------------------------ C++ parity
FMT_ID = {"bf16": 0, "fp8": 1, "fp4": 2}


@pytest.fixture(scope="module")
def rules_binary(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not installed: the C++ tiling rules cannot be compiled here")
    out = tmp_path_factory.mktemp("tiling") / "tiling_rules_check"
    src = Path(__file__).with_name("tiling_rules_check.cpp")
    r = subprocess.run([gxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{ROOT / 'ops/ascendc/common'}",
                        f"-I{ROOT / 'ops/ascendc/moe_gemm/op_host'}", str(src), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def test_cpp_rules_match_python(rules_binary):
    lines, expect = [], []
    for caps in SOCS:
        for (T, H, D, K), cores in itertools.product(ATTN_CASES[::3], (20, 24)):
            for fp8 in (False, True) if caps.native_mx else (False,):
                lines.append(f"S {caps.soc} {T} {H} {D} {K} {cores} {int(fp8)}")
                t = tl.sparse_attn_tiling(caps, T, H, D, K, cores, kv_fp8=fp8)
                u = t.usage()
                w = t.workspace
                expect.append(["S", 1, t.h_tile, t.kv_block, t.d_qk, t.d_pv, t.n_hblk, t.n_kvblk, t.kv_splits,
                               t.blocks_per_split, t.units, t.used_cores, t.workspace_bytes, t.tiling_key,
                               *(u[m] for m in tl.MEMS), w.kv, w.s, w.p, w.o, w.per_core, w.part_o, w.part_stats])
        moe = itertools.product(MOE_CASES + MX_CASES[::7] + [(6, 2048, 96, 8, "fp4")], (20, 24), (False, True))
        for (M, N, K, E, fmt), cores, mx in moe:
            lines.append(f"M {caps.soc} {M} {N} {K} {E} {FMT_ID[fmt]} {cores} {int(mx)}")
            t = tl.moe_gemm_tiling(caps, M, N, K, E, fmt, cores, allow_mx=mx)
            u = t.usage()
            ws = tl.mx_workspace(M, K, t.n_tile, cores, fmt) if t.native_mx else tl.MxWorkspace(0, 0, 0, 0, 0)
            expect.append(["M", 1, int(t.native_mx), t.m_tile, t.n_tile, t.k_tile, t.k_step, t.n_ntile, t.max_units,
                           t.workspace_bytes, t.tiling_key, *(u[m] for m in tl.MEMS), ws.xq, ws.xs, ws.slab,
                           ws.slab_per_core])
    lines.append("S ascend910b 1 64 520 640 24 0")  # invalid: both sides must refuse
    r = subprocess.run([str(rules_binary)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    got = [ln.split() for ln in r.stdout.splitlines()]
    assert len(got) == len(lines)
    assert got[-1][:2] == ["S", "0"]
    mismatches = [(q, g, [str(x) for x in e]) for q, g, e in zip(lines, got, expect) if g != [str(x) for x in e]]
    assert not mismatches, f"{len(mismatches)} cases differ, first: {mismatches[0]}"
    assert len(expect) > 300
