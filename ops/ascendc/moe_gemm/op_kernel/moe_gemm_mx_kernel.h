// MoeGemm, native MX path (Ascend 950 only; tiling keys 11 = FP8 weights, 12 = FP4 weights):
// y[M, N] = x[M, K] . W_g[N, K]^T for the rows of each group g, the cube multiplying MXFP8 operands.
// Golden: ops/reference/mx.py (mx_grouped_gemm); CPU replay of this schedule: tests/unit/npu/test_moe_gemm_mx.py.
//
// The MX contract relied on (cann/asc-devkit documentation, read for facts only):
//  * Matmul API "MxMatmul" scenario (docs/guide/.../矩阵编程（高阶API）/特性场景/MxMatmul场景.md):
//    C = (scaleA (x) A) * (scaleB (x) B), every 32 consecutive K elements of a row of A (a column of B) share
//    one fp8_e8m0_t scale; A / B element types fp8_e4m3fn_t or fp8_e5m2_t with each other, or fp4x2_e2m1_t /
//    fp4x2_e1m2_t with each other (no fp8 x fp4 pair); C float / half / bfloat16_t; operands declared with
//    MatmulTypeWithScale, the Matmul object with MatmulWithScalePolicy, tensors set with SetTensorA/B and
//    SetTensorScaleA/B; in GM (ND) scaleA is [M, K/64, 2] (not transposed) and the scale of a transposed
//    B [N, K] is [N, K/64, 2], i.e. row-major [rows, K/32] with K/32 even; host tiling SetMadType(MXMODE).
//  * C API asc_mmad_mx (docs/api/context/c_api/cube_compute/asc_mmad_mx.md): the same type pairs on dav-3510.
//  * Scale rule: aclnnDynamicMxQuant scaleAlg=1 (hicann/ops-nn quant/dynamic_mx_quant/docs): the scale
//    exponent of amax / 448 rounded up, so no element saturates. It is also the project's QAT rule
//    (model-spec.md §8.5) at 1x32 instead of 1x128.
//
// Hence, per call:
//  1. pre-pass, all vector cores: x -> e4m3 [M, K] + e8m0 [M, K/32] in the workspace (MX_ACT_ROWS x MX_ACT_COLS
//     tiles); SyncAll.
//  2. units, built on every core from group_list (= tiling.py moe_gemm_schedule; core c takes u = c, c + coreNum,
//     ...): the two vector cores of the block each prepare half of the unit's n tile in the core's ping-pong slab
//     -- FP4: packed codes widened to e4m3 bytes (lossless; every e2m1 value is an e4m3 value), the stored 1x32
//     scales are used as they are; FP8: the e4m3 bytes are used in place, the 128x128 block scales are
//     expanded to 1x32 rows in the slab -- then a cross-AIV barrier, and sub-block 0 issues the MX matmul of
//     the [rows, n] tile (fp32 accumulation in L0C, bf16/fp16 out). The slab pair is ping-pong: the barrier of
//     unit j+1 is passed only after sub-block 0 finished unit j's (synchronous) IterateAll, so unit j+2 may
//     overwrite unit j's half.
// Evidence: written only -- never compiled (no CANN here) or run; API names and parameter orders follow the
// documentation as read and are unverified. Selected only when ASCEND_V4_NPU_MX_GEMM=1 (docs/npu.md).
#ifndef ASCEND_V4_MOE_GEMM_MX_KERNEL_H
#define ASCEND_V4_MOE_GEMM_MX_KERNEL_H

#include "kernel_operator.h"
#include "lib/matmul_intf.h"
#include "moe_gemm_kernel.h"  // FMT_* constants

namespace ascend_v4 {

using namespace AscendC;

// Must equal ops/npu/tiling.py (MX_BLOCK, MX_ACT_ROWS, MX_ACT_COLS, MX_WIDEN_BYTES); a CPU test compares them.
constexpr uint32_t MX_BLOCK = 32;
constexpr uint32_t MX_ACT_ROWS = 16;
constexpr uint32_t MX_ACT_COLS = 512;
constexpr uint32_t MX_WIDEN_BYTES = 4096;
constexpr uint32_t MX_FP8_WEIGHT_BLOCK = 128;
constexpr uint32_t MX_UB_BLOCK = 32;            // bytes per UB block
constexpr uint32_t MX_MAX_REPEAT = 128;         // repeats per vector instruction (limit 255; 128 keeps offsets even)
constexpr int32_t MX_READY_FLAG = 6;            // cross-AIV barrier: both halves of the unit's slab are in GM
// (outside the Matmul API's flag IDs [0, 1] for one object -- asc-devkit docs/zh/api/SIMD-API/高阶API/矩阵计算/
// Matmul-Kernel侧接口/REGIST_MATMUL_OBJ.md -- and KFC_SYNC_ID 15, impl/basic_api/dav_3510/kfc/kfc_comm.h)
constexpr float MX_AMAX_FLOOR = 1e-4f;          // as the 1x128 activation quantisation (model-spec §8.5)
// e2m1 code -> e4m3fn byte of the same value (0, .5, 1, 1.5, 2, 3, 4, 6, then the negatives); equals
// ops/reference/mx.py FP4_TO_E4M3_BYTES (checked by tests/unit/npu/test_moe_gemm_mx.py).
constexpr uint8_t E2M1_TO_E4M3[16] = {0x00, 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48, 0x4C,
                                      0x80, 0xB0, 0xB8, 0xBC, 0xC0, 0xC4, 0xC8, 0xCC};

__aicore__ inline uint32_t MxMin(uint64_t a, uint64_t b) { return static_cast<uint32_t>(a < b ? a : b); }
__aicore__ inline uint32_t MxAlign(uint32_t a, uint32_t b) { return (a + b - 1) / b * b; }

// Smallest e with 2^e >= a / 448, from the fp32 bits (exact; a >= the floor, so normal): a = 1.m * 2^E and
// 448 = 1.75 * 2^8, so e = E - 8, plus one when 1.m > 1.75 (mantissa bits above 0x600000).
__aicore__ inline int32_t MxExponent(float a)
{
    const uint32_t bits = *reinterpret_cast<uint32_t *>(&a);
    const int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 127;
    return e - 8 + ((bits & 0x7FFFFFu) > 0x600000u ? 1 : 0);
}

__aicore__ inline float MxPow2(int32_t e)  // 2^e as an fp32 bit pattern, e in [-126, 127]
{
    uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
    return *reinterpret_cast<float *>(&bits);
}

template <typename T, int32_t FMT>
class MoeGemmMxKernel {
public:
    using AType = AscendC::MatmulTypeWithScale<TPosition::GM, TPosition::GM, CubeFormat::ND, fp8_e4m3fn_t, false>;
    using BType = AscendC::MatmulTypeWithScale<TPosition::GM, TPosition::GM, CubeFormat::ND, fp8_e4m3fn_t, true>;
    using CType = AscendC::MatmulType<TPosition::GM, CubeFormat::ND, T>;
    using BiasType = AscendC::MatmulType<TPosition::GM, CubeFormat::ND, float>;  // unused (no bias)
    AscendC::Matmul<AType, BType, CType, BiasType, CFG_MDL, AscendC::MatmulCallBackFunc<nullptr, nullptr, nullptr>,
                    AscendC::Impl::Detail::MatmulWithScalePolicy>
        mm;

    // `pipe`: the entry's TPipe, on which REGIST_MATMUL_OBJ(pipe, ..., mm, ...) already ran (moe_gemm.cpp): the
    // macro's KfcCommClient must live in the entry's scope until Process() is done, and on the AIC the macro
    // runs the cube server and returns from the entry (asc-devkit impl/adv_api/detail/kfc/kfc_register_obj.h).
    __aicore__ inline void Init(GM_ADDR x, GM_ADDR weight, GM_ADDR scale, GM_ADDR groupList, GM_ADDR y, GM_ADDR ws,
                                const MoeGemmTilingData *td, TPipe *pipe)
    {
        td_ = td;
        pipe_ = pipe;
        const uint64_t M = td->M, N = td->N, K = td->K;
        const uint64_t rows = (M + 15) / 16 * 16;
        xGm_.SetGlobalBuffer((__gm__ T *)x, M * K);
        yGm_.SetGlobalBuffer((__gm__ T *)y, M * N);
        groupGm_.SetGlobalBuffer((__gm__ int64_t *)groupList, td->E);
        weightList_ = weight;  // dynamic inputs: ListTensorDesc in GM (one pointer + shape per group)
        scaleList_ = scale;
        xqGm_.SetGlobalBuffer((__gm__ fp8_e4m3fn_t *)(ws + td->wsXq), rows * K);
        xsGm_.SetGlobalBuffer((__gm__ fp8_e8m0_t *)(ws + td->wsXs), rows * (K / MX_BLOCK));
        xsOut_.SetGlobalBuffer((__gm__ uint8_t *)(ws + td->wsXs), rows * (K / MX_BLOCK));
        core_ = GetBlockIdx() / GetTaskRation();
        slab_ = ws + td->wsSlab + static_cast<uint64_t>(core_) * td->slabPerCore;
        slabRow_ = FMT == FMT_FP4 ? K : K / MX_BLOCK;  // bytes per slab row
        if ASCEND_IS_AIV {  // UB buffers and the scalar-filled table: vector cores only (impl/utils/sys_macros.h)
            InitBuffers();
        }
    }

    __aicore__ inline void Process()
    {
        if ASCEND_IS_AIC {
            return;  // the cube is driven by the Matmul object
        }
        QuantizeActivations();
        SyncAll();  // every vector core's rows of xq / xs are in GM before any unit's matmul reads them
        uint32_t u = 0;
        uint32_t local = 0;
        uint64_t rowStart = 0;
        for (uint32_t g = 0; g < td_->E; ++g) {
            const uint64_t count = static_cast<uint64_t>(groupGm_.GetValue(g));
            for (uint64_t r0 = 0; r0 < count; r0 += td_->mTile) {
                const uint32_t rows = MxMin(count - r0, td_->mTile);
                for (uint32_t ni = 0; ni < td_->nNTile; ++ni, ++u) {
                    if (u % td_->coreNum != core_) {
                        continue;
                    }
                    RunUnit(g, rowStart + r0, rows, ni, local++ & 1);
                }
            }
            rowStart += count;
        }
        mm.End();
    }

private:
    __aicore__ inline void InitBuffers()
    {
        const uint32_t cnt = MX_ACT_ROWS * MX_ACT_COLS;
        pipe_->InitBuffer(xIn_, 2, cnt * sizeof(T));
        pipe_->InitBuffer(xF32_, cnt * sizeof(float));
        pipe_->InitBuffer(xAbs_, cnt * sizeof(float));
        pipe_->InitBuffer(xAmax_, MxAlign(cnt / MX_BLOCK * sizeof(float), MX_UB_BLOCK));
        pipe_->InitBuffer(xInv_, cnt / MX_BLOCK * MX_UB_BLOCK);
        pipe_->InitBuffer(xOut_, 2, cnt);
        pipe_->InitBuffer(xScale_, 2, MX_ACT_ROWS * MxAlign(MX_ACT_COLS / MX_BLOCK, MX_UB_BLOCK));
        if constexpr (FMT == FMT_FP4) {
            pipe_->InitBuffer(wIn_, 2, MX_WIDEN_BYTES);
            pipe_->InitBuffer(wF16_, MX_WIDEN_BYTES * sizeof(half));
            pipe_->InitBuffer(wIdx_, MX_WIDEN_BYTES * sizeof(int32_t));
            pipe_->InitBuffer(wOut_, 2, MX_WIDEN_BYTES * 2);
            pipe_->InitBuffer(table_, 256 * sizeof(uint16_t));
            // byte b (element 2j in the low nibble, 2j+1 in the high one) -> the e4m3 pair as one little-endian
            // uint16: low byte = element 2j, so the widened row keeps the element order
            LocalTensor<uint16_t> t = table_.Get<uint16_t>();
            for (uint32_t b = 0; b < 256; ++b) {
                t.SetValue(b, static_cast<uint16_t>(E2M1_TO_E4M3[b & 0xF] | (E2M1_TO_E4M3[b >> 4] << 8)));
            }
            PipeBarrier<PIPE_ALL>();  // scalar table writes done before any vector Gather reads them
        } else {
            const uint32_t kIn = (td_->K + MX_FP8_WEIGHT_BLOCK - 1) / MX_FP8_WEIGHT_BLOCK;
            pipe_->InitBuffer(sIn_, MxAlign(kIn, MX_UB_BLOCK));
            pipe_->InitBuffer(sOut_, 2 * MxAlign(td_->K / MX_BLOCK, MX_UB_BLOCK));
        }
    }

    // ------------------------------------------------------------------------------------ 1. activations
    __aicore__ inline void QuantizeActivations()
    {
        const uint32_t aiv = GetBlockIdx();
        const uint32_t aivNum = GetBlockNum() * GetTaskRation();
        for (uint64_t row0 = static_cast<uint64_t>(aiv) * MX_ACT_ROWS; row0 < td_->M;
             row0 += static_cast<uint64_t>(aivNum) * MX_ACT_ROWS) {
            const uint32_t r = MxMin(td_->M - row0, MX_ACT_ROWS);
            for (uint32_t c0 = 0; c0 < td_->K; c0 += MX_ACT_COLS) {
                QuantizeTile(row0, r, c0, MxMin(td_->K - c0, MX_ACT_COLS));  // c: a multiple of 64 (K % 64)
            }
        }
    }

    // x[row0 : row0 + r, c0 : c0 + c] -> e4m3 + e8m0 (ops/reference/mx.py quant_mxfp8)
    __aicore__ inline void QuantizeTile(uint64_t row0, uint32_t r, uint32_t c0, uint32_t c)
    {
        const uint64_t K = td_->K;
        const uint32_t cnt = r * c;
        const uint32_t blocks = cnt / MX_BLOCK;
        const uint32_t bpr = c / MX_BLOCK;  // MX blocks per row of the tile
        const uint32_t pitch = MxAlign(bpr, MX_UB_BLOCK);  // scale rows padded to 32 B for DataCopyPad
        LocalTensor<T> in = xIn_.AllocTensor<T>();
        DataCopy(in, xGm_[row0 * K + c0],
                 DataCopyParams(r, c * sizeof(T) / MX_UB_BLOCK, (K - c) * sizeof(T) / MX_UB_BLOCK, 0));
        xIn_.EnQue(in);
        in = xIn_.DeQue<T>();
        LocalTensor<float> xf = xF32_.Get<float>();
        LocalTensor<float> xa = xAbs_.Get<float>();
        LocalTensor<float> amax = xAmax_.Get<float>();
        LocalTensor<float> inv = xInv_.Get<float>();
        Cast(xf, in, RoundMode::CAST_NONE, cnt);
        xIn_.FreeTensor(in);
        Abs(xa, xf, cnt);
        // one repeat per MX block: 32 fp32 (mask 32), the next block 4 x 32 B further
        for (uint32_t b0 = 0; b0 < blocks; b0 += MX_MAX_REPEAT) {
            const uint32_t n = MxMin(blocks - b0, MX_MAX_REPEAT);
            WholeReduceMax(amax[b0], xa[b0 * MX_BLOCK], MX_BLOCK, n, 1, 1, MX_BLOCK * sizeof(float) / MX_UB_BLOCK,
                           ReduceOrder::ORDER_ONLY_VALUE);
        }
        event_t vs = static_cast<event_t>(pipe_->FetchEventID(HardEvent::V_S));
        SetFlag<HardEvent::V_S>(vs);
        WaitFlag<HardEvent::V_S>(vs);
        // per block (scalar, r * c / 32 <= 256 of them): exponent, e8m0 byte, and 2^-e in place of amax
        LocalTensor<uint8_t> sc = xScale_.AllocTensor<uint8_t>();
        for (uint32_t j = 0; j < blocks; ++j) {
            float a = amax.GetValue(j);
            a = a > MX_AMAX_FLOOR ? a : MX_AMAX_FLOOR;
            const int32_t e = MxExponent(a);  // in [-22, 120] for bf16 / fp16 inputs
            sc.SetValue((j / bpr) * pitch + j % bpr, static_cast<uint8_t>(e + 127));
            amax.SetValue(j, MxPow2(-e));
        }
        event_t sv = static_cast<event_t>(pipe_->FetchEventID(HardEvent::S_V));
        SetFlag<HardEvent::S_V>(sv);
        WaitFlag<HardEvent::S_V>(sv);
        // each 2^-e to a whole 32-byte block, then x * 2^-e block by block (multiplier block stride 0): exact
        Brcb(inv, amax, static_cast<uint8_t>((blocks + 7) / 8), BrcbRepeatParams(1, 8));
        PipeBarrier<PIPE_V>();
        for (uint32_t b0 = 0; b0 < blocks; b0 += MX_MAX_REPEAT) {
            const uint32_t n = MxMin(blocks - b0, MX_MAX_REPEAT);
            Mul(xf[b0 * MX_BLOCK], xf[b0 * MX_BLOCK], inv[b0 * (MX_UB_BLOCK / sizeof(float))], MX_BLOCK, n,
                BinaryRepeatParams(1, 1, 0, MX_BLOCK * sizeof(float) / MX_UB_BLOCK,
                                   MX_BLOCK * sizeof(float) / MX_UB_BLOCK, 1));
        }
        PipeBarrier<PIPE_V>();
        LocalTensor<fp8_e4m3fn_t> q = xOut_.AllocTensor<fp8_e4m3fn_t>();
        Cast(q, xf, RoundMode::CAST_RINT, cnt);  // |v| <= 448 by the scale rule; RINT = the reference's RNE
        xOut_.EnQue(q);
        q = xOut_.DeQue<fp8_e4m3fn_t>();
        DataCopy(xqGm_[row0 * K + c0], q, DataCopyParams(r, c / MX_UB_BLOCK, 0, (K - c) / MX_UB_BLOCK));
        xOut_.FreeTensor(q);
        xScale_.EnQue(sc);
        sc = xScale_.DeQue<uint8_t>();
        event_t sm = static_cast<event_t>(pipe_->FetchEventID(HardEvent::S_MTE3));  // sc was written by scalar
        SetFlag<HardEvent::S_MTE3>(sm);
        WaitFlag<HardEvent::S_MTE3>(sm);
        DataCopyPad(xsOut_[row0 * (K / MX_BLOCK) + c0 / MX_BLOCK], sc,
                    DataCopyExtParams(r, bpr, 0, static_cast<uint32_t>(K / MX_BLOCK - bpr), 0));
        xScale_.FreeTensor(sc);
    }

    // ------------------------------------------------------------------------------------ 2. units
    __aicore__ inline void RunUnit(uint32_t g, uint64_t row0, uint32_t rows, uint32_t ni, uint32_t buf)
    {
        const uint64_t K = td_->K;
        const uint32_t n0 = ni * td_->nTile;
        const uint32_t n = MxMin(td_->N - n0, td_->nTile);
        const uint32_t half = (n + 1) / 2;
        const uint32_t r0 = MxMin(GetSubBlockIdx() * half, n);
        const uint32_t r1 = MxMin(r0 + half, n);
        GM_ADDR slab = slab_ + static_cast<uint64_t>(buf) * td_->nTile * slabRow_;
        if constexpr (FMT == FMT_FP4) {
            WidenFp4(g, n0, r0, r1, slab);
        } else {
            ExpandFp8Scales(g, n0, r0, r1, slab);
        }
        CrossCoreSetFlag<0x1, PIPE_MTE3>(MX_READY_FLAG);  // both AIVs of the block: barrier after their MTE3 writes
        CrossCoreWaitFlag(MX_READY_FLAG);
        if (GetSubBlockIdx() != 0) {
            return;  // one matmul request per unit
        }
        GlobalTensor<fp8_e4m3fn_t> b;
        GlobalTensor<fp8_e8m0_t> sb;
        if constexpr (FMT == FMT_FP4) {
            b.SetGlobalBuffer((__gm__ fp8_e4m3fn_t *)slab, static_cast<uint64_t>(n) * K);
            sb.SetGlobalBuffer((__gm__ fp8_e8m0_t *)ScalePtr(g) + static_cast<uint64_t>(n0) * (K / MX_BLOCK),
                               static_cast<uint64_t>(n) * (K / MX_BLOCK));  // the checkpoint's 1x32 scales
        } else {
            b.SetGlobalBuffer((__gm__ fp8_e4m3fn_t *)WeightPtr(g) + static_cast<uint64_t>(n0) * K,
                              static_cast<uint64_t>(n) * K);  // e4m3 bytes in place
            sb.SetGlobalBuffer((__gm__ fp8_e8m0_t *)slab, static_cast<uint64_t>(n) * (K / MX_BLOCK));
        }
        mm.SetOrgShape(td_->M, td_->N, td_->K);  // row strides: xq K, B K, scales K/32, y N
        mm.SetSingleShape(rows, n, td_->K);
        mm.SetTensorA(xqGm_[row0 * K], false);
        mm.SetTensorScaleA(xsGm_[row0 * (K / MX_BLOCK)], false);
        mm.SetTensorB(b, true);
        mm.SetTensorScaleB(sb, true);
        mm.IterateAll(yGm_[row0 * td_->N + n0]);  // synchronous: returns when the tile is in GM
    }

    // FP4 rows [n0 + r0, n0 + r1) of group g -> e4m3 bytes in slab rows [r0, r1). Those rows are contiguous in
    // GM on both sides, so they are streamed MX_WIDEN_BYTES packed bytes at a time regardless of row ends:
    // byte -> f16 -> int32 -> byte offset (x2) -> Gather from the 256-entry uint16 table.
    __aicore__ inline void WidenFp4(uint32_t g, uint32_t n0, uint32_t r0, uint32_t r1, GM_ADDR slab)
    {
        const uint64_t packedK = td_->K / 2;
        const uint64_t total = static_cast<uint64_t>(r1 - r0) * packedK;  // a multiple of 32 (K % 64 == 0)
        GlobalTensor<uint8_t> w;
        w.SetGlobalBuffer(WeightPtr(g) + static_cast<uint64_t>(n0 + r0) * packedK, total);
        GlobalTensor<uint8_t> out;
        out.SetGlobalBuffer((__gm__ uint8_t *)slab + static_cast<uint64_t>(r0) * td_->K, 2 * total);
        LocalTensor<uint16_t> table = table_.Get<uint16_t>();
        LocalTensor<half> h = wF16_.Get<half>();
        LocalTensor<int32_t> idx = wIdx_.Get<int32_t>();
        for (uint64_t off = 0; off < total; off += MX_WIDEN_BYTES) {
            const uint32_t len = MxMin(total - off, MX_WIDEN_BYTES);
            LocalTensor<uint8_t> in = wIn_.AllocTensor<uint8_t>();
            DataCopy(in, w[off], len);
            wIn_.EnQue(in);
            in = wIn_.DeQue<uint8_t>();
            Cast(h, in, RoundMode::CAST_NONE, len);  // 0..255 exact in f16
            Cast(idx, h, RoundMode::CAST_RINT, len);
            ShiftLeft(idx, idx, static_cast<int32_t>(1), len);  // table byte offset: 2 bytes per entry
            wIn_.FreeTensor(in);
            LocalTensor<uint16_t> o = wOut_.AllocTensor<uint16_t>();
            Gather(o, table, idx.template ReinterpretCast<uint32_t>(), 0, len);
            wOut_.EnQue(o);
            o = wOut_.DeQue<uint16_t>();
            DataCopy(out[2 * off], o.template ReinterpretCast<uint8_t>(), 2 * len);
            wOut_.FreeTensor(o);
        }
    }

    // FP8: slab rows [r0, r1) = the 1x32 scales of weight rows n0 + r: the row's 128x128 block scales, each
    // repeated over its 4 MX blocks. One expanded row per 128-row block (ping-pong), copied to each of its rows.
    __aicore__ inline void ExpandFp8Scales(uint32_t g, uint32_t n0, uint32_t r0, uint32_t r1, GM_ADDR slab)
    {
        const uint32_t kIn = (td_->K + MX_FP8_WEIGHT_BLOCK - 1) / MX_FP8_WEIGHT_BLOCK;
        const uint32_t kOut = td_->K / MX_BLOCK;
        const uint32_t pitch = MxAlign(kOut, MX_UB_BLOCK);
        const uint32_t rep = MX_FP8_WEIGHT_BLOCK / MX_BLOCK;
        GlobalTensor<uint8_t> s;
        const uint64_t kRowsIn = (td_->N + MX_FP8_WEIGHT_BLOCK - 1) / MX_FP8_WEIGHT_BLOCK;
        s.SetGlobalBuffer(ScalePtr(g), kRowsIn * kIn);
        GlobalTensor<uint8_t> out;
        out.SetGlobalBuffer((__gm__ uint8_t *)slab, static_cast<uint64_t>(td_->nTile) * kOut);
        LocalTensor<uint8_t> sIn = sIn_.Get<uint8_t>();
        LocalTensor<uint8_t> sOut = sOut_.Get<uint8_t>();
        uint32_t block = 0xFFFFFFFFu;
        uint32_t side = 0;
        for (uint32_t r = r0; r < r1; ++r) {
            const uint32_t blk = (n0 + r) / MX_FP8_WEIGHT_BLOCK;
            if (blk != block) {
                // the expansion is tiny (K/32 <= 224 bytes per 128 rows): full barriers keep it simple
                PipeBarrier<PIPE_ALL>();
                DataCopyPad(sIn, s[static_cast<uint64_t>(blk) * kIn], DataCopyExtParams(1, kIn, 0, 0, 0),
                            DataCopyPadExtParams<uint8_t>(false, 0, 0, 0));
                PipeBarrier<PIPE_ALL>();
                side ^= 1;
                for (uint32_t c = 0; c < kOut; ++c) {
                    sOut.SetValue(side * pitch + c, sIn.GetValue(c / rep));
                }
                PipeBarrier<PIPE_ALL>();
                block = blk;
            }
            DataCopyPad(out[static_cast<uint64_t>(r) * kOut], sOut[side * pitch],
                        DataCopyExtParams(1, kOut, 0, 0, 0));
        }
        PipeBarrier<PIPE_ALL>();
    }

    __aicore__ inline __gm__ uint8_t *WeightPtr(uint32_t g)
    {
        AscendC::ListTensorDesc list(reinterpret_cast<__gm__ void *>(weightList_));
        return list.GetDataPtr<uint8_t>(g);
    }

    __aicore__ inline __gm__ uint8_t *ScalePtr(uint32_t g)
    {
        AscendC::ListTensorDesc list(reinterpret_cast<__gm__ void *>(scaleList_));
        return list.GetDataPtr<uint8_t>(g);
    }

    const MoeGemmTilingData *td_;
    uint32_t core_;
    uint64_t slabRow_;
    GM_ADDR weightList_;  // GM_ADDR is a macro (__gm__ uint8_t *): one declaration per pointer
    GM_ADDR scaleList_;
    GM_ADDR slab_;
    TPipe *pipe_;
    TQue<QuePosition::VECIN, 2> xIn_, wIn_;
    TQue<QuePosition::VECOUT, 2> xOut_, xScale_, wOut_;
    TBuf<TPosition::VECCALC> xF32_, xAbs_, xAmax_, xInv_, wF16_, wIdx_, table_, sIn_, sOut_;
    GlobalTensor<T> xGm_, yGm_;
    GlobalTensor<fp8_e4m3fn_t> xqGm_;
    GlobalTensor<fp8_e8m0_t> xsGm_;
    GlobalTensor<uint8_t> xsOut_;
    GlobalTensor<int64_t> groupGm_;
};

}  // namespace ascend_v4

#endif  // ASCEND_V4_MOE_GEMM_MX_KERNEL_H
