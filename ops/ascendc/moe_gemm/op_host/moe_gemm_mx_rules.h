// Host tiling rules of the MoeGemm native MX path (Ascend 950, tiling keys 11 / 12): a line-by-line port of
// ops/npu/tiling.py `mx_applicable`, `moe_gemm_mx_buffers`, `mx_workspace`, `moe_gemm_mx_tiling`.
//
// Plain C++17 on top of ../../common/tiling_rules.h (no CANN header): moe_gemm_tiling.cpp calls it, and
// tests/unit/npu/test_tiling.py compiles it with the host g++ (tiling_rules_check.cpp) and compares every field
// with the Python rules. Change both files together. The MX contract these buffers follow is described in
// tiling.py and op_kernel/moe_gemm_mx_kernel.h. Evidence: compiled with the host g++ and compared on CPU only.
#ifndef ASCEND_V4_MOE_GEMM_MX_RULES_H
#define ASCEND_V4_MOE_GEMM_MX_RULES_H

#include <cstdint>

#include "tiling_rules.h"

namespace ascend_v4 {
namespace tiling {

constexpr int64_t MX_BLOCK = 32;                // K elements per e8m0 scale
constexpr int64_t MX_K_ALIGN = 2 * MX_BLOCK;    // scale K dim is [.., K/64, 2]: an even number of MX blocks
constexpr int64_t MX_K_TILES[] = {512, 256, 128, 64};
constexpr int64_t MX_ACT_ROWS = 16;             // pre-pass step on one vector core
constexpr int64_t MX_ACT_COLS = 512;
constexpr int64_t MX_WIDEN_BYTES = 4096;        // FP4 prologue step (packed bytes) on one vector core
constexpr int64_t MX_FP8 = 1;                   // bytes per e4m3 element
constexpr int64_t MX_GM_ALIGN = 512;            // workspace regions start on 512-byte boundaries
constexpr int64_t MX_FP8_WEIGHT_BLOCK = 128;    // FP8 checkpoint scales: one per 128x128 block

inline bool MxApplicable(const SocCaps &caps, WeightFmt fmt, int64_t K)
{
    return caps.nativeMx && (fmt == WeightFmt::FP8 || fmt == WeightFmt::FP4) && K % MX_K_ALIGN == 0;
}

inline Usage MoeGemmMxUsage(int64_t m, int64_t n, int64_t k, int64_t step, WeightFmt fmt, int64_t K)
{
    const int64_t kl1 = k * step;
    auto sc = [](int64_t rows, int64_t cols) { return rows * CeilDiv(cols, MX_BLOCK); };
    auto a = [](int64_t v) { return Align(v, UB_ALIGN); };
    const int64_t r = MX_ACT_ROWS, c = MX_ACT_COLS;
    Usage u;
    u.l1 = DOUBLE * m * kl1 * MX_FP8 + DOUBLE * sc(m, kl1) + DOUBLE * n * kl1 * MX_FP8 + DOUBLE * sc(n, kl1);
    u.l0a = DOUBLE * (m * k * MX_FP8 + sc(m, k));
    u.l0b = DOUBLE * (k * n * MX_FP8 + sc(n, k));
    u.l0c = DOUBLE * m * n * FP32;
    u.ub = DOUBLE * a(r * c * BF16) + a(r * c * FP32) + a(r * c * FP32) + a(r * c / MX_BLOCK * FP32) +
           a(r * c / MX_BLOCK * UB_ALIGN) + DOUBLE * a(r * c * MX_FP8) + DOUBLE * r * a(c / MX_BLOCK);
    if (fmt == WeightFmt::FP4) {
        const int64_t w = MX_WIDEN_BYTES;
        u.ub += DOUBLE * a(w) + a(w * 2) + a(w * INT32) + DOUBLE * a(w * 2) + a(256 * 2);
    } else {
        u.ub += a(CeilDiv(K, MX_FP8_WEIGHT_BLOCK)) + DOUBLE * a(K / MX_BLOCK);
    }
    return u;
}

struct MxWorkspace {
    int64_t xq = 0;           // e4m3 activations [Align(M, 16), K]
    int64_t xs = 0;           // e8m0 activation scales [Align(M, 16), K/32]
    int64_t slab = 0;         // per-core ping-pong slabs (FP4: e4m3 weights [nTile, K]; FP8: scales [nTile, K/32])
    int64_t slabPerCore = 0;
    int64_t total = 0;
};

inline MxWorkspace ComputeMxWorkspace(int64_t M, int64_t K, int64_t n, int64_t coreNum, WeightFmt fmt)
{
    const int64_t rows = Align(M, CUBE);
    const int64_t xqBytes = Align(rows * K * MX_FP8, MX_GM_ALIGN);
    const int64_t xsBytes = Align(rows * (K / MX_BLOCK), MX_GM_ALIGN);
    const int64_t slabRow = fmt == WeightFmt::FP4 ? K * MX_FP8 : K / MX_BLOCK;
    MxWorkspace w;
    w.xq = 0;
    w.xs = xqBytes;
    w.slab = xqBytes + xsBytes;
    w.slabPerCore = Align(DOUBLE * n * slabRow, MX_GM_ALIGN);
    w.total = xqBytes + xsBytes + coreNum * w.slabPerCore;
    return w;
}

struct MoeGemmMxTiling {
    MoeGemmTiling t;  // same fields as the dequant path; t.nativeMx = true, t.tilingKey = fmt + MOE_KEY_MX
    MxWorkspace ws;
};

inline MoeGemmMxTiling ComputeMoeGemmMxTiling(const SocCaps &caps, int64_t M, int64_t N, int64_t K, int64_t E,
                                              WeightFmt fmt, int64_t coreNum)
{
    MoeGemmMxTiling r;
    if (M <= 0 || N <= 0 || K <= 0 || E <= 0 || coreNum <= 0 || N % CUBE != 0 || K % 32 != 0 ||
        !MxApplicable(caps, fmt, K)) {
        return r;
    }
    const int64_t groups = std::min(E, M);
    const int64_t rows = CeilDiv(M, groups);
    int64_t m = M_TILES[3];
    for (int64_t c : M_TILES) {
        if (c >= rows) { m = c; break; }
    }
    for (int64_t n : N_TILES) {
        if (n > N) continue;
        for (int64_t k : MX_K_TILES) {
            if (k > K) continue;
            for (int64_t step : K_STEPS) {
                if (k * step > Align(K, k)) continue;
                Usage u = MoeGemmMxUsage(m, n, k, step, fmt, K);
                if (!Fits(caps, u)) continue;
                r.t.ok = true;
                r.t.nativeMx = true;
                r.t.mTile = m;
                r.t.nTile = n;
                r.t.kTile = k;
                r.t.kStep = step;
                r.t.usage = u;
                r.t.nNTile = CeilDiv(N, n);
                r.t.maxUnits = (CeilDiv(M, m) + groups) * r.t.nNTile;
                r.ws = ComputeMxWorkspace(M, K, n, coreNum, fmt);
                r.t.workspaceBytes = r.ws.total;
                r.t.tilingKey = static_cast<int64_t>(fmt) + MOE_KEY_MX;
                return r;
            }
        }
    }
    return r;
}

// What tiling.py `moe_gemm_tiling(..., allow_mx)` does: the MX path where it applies, else the dequant path.
inline MoeGemmMxTiling ComputeMoeGemmTilingFor(const SocCaps &caps, int64_t M, int64_t N, int64_t K, int64_t E,
                                               WeightFmt fmt, int64_t coreNum, bool allowMx)
{
    if (allowMx && MxApplicable(caps, fmt, K)) {
        return ComputeMoeGemmMxTiling(caps, M, N, K, E, fmt, coreNum);
    }
    MoeGemmMxTiling r;
    r.t = ComputeMoeGemmTiling(caps, M, N, K, E, fmt, coreNum);
    return r;
}

}  // namespace tiling
}  // namespace ascend_v4

#endif  // ASCEND_V4_MOE_GEMM_MX_RULES_H
