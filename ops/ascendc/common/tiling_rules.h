// Host tiling rules of the ascend-v4 Ascend C ops: a line-by-line port of ops/npu/tiling.py.
//
// Plain C++17, no CANN header: the op_host tiling functions (sparse_attn_tiling.cpp, moe_gemm_tiling.cpp)
// fill `SocCaps` from PlatformAscendC and copy the result into their TILING_DATA structs, and
// tests/unit/npu/test_tiling.py compiles this header with the host g++ (tiling_rules_check.cpp) and compares
// every field with the Python rules on the Flash/Pro shape grid. Change both files together: same candidate
// lists, same loop order, same buffer formulas. Capacities and their sources are documented in tiling.py.
#ifndef ASCEND_V4_TILING_RULES_H
#define ASCEND_V4_TILING_RULES_H

#include <algorithm>
#include <cstdint>

namespace ascend_v4 {
namespace tiling {

constexpr int64_t KIB = 1024;
constexpr int64_t DOUBLE = 2;
constexpr int64_t CUBE = 16;
constexpr int64_t UB_ALIGN = 32;
constexpr int64_t UB_RESERVED = 1 * KIB;
constexpr int64_t BF16 = 2;
constexpr int64_t FP32 = 4;
constexpr int64_t INT32 = 4;

struct SocCaps {
    int64_t ub;
    int64_t l1;
    int64_t l0a;
    int64_t l0b;
    int64_t l0c;
    bool nativeMx;
};

// Values of tiling.py SOCS (the op_host code overrides them with what the platform reports).
constexpr SocCaps SOC_910B{192 * KIB, 512 * KIB, 64 * KIB, 64 * KIB, 128 * KIB, false};
constexpr SocCaps SOC_910_93{192 * KIB, 512 * KIB, 64 * KIB, 64 * KIB, 128 * KIB, false};
constexpr SocCaps SOC_950{248 * KIB, 512 * KIB, 64 * KIB, 64 * KIB, 256 * KIB, true};

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t Align(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

struct Usage {
    int64_t ub = 0, l1 = 0, l0a = 0, l0b = 0, l0c = 0;
};

inline bool Fits(const SocCaps &c, const Usage &u)
{
    return u.ub <= c.ub - UB_RESERVED && u.l1 <= c.l1 && u.l0a <= c.l0a && u.l0b <= c.l0b && u.l0c <= c.l0c;
}

// ============================================================================================ sparse_attn
constexpr int64_t HEAD_TILES[] = {128, 64, 32, 16};
constexpr int64_t KV_BLOCKS[] = {512, 256, 128, 64, 32, 16};
constexpr int64_t D_CHUNKS[] = {512, 256, 128, 64};
constexpr int64_t FP8_SCALE_BLOCK = 64;
constexpr int64_t DQ_ROWS = 16;
constexpr int64_t SPARSE_KEY_BF16 = 0;
constexpr int64_t SPARSE_KEY_FP8_KV = 1;
constexpr int64_t SPARSE_KEY_SPLIT = 10;

// GM workspace layout (tiling.py sparse_attn_workspace, same table): per core [kv | s | p | o], each region on a
// SPARSE_WS_ALIGN boundary; after every core's area the split partials O [units][hTile][D] fp32 and (m, l)
// [units][2][hTile] fp32. The op_host tiling copies the offsets into the tiling data and the kernel uses only
// those, so host and kernel cannot disagree on it.
constexpr int64_t SPARSE_WS_ALIGN = 512;

struct SparseAttnWorkspace {
    int64_t kv = 0, s = 0, p = 0, o = 0;  // offsets inside one core's area (bytes)
    int64_t perCore = 0;
    int64_t partO = 0, partStats = 0;     // offsets from the workspace start (bytes)
    int64_t total = 0;
};

inline SparseAttnWorkspace ComputeSparseAttnWorkspace(int64_t h, int64_t kb, int64_t D, int64_t usedCores,
                                                      int64_t units, int64_t kvSplits)
{
    SparseAttnWorkspace w;
    const int64_t kvBytes = DOUBLE * kb * D * BF16;  // [2][kb][D] 16-bit kv tile (gathered / decoded)
    const int64_t sBytes = DOUBLE * h * kb * FP32;   // [2][h][kb] fp32 S
    const int64_t pBytes = DOUBLE * h * kb * BF16;   // [2][h][kb] 16-bit P
    const int64_t oBytes = DOUBLE * h * D * FP32;    // [2][h][D] fp32 O block
    const int64_t partOBytes = kvSplits > 1 ? units * h * D * FP32 : 0;
    const int64_t partStatBytes = kvSplits > 1 ? units * 2 * h * FP32 : 0;
    w.kv = 0;
    w.s = w.kv + Align(kvBytes, SPARSE_WS_ALIGN);
    w.p = w.s + Align(sBytes, SPARSE_WS_ALIGN);
    w.o = w.p + Align(pBytes, SPARSE_WS_ALIGN);
    w.perCore = w.o + Align(oBytes, SPARSE_WS_ALIGN);
    w.partO = usedCores * w.perCore;
    w.partStats = w.partO + Align(partOBytes, SPARSE_WS_ALIGN);
    w.total = w.partStats + Align(partStatBytes, SPARSE_WS_ALIGN);
    return w;
}

struct SparseAttnTiling {
    bool ok = false;
    int64_t hTile = 0, kvBlock = 0, dQk = 0, dPv = 0;
    int64_t nHBlk = 0, nKvBlk = 0, kvSplits = 0, blocksPerSplit = 0;
    int64_t units = 0, usedCores = 0, workspaceBytes = 0, tilingKey = 0;
    Usage usage;
    SparseAttnWorkspace ws;
};

inline Usage SparseAttnUsage(int64_t h, int64_t kb, int64_t dq, int64_t dp, int64_t D, bool kvFp8)
{
    const int64_t r = h / 2;  // head rows per vector core
    Usage u;
    u.l1 = h * D * BF16 + DOUBLE * kb * D * BF16 + DOUBLE * h * kb * BF16;
    u.l0a = DOUBLE * std::max(h * dq, h * kb) * BF16;
    u.l0b = DOUBLE * std::max(dq * kb, kb * dp) * BF16;
    u.l0c = DOUBLE * std::max(h * kb, h * dp) * FP32;
    // UB: the kernel's InitBuffer list (tiling.py sparse_attn_buffers, same order)
    u.ub = DOUBLE * Align(r * kb * FP32, UB_ALIGN) + DOUBLE * Align(r * kb * BF16, UB_ALIGN) +
           DOUBLE * Align(kb * INT32, UB_ALIGN) + DOUBLE * Align(r * dp * FP32, UB_ALIGN) +
           Align(r * D * FP32, UB_ALIGN) + 4 * Align(r * FP32, UB_ALIGN) + DOUBLE * Align(D * BF16, UB_ALIGN);
    if (kvFp8) {  // dq_in, dq_f32, dq_out
        u.ub += DOUBLE * Align(DQ_ROWS * D, UB_ALIGN) + Align(D * FP32, UB_ALIGN) +
                DOUBLE * Align(DQ_ROWS * D * BF16, UB_ALIGN);
    } else {  // row_copy
        u.ub += DOUBLE * Align(D * BF16, UB_ALIGN);
    }
    return u;
}

inline SparseAttnTiling ComputeSparseAttnTiling(const SocCaps &caps, int64_t T, int64_t H, int64_t D, int64_t K,
                                                int64_t coreNum, bool kvFp8)
{
    SparseAttnTiling t;
    if (T <= 0 || H <= 0 || D <= 0 || K <= 0 || coreNum <= 0 || D % D_CHUNKS[3] != 0) {
        return t;
    }
    if (kvFp8 && (!caps.nativeMx || D % FP8_SCALE_BLOCK != 0)) {
        return t;
    }
    const int64_t hMax = Align(H, CUBE);
    const int64_t kMax = std::max(CUBE, Align(K, CUBE));
    for (int64_t h : HEAD_TILES) {
        if (h > hMax) continue;
        for (int64_t kb : KV_BLOCKS) {
            if (kb > kMax) continue;
            for (int64_t dq : D_CHUNKS) {
                if (dq > D || D % dq != 0) continue;
                for (int64_t dp : D_CHUNKS) {
                    if (dp > D || D % dp != 0) continue;
                    Usage u = SparseAttnUsage(h, kb, dq, dp, D, kvFp8);
                    if (!Fits(caps, u)) continue;
                    t.ok = true;
                    t.hTile = h;
                    t.kvBlock = kb;
                    t.dQk = dq;
                    t.dPv = dp;
                    t.usage = u;
                    t.nHBlk = CeilDiv(H, h);
                    t.nKvBlk = CeilDiv(K, kb);
                    const int64_t base = T * t.nHBlk;
                    int64_t splits = 1;
                    if (base < coreNum) {  // decode: split the index list across cores
                        splits = std::min(t.nKvBlk, CeilDiv(coreNum, base));
                    }
                    t.blocksPerSplit = CeilDiv(t.nKvBlk, splits);
                    t.kvSplits = CeilDiv(t.nKvBlk, t.blocksPerSplit);
                    t.units = base * t.kvSplits;
                    t.usedCores = std::min(coreNum, t.units);
                    t.ws = ComputeSparseAttnWorkspace(h, kb, D, t.usedCores, t.units, t.kvSplits);
                    t.workspaceBytes = t.ws.total;
                    t.tilingKey = (kvFp8 ? SPARSE_KEY_FP8_KV : SPARSE_KEY_BF16) + (t.kvSplits > 1 ? SPARSE_KEY_SPLIT : 0);
                    return t;
                }
            }
        }
    }
    return t;
}

// ============================================================================================ moe_gemm
enum class WeightFmt : int64_t { BF16 = 0, FP8 = 1, FP4 = 2 };  // also the tiling-key base

constexpr int64_t M_TILES[] = {16, 32, 64, 128};
constexpr int64_t N_TILES[] = {256, 128, 64, 32, 16};
constexpr int64_t K_TILES[] = {512, 256, 128, 64, 32};
constexpr int64_t K_STEPS[] = {4, 2, 1};
constexpr int64_t MOE_KEY_MX = 10;  // tiling key offset of the 950 MX variant (moe_gemm_mx_rules.h)

inline int64_t WeightBits(WeightFmt f) { return f == WeightFmt::FP8 ? 8 : (f == WeightFmt::FP4 ? 4 : 16); }
inline int64_t ScaleBlockN(WeightFmt f) { return f == WeightFmt::FP8 ? 128 : 1; }
inline int64_t ScaleBlockK(WeightFmt f) { return f == WeightFmt::FP8 ? 128 : (f == WeightFmt::FP4 ? 32 : 1); }

struct MoeGemmTiling {
    bool ok = false;
    bool nativeMx = false;
    int64_t mTile = 0, nTile = 0, kTile = 0, kStep = 0, nNTile = 0, maxUnits = 0;
    int64_t workspaceBytes = 0, tilingKey = 0;
    Usage usage;
};

// Dequant path (vector-unit decode to BF16, then the cube); the 950 MX path has its own rules.
inline Usage MoeGemmUsage(int64_t m, int64_t n, int64_t k, int64_t step, WeightFmt fmt)
{
    const int64_t bits = WeightBits(fmt);
    const int64_t kl1 = k * step;
    Usage u;
    const int64_t half = std::max<int64_t>(1, n / 2);
    u.l1 = DOUBLE * m * kl1 * BF16 + DOUBLE * n * kl1 * BF16;
    u.l0a = DOUBLE * m * k * BF16;
    u.l0b = DOUBLE * k * n * BF16;
    u.l0c = DOUBLE * m * n * FP32;
    if (fmt != WeightFmt::BF16) {
        const int64_t scaleCols = CeilDiv(k, ScaleBlockK(fmt));
        const int64_t scaleRows = CeilDiv(half, ScaleBlockN(fmt));
        u.ub = DOUBLE * Align(half * k * bits / 8, UB_ALIGN) + DOUBLE * Align(scaleRows * scaleCols, UB_ALIGN) +
               Align(half * k * FP32, UB_ALIGN) + DOUBLE * Align(half * k * BF16, UB_ALIGN) +
               Align(k * BF16, UB_ALIGN) + Align(k * INT32, UB_ALIGN) + Align(256 * FP32, UB_ALIGN);  // table decode
    }
    return u;
}

inline bool AlignedToBlock(int64_t tile, int64_t block) { return tile % block == 0 || block % tile == 0; }

inline MoeGemmTiling ComputeMoeGemmTiling(const SocCaps &caps, int64_t M, int64_t N, int64_t K, int64_t E,
                                          WeightFmt fmt, int64_t coreNum)
{
    MoeGemmTiling t;
    if (M <= 0 || N <= 0 || K <= 0 || E <= 0 || coreNum <= 0 || N % CUBE != 0 || K % 32 != 0) {
        return t;
    }
    const int64_t bits = WeightBits(fmt);
    const int64_t groups = std::min(E, M);
    const int64_t rows = CeilDiv(M, groups);
    int64_t m = M_TILES[3];
    for (int64_t c : M_TILES) {
        if (c >= rows) { m = c; break; }
    }
    for (int64_t n : N_TILES) {
        if (n > N || !AlignedToBlock(n, ScaleBlockN(fmt))) continue;
        for (int64_t k : K_TILES) {
            if (k > K || !AlignedToBlock(k, ScaleBlockK(fmt)) || (k * bits / 8) % UB_ALIGN != 0) continue;
            for (int64_t step : K_STEPS) {
                if (k * step > Align(K, k)) continue;
                Usage u = MoeGemmUsage(m, n, k, step, fmt);
                if (!Fits(caps, u)) continue;
                t.ok = true;
                t.mTile = m;
                t.nTile = n;
                t.kTile = k;
                t.kStep = step;
                t.usage = u;
                t.nNTile = CeilDiv(N, n);
                t.maxUnits = (CeilDiv(M, m) + groups) * t.nNTile;
                if (fmt != WeightFmt::BF16) {
                    t.workspaceBytes = coreNum * DOUBLE * n * K * BF16;  // [nTile, K] bf16 slabs
                } else {
                    t.workspaceBytes = 0;
                }
                t.tilingKey = static_cast<int64_t>(fmt);
                return t;
            }
        }
    }
    return t;
}

}  // namespace tiling
}  // namespace ascend_v4

#endif  // ASCEND_V4_TILING_RULES_H
