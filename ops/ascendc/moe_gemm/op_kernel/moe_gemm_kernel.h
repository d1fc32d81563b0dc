// MoeGemm: y[M, N] = x[M, K] . W_g[N, K]^T for the rows of each group g (rows sorted by group, counts in
// group_list on the device). Golden: ops/reference/gemm.py::quant_gemm applied per group; CPU replay of this
// schedule: tests/unit/npu/_kernel_model.py::moe_gemm_model.
//
// Unit list (built identically on every core from group_list, no host sync; = tiling.py moe_gemm_schedule):
//   for g in groups with rows: for each mTile block of its rows: for each nTile block of N: unit u;
//   core c takes u = c, c + coreNum, ...
// A2/A3 path (no FP8/FP4 cube, and no fp8 vector Cast either): per unit the two vector cores (AIV0 / AIV1 of
// the AI core) dequantise half of the [nTile, K] weight slab of group g each, kTile columns at a time, by
// vector table lookup only -- bytes -> fp16 -> int32 -> byte offsets -> Gather from a 256-entry UB table
// (FP8: byte -> fp32 value; FP4: byte -> its two fp16 values; tables from moe_gemm_decode.h) -- times
// 2^(scale-127) per (scaleBlockN x scaleBlockK) block, -> bf16/fp16 into the core's workspace (ping-pong
// across units); a cross-AIV barrier; then AIV0 alone asks the cube for the [rows, nTile] tile with the Matmul
// API (bf16 x bf16, fp32 accumulate, base tiles mTile/nTile/kTile from the host tiling). The slab pair is
// ping-pong: AIV1 passes the barrier of unit j+1 only after AIV0 returned from unit j's synchronous IterateAll,
// so unit j+2 may overwrite unit j's slab.
// The Matmul object is registered by the kernel entry (moe_gemm.cpp), not here: REGIST_MATMUL_OBJ declares the
// AIV's KfcCommClient in the enclosing scope, whose destructor sends the cube server its quit message.
// The 950 native MX path (tiling keys 11 / 12) is a separate class: moe_gemm_mx_kernel.h.
// Evidence: written only -- never compiled (no CANN here) or run. APIs checked against mirror-cann/asc-devkit
// (headers and docs/zh/api, paths next to each use); the decode tables are compiled and checked on CPU.
#ifndef ASCEND_V4_MOE_GEMM_KERNEL_H
#define ASCEND_V4_MOE_GEMM_KERNEL_H

#include "kernel_operator.h"
#include "lib/matmul_intf.h"
#include "moe_gemm_decode.h"

namespace ascend_v4 {

using namespace AscendC;

constexpr int32_t FMT_BF16 = 0;
constexpr int32_t FMT_FP8 = 1;
constexpr int32_t FMT_FP4 = 2;
// Cross-AIV barrier flag (CrossCoreSetFlag mode 1). The Matmul API reserves flag IDs [0, 2N-1] for N Matmul
// objects, i.e. [0, 1] here (asc-devkit docs/zh/api/SIMD-API/高阶API/矩阵计算/Matmul-Kernel侧接口/
// REGIST_MATMUL_OBJ.md; impl/adv_api/detail/matmul/utils/matmul_utils.h: devEvtID = instIdx * 2 + subBlockIdx),
// and KFC uses 15 (impl/basic_api/dav_c220/kfc/kfc_comm.h: KFC_SYNC_ID); 5 is neither.
constexpr int32_t DEQUANT_FLAG = 5;
constexpr uint32_t MAX_GROUPS = 1024;
constexpr uint32_t LUT_ENTRIES = 256;  // one table entry per weight byte value
constexpr uint32_t LUT_ENTRY_BYTES = 4;  // fp32 (FP8) or two fp16 (FP4): Gather byte offset = byte << 2
constexpr int32_t LUT_SHIFT = 2;

template <typename T, int32_t FMT>
class MoeGemmKernel {
public:
    using AType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T>;
    using BType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T, true>;  // [nTile, K] slab, transposed
    using CType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T>;
    matmul::Matmul<AType, BType, CType> mm;

    // `pipe`: the entry's TPipe, on which REGIST_MATMUL_OBJ(pipe, ..., mm, ...) already ran (moe_gemm.cpp; the
    // asc-devkit matmul samples, e.g. examples/01_simd_cpp_api/04_advanced_api/00_matmul/matmul_quant/
    // matmul_quant.asc, register before Init). On the AIC that macro runs the cube server and returns from the
    // entry, so Init / Process run on the vector cores only.
    __aicore__ inline void Init(GM_ADDR x, GM_ADDR weight, GM_ADDR scale, GM_ADDR groupList, GM_ADDR y, GM_ADDR ws,
                                const MoeGemmTilingData *td, TPipe *pipe)
    {
        td_ = td;
        pipe_ = pipe;
        xGm_.SetGlobalBuffer((__gm__ T *)x, static_cast<uint64_t>(td->M) * td->K);
        yGm_.SetGlobalBuffer((__gm__ T *)y, static_cast<uint64_t>(td->M) * td->N);
        groupGm_.SetGlobalBuffer((__gm__ int64_t *)groupList, td->E);
        weightList_ = weight;  // dynamic input: a ListTensorDesc in GM (one pointer + shape per group)
        scaleList_ = scale;
        core_ = GetBlockIdx() / GetTaskRation();
        slabWs_.SetGlobalBuffer((__gm__ T *)(ws + core_ * td->wsPerCore), 2 * td->nTile * td->K);
        // UB exists on the vector cores only (ASCEND_IS_AIV: asc-devkit impl/utils/sys_macros.h)
        if ASCEND_IS_AIV {
            if constexpr (FMT != FMT_BF16) {
                InitDequantBuffers();
            }
        }
    }

    __aicore__ inline void Process()
    {
        if ASCEND_IS_AIC {
            return;  // not reached (the cube runs the Matmul server inside REGIST_MATMUL_OBJ); kept as a guard
        }
        if constexpr (FMT == FMT_BF16) {
            if (GetSubBlockIdx() != 0) {
                return;  // nothing to dequantise: AIV0 alone drives the cube
            }
        }
        // Walk the unit list built from the group counts (same order on every core, and on both AIVs of it).
        uint32_t u = 0;
        uint64_t rowStart = 0;
        uint32_t local = 0;
        for (uint32_t g = 0; g < td_->E; ++g) {
            const uint64_t count = static_cast<uint64_t>(groupGm_.GetValue(g));
            for (uint64_t r0 = 0; r0 < count; r0 += td_->mTile) {
                const uint32_t rows = static_cast<uint32_t>(count - r0 < td_->mTile ? count - r0 : td_->mTile);
                for (uint32_t ni = 0; ni < td_->nNTile; ++ni, ++u) {
                    if (u % td_->coreNum != core_) {
                        continue;
                    }
                    RunUnit(g, rowStart + r0, rows, ni, local++ & 1);
                }
            }
            rowStart += count;
        }
    }

private:
    // Vector-core buffers of the dequant path (sizes = ops/npu/tiling.py moe_gemm_buffers) and the 256-entry
    // decode table, filled once by the scalar unit.
    __aicore__ inline void InitDequantBuffers()
    {
        const uint32_t rowsPerAiv = td_->nTile / 2;
        const uint32_t bytes = FMT == FMT_FP4 ? rowsPerAiv * td_->kTile / 2 : rowsPerAiv * td_->kTile;
        pipe_->InitBuffer(wIn_, 2, bytes);
        pipe_->InitBuffer(wScale_, 2, 32 * ((rowsPerAiv / td_->scaleBlockN + 1) * (td_->kTile / td_->scaleBlockK + 1) / 32 + 1));
        pipe_->InitBuffer(work_, rowsPerAiv * td_->kTile * sizeof(float));
        pipe_->InitBuffer(wOut_, 2, rowsPerAiv * td_->kTile * sizeof(T));
        pipe_->InitBuffer(cvt_, td_->kTile * sizeof(half));     // byte values as fp16; FP4: then the fp16 pairs
        pipe_->InitBuffer(idx_, td_->kTile * sizeof(int32_t));  // Gather byte offsets
        pipe_->InitBuffer(lut_, LUT_ENTRIES * LUT_ENTRY_BYTES);
        LocalTensor<uint32_t> lut = lut_.Get<uint32_t>();
        for (uint32_t b = 0; b < LUT_ENTRIES; ++b) {
            lut.SetValue(b, FMT == FMT_FP4 ? Fp4PairF16Bits(b) : E4m3ToF32Bits(b));
        }
        // Scalar writes -> vector Gather reads. --cce-auto-sync=on inserts S->V as well (asc-devkit docs/zh/api/
        // SIMD-API/基础API/同步控制/核内同步/关键特性说明.md, 表3); the explicit event keeps this correct without it.
        // FetchEventID(HardEvent): include/basic_api/kernel_tpipe.h.
        event_t sv = static_cast<event_t>(pipe_->FetchEventID(HardEvent::S_V));
        SetFlag<HardEvent::S_V>(sv);
        WaitFlag<HardEvent::S_V>(sv);
    }

    __aicore__ inline void RunUnit(uint32_t g, uint64_t row0, uint32_t rows, uint32_t ni, uint32_t buf)
    {
        const uint32_t n0 = ni * td_->nTile;
        const uint32_t n = td_->N - n0 < td_->nTile ? td_->N - n0 : td_->nTile;
        GlobalTensor<T> slab = slabWs_[static_cast<uint64_t>(buf) * td_->nTile * td_->K];
        if constexpr (FMT == FMT_BF16) {
            slab.SetGlobalBuffer(WeightPtr<T>(g) + static_cast<uint64_t>(n0) * td_->K);  // used as is
        } else {
            DequantSlab(g, n0, n, slab);
            // Both AIVs of this AI core: barrier after their MTE3 writes of the slab halves (mode 1 = the AIVs of
            // one AI core; set + wait pattern of asc-devkit docs/zh/api/SIMD-API/基础API/同步控制/核间同步/
            // 关键特性说明.md, "单AI Core中AIV全核同步"; both are declared in
            // include/basic_api/kernel_operator_block_sync_intf.h).
            CrossCoreSetFlag<0x1, PIPE_MTE3>(DEQUANT_FLAG);
            CrossCoreWaitFlag(DEQUANT_FLAG);
        }
        // One Matmul request per unit: in MIX 1:2 each AIV has its own client and the AIC serves both
        // (include/adv_api/matmul/matmul_client.h, impl/adv_api/detail/kfc/kfc_register_obj.h), so an
        // IterateAll from both would compute the tile twice.
        if (GetSubBlockIdx() != 0) {
            return;
        }
        mm.SetOrgShape(td_->M, td_->N, td_->K);  // row strides: x K, slab K, y N (orgN, not the tile width)
        mm.SetSingleShape(rows, n, td_->K);
        mm.SetTensorA(xGm_[row0 * td_->K]);
        mm.SetTensorB(slab, true);
        mm.IterateAll(yGm_[row0 * td_->N + n0]);  // sync (default): returns once the tile is in GM
        mm.End();
    }

    template <typename W>
    __aicore__ inline __gm__ W *WeightPtr(uint32_t g)
    {
        AscendC::ListTensorDesc list(reinterpret_cast<__gm__ void *>(weightList_));
        return list.GetDataPtr<W>(g);
    }

    __aicore__ inline __gm__ uint8_t *ScalePtr(uint32_t g)
    {
        AscendC::ListTensorDesc list(reinterpret_cast<__gm__ void *>(scaleList_));
        return list.GetDataPtr<uint8_t>(g);
    }

    // This AIV's half of W_g[n0:n0+n, :] as T into `slab`: AIV0 the first (n+1)/2 rows, AIV1 the rest.
    // Per row and k tile (all vector, A2/A3 data types per the asc-devkit docs/zh/api/SIMD-API/基础API/
    // Memory矢量计算 pages): Cast u8 -> half (exact for 0..255; 类型转换/Cast.md, A2/A3 tables), Cast half ->
    // int32 CAST_RINT (same tables), ShiftLeft by 2 (逻辑计算/ShiftLeft.md: int32 on A2/A3) = byte offset of the
    // 4-byte entry, Gather (离散与聚合/Gather.md: uint32 on A2/A3, offsets in bytes, count form).
    __aicore__ inline void DequantSlab(uint32_t g, uint32_t n0, uint32_t n, GlobalTensor<T> slab)
    {
        const uint32_t rowsPerAiv = (n + 1) / 2;
        const uint32_t r0 = GetSubBlockIdx() == 0 ? 0 : (rowsPerAiv < n ? rowsPerAiv : n);
        const uint32_t r1 = n < r0 + rowsPerAiv ? n : r0 + rowsPerAiv;
        GlobalTensor<uint8_t> w, s;
        const uint32_t packedK = FMT == FMT_FP4 ? td_->K / 2 : td_->K;
        w.SetGlobalBuffer(WeightPtr<uint8_t>(g), static_cast<uint64_t>(td_->N) * packedK);
        const uint32_t sCols = (td_->K + td_->scaleBlockK - 1) / td_->scaleBlockK;
        s.SetGlobalBuffer(ScalePtr(g), static_cast<uint64_t>((td_->N + td_->scaleBlockN - 1) / td_->scaleBlockN) * sCols);
        LocalTensor<float> f = work_.Get<float>();
        LocalTensor<half> h = cvt_.Get<half>();
        LocalTensor<int32_t> idx = idx_.Get<int32_t>();
        LocalTensor<uint32_t> lut = lut_.Get<uint32_t>();
        for (uint32_t k0 = 0; k0 < td_->K; k0 += td_->kTile) {
            const uint32_t kt = td_->K - k0 < td_->kTile ? td_->K - k0 : td_->kTile;
            const uint32_t kb = FMT == FMT_FP4 ? kt / 2 : kt;  // weight bytes of this row's k tile
            for (uint32_t r = r0; r < r1; ++r) {
                const uint32_t row = n0 + r;
                const uint32_t lr = r - r0;
                LocalTensor<uint8_t> in = wIn_.AllocTensor<uint8_t>();
                // DataCopyPad: kb may be 16 (an FP4 k tail of 32), under DataCopy's 32-byte unit
                // (include/basic_api/kernel_operator_data_copy_intf.h, DataCopyExtParams / DataCopyPadExtParams)
                DataCopyPad(in, w[static_cast<uint64_t>(row) * packedK + (FMT == FMT_FP4 ? k0 / 2 : k0)],
                            DataCopyExtParams(1, kb, 0, 0, 0), DataCopyPadExtParams<uint8_t>(false, 0, 0, 0));
                wIn_.EnQue(in);
                in = wIn_.DeQue<uint8_t>();
                LocalTensor<float> fr = f[lr * td_->kTile];
                // Each step reads the previous one's output (some through ReinterpretCast aliases), so an explicit
                // PIPE_V barrier between them (PipeBarrier: include/basic_api/kernel_operator_block_sync_intf.h;
                // 核内同步/关键特性说明.md lists hardware PIPE_V -> PIPE_V ordering for the 950 only)
                // instead of relying on the compiler to see through the aliases.
                Cast(h, in, RoundMode::CAST_NONE, kb);
                wIn_.FreeTensor(in);
                PipeBarrier<PIPE_V>();
                Cast(idx, h, RoundMode::CAST_RINT, kb);
                PipeBarrier<PIPE_V>();
                ShiftLeft(idx, idx, static_cast<int32_t>(LUT_SHIFT), static_cast<int32_t>(kb));
                PipeBarrier<PIPE_V>();
                if constexpr (FMT == FMT_FP4) {
                    // one uint32 = the byte's two fp16 values (low half = element 2j), written over h (no longer
                    // read), then the kt fp16 values -> fp32
                    LocalTensor<uint32_t> pairs = h.template ReinterpretCast<uint32_t>();
                    Gather(pairs, lut, idx.template ReinterpretCast<uint32_t>(), 0u, kb);
                    PipeBarrier<PIPE_V>();
                    Cast(fr, h, RoundMode::CAST_NONE, kt);
                } else {
                    Gather(fr.template ReinterpretCast<uint32_t>(), lut, idx.template ReinterpretCast<uint32_t>(), 0u,
                           kt);  // the fp32 value of each e4m3 byte
                }
                PipeBarrier<PIPE_V>();
                // x 2^(s - 127) per scale block along k (one block per row for FP4, 128 wide for FP8)
                for (uint32_t c = 0; c < kt; c += td_->scaleBlockK) {
                    const uint32_t len = kt - c < td_->scaleBlockK ? kt - c : td_->scaleBlockK;
                    const uint8_t e = s.GetValue(static_cast<uint64_t>(row / td_->scaleBlockN) * sCols + (k0 + c) / td_->scaleBlockK);
                    uint32_t bits = static_cast<uint32_t>(e) << 23;  // 2^(e-127) as an fp32 bit pattern
                    Muls(fr[c], fr[c], *reinterpret_cast<float *>(&bits), len);
                }
                PipeBarrier<PIPE_V>();
                LocalTensor<T> o = wOut_.AllocTensor<T>();
                Cast(o, fr, RoundMode::CAST_RINT, kt);  // exact: FP8/FP4 x pow2 fits bf16
                wOut_.EnQue(o);
                o = wOut_.DeQue<T>();
                DataCopy(slab[static_cast<uint64_t>(r) * td_->K + k0], o, kt);
                wOut_.FreeTensor(o);
            }
        }
    }

    const MoeGemmTilingData *td_;
    TPipe *pipe_;
    uint32_t core_;
    GM_ADDR weightList_;  // GM_ADDR is a macro (__gm__ uint8_t *): one declaration per pointer
    GM_ADDR scaleList_;
    TQue<QuePosition::VECIN, 2> wIn_, wScale_;
    TQue<QuePosition::VECOUT, 2> wOut_;
    TBuf<TPosition::VECCALC> work_, cvt_, idx_, lut_;
    GlobalTensor<T> xGm_, yGm_, slabWs_;
    GlobalTensor<int64_t> groupGm_;
};

}  // namespace ascend_v4

#endif  // ASCEND_V4_MOE_GEMM_KERNEL_H
