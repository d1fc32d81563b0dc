// MoeGemm: y[M, N] = x[M, K] . W_g[N, K]^T for the rows of each group g (rows sorted by group, counts in
// group_list on the device). Golden: ops/reference/gemm.py::quant_gemm applied per group; CPU replay of this
// schedule: tests/unit/npu/_kernel_model.py::moe_gemm_model.
//
// Unit list (built identically on every core from group_list, no host sync; = tiling.py moe_gemm_schedule):
//   for g in groups with rows: for each mTile block of its rows: for each nTile block of N: unit u;
//   core c takes u = c, c + coreNum, ...
// A2/A3 path (no FP8/FP4 cube): per unit the two vector cores dequantise the [nTile, K] weight slab of group g
// kTile columns at a time -- FP8: e4m3 bytes -> fp16 Cast; FP4: byte -> (low, high) nibble -> 16-entry LUT
// (Gather) -- times 2^(scale-127) per (scaleBlockN x scaleBlockK) block, -> bf16 into the core's workspace
// (ping-pong across units); then the cube computes the [rows, nTile] tile with the Matmul API (bf16 x bf16,
// fp32 accumulate, base tiles mTile/nTile/kTile from the host tiling).
// The 950 native MX path (tiling keys 11 / 12) is a separate class: moe_gemm_mx_kernel.h.
// Evidence: written only.
#ifndef ASCEND_V4_MOE_GEMM_KERNEL_H
#define ASCEND_V4_MOE_GEMM_KERNEL_H

#include "kernel_operator.h"
#include "lib/matmul_intf.h"

namespace ascend_v4 {

using namespace AscendC;

constexpr int32_t FMT_BF16 = 0;
constexpr int32_t FMT_FP8 = 1;
constexpr int32_t FMT_FP4 = 2;
constexpr int32_t DEQUANT_FLAG = 5;  // cross-core flag: both AIVs finished their half of the weight slab
constexpr uint32_t MAX_GROUPS = 1024;

template <typename T, int32_t FMT>
class MoeGemmKernel {
public:
    using AType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T>;
    using BType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T, true>;  // [nTile, K] slab, transposed
    using CType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T>;
    matmul::Matmul<AType, BType, CType> mm;

    __aicore__ inline void Init(GM_ADDR x, GM_ADDR weight, GM_ADDR scale, GM_ADDR groupList, GM_ADDR y, GM_ADDR ws,
                                const MoeGemmTilingData *td)
    {
        td_ = td;
        xGm_.SetGlobalBuffer((__gm__ T *)x, static_cast<uint64_t>(td->M) * td->K);
        yGm_.SetGlobalBuffer((__gm__ T *)y, static_cast<uint64_t>(td->M) * td->N);
        groupGm_.SetGlobalBuffer((__gm__ int64_t *)groupList, td->E);
        weightList_ = weight;  // dynamic input: a ListTensorDesc in GM (one pointer + shape per group)
        scaleList_ = scale;
        core_ = GetBlockIdx() / GetTaskRation();
        slabWs_.SetGlobalBuffer((__gm__ T *)(ws + core_ * td->wsPerCore), 2 * td->nTile * td->K);
        const uint32_t half = td->nTile / 2;
        if constexpr (FMT != FMT_BF16) {
            const uint32_t bytes = FMT == FMT_FP4 ? half * td->kTile / 2 : half * td->kTile;
            pipe_.InitBuffer(wIn_, 2, bytes);
            pipe_.InitBuffer(wScale_, 2, 32 * ((half / td->scaleBlockN + 1) * (td->kTile / td->scaleBlockK + 1) / 32 + 1));
            pipe_.InitBuffer(work_, half * td->kTile * sizeof(float));
            pipe_.InitBuffer(wOut_, 2, half * td->kTile * sizeof(T));
            if constexpr (FMT == FMT_FP4) {
                pipe_.InitBuffer(lut_, 32 * sizeof(float));
                LocalTensor<float> lut = lut_.Get<float>();
                const float v[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
                for (int i = 0; i < 16; ++i) {
                    lut.SetValue(i, v[i]);
                }
            }
        }
        REGIST_MATMUL_OBJ(&pipe_, GetSysWorkSpacePtr(), mm, &td->mmTiling);
    }

    __aicore__ inline void Process()
    {
        if ASCEND_IS_AIC {
            return;  // driven by the Matmul object
        }
        // Walk the unit list built from the group counts (same order on every core).
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
    __aicore__ inline void RunUnit(uint32_t g, uint64_t row0, uint32_t rows, uint32_t ni, uint32_t buf)
    {
        const uint32_t n0 = ni * td_->nTile;
        const uint32_t n = td_->N - n0 < td_->nTile ? td_->N - n0 : td_->nTile;
        GlobalTensor<T> slab = slabWs_[static_cast<uint64_t>(buf) * td_->nTile * td_->K];
        if constexpr (FMT == FMT_BF16) {
            slab.SetGlobalBuffer(WeightPtr<T>(g) + static_cast<uint64_t>(n0) * td_->K);  // used as is
        } else {
            DequantSlab(g, n0, n, slab);
        }
        mm.SetOrgShape(td_->M, td_->N, td_->K);  // row strides: x K, slab K, y N (orgN, not the tile width)
        mm.SetSingleShape(rows, n, td_->K);
        mm.SetTensorA(xGm_[row0 * td_->K]);
        mm.SetTensorB(slab, true);
        mm.IterateAll(yGm_[row0 * td_->N + n0]);  // rows of other groups / past the groups are never touched
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

    // A2/A3: the vector cores write W_g[n0:n0+n, :] as bf16 into `slab`, each AIV half of the n rows.
    __aicore__ inline void DequantSlab(uint32_t g, uint32_t n0, uint32_t n, GlobalTensor<T> slab)
    {
        const uint32_t half = (n + 1) / 2;
        const uint32_t r0 = GetSubBlockIdx() * half;
        const uint32_t r1 = n < r0 + half ? n : r0 + half;
        GlobalTensor<uint8_t> w, s;
        const uint32_t packedK = FMT == FMT_FP4 ? td_->K / 2 : td_->K;
        w.SetGlobalBuffer(WeightPtr<uint8_t>(g), static_cast<uint64_t>(td_->N) * packedK);
        const uint32_t sCols = (td_->K + td_->scaleBlockK - 1) / td_->scaleBlockK;
        s.SetGlobalBuffer(ScalePtr(g), static_cast<uint64_t>((td_->N + td_->scaleBlockN - 1) / td_->scaleBlockN) * sCols);
        LocalTensor<float> f = work_.Get<float>();
        for (uint32_t k0 = 0; k0 < td_->K; k0 += td_->kTile) {
            const uint32_t kt = td_->K - k0 < td_->kTile ? td_->K - k0 : td_->kTile;
            for (uint32_t r = r0; r < r1; ++r) {
                const uint32_t row = n0 + r;
                const uint32_t lr = r - r0;
                LocalTensor<uint8_t> in = wIn_.AllocTensor<uint8_t>();
                const uint32_t kb = FMT == FMT_FP4 ? kt / 2 : kt;
                DataCopy(in, w[static_cast<uint64_t>(row) * packedK + (FMT == FMT_FP4 ? k0 / 2 : k0)], kb);
                wIn_.EnQue(in);
                in = wIn_.DeQue<uint8_t>();
                LocalTensor<float> fr = f[lr * td_->kTile];
                if constexpr (FMT == FMT_FP4) {
                    // codes: even element = low nibble, odd = high nibble (model-spec.md §8.4)
                    for (uint32_t j = 0; j < kb; ++j) {
                        const uint8_t byte = in.GetValue(j);
                        fr.SetValue(2 * j, lut_.Get<float>().GetValue(byte & 0x0F));
                        fr.SetValue(2 * j + 1, lut_.Get<float>().GetValue(byte >> 4));
                    }
                } else {
                    Cast(fr, in.template ReinterpretCast<fp8_e4m3fn_t>(), RoundMode::CAST_NONE, kt);
                }
                wIn_.FreeTensor(in);
                // x 2^(s - 127) per scale block along k (one block per row for FP4, 128 wide for FP8)
                for (uint32_t c = 0; c < kt; c += td_->scaleBlockK) {
                    const uint32_t len = kt - c < td_->scaleBlockK ? kt - c : td_->scaleBlockK;
                    const uint8_t e = s.GetValue(static_cast<uint64_t>(row / td_->scaleBlockN) * sCols + (k0 + c) / td_->scaleBlockK);
                    uint32_t bits = static_cast<uint32_t>(e) << 23;  // 2^(e-127) as an fp32 bit pattern
                    Muls(fr[c], fr[c], *reinterpret_cast<float *>(&bits), len);
                }
                LocalTensor<T> o = wOut_.AllocTensor<T>();
                Cast(o, fr, RoundMode::CAST_RINT, kt);  // exact: FP8/FP4 x pow2 fits bf16
                wOut_.EnQue(o);
                o = wOut_.DeQue<T>();
                DataCopy(slab[static_cast<uint64_t>(r) * td_->K + k0], o, kt);
                wOut_.FreeTensor(o);
            }
        }
        CrossCoreSetFlag<0x1, PIPE_MTE3>(DEQUANT_FLAG);  // both halves written before the cube reads the slab
        CrossCoreWaitFlag(DEQUANT_FLAG);
    }

    const MoeGemmTilingData *td_;
    uint32_t core_;
    GM_ADDR weightList_;  // GM_ADDR is a macro (__gm__ uint8_t *): one declaration per pointer
    GM_ADDR scaleList_;
    TPipe pipe_;
    TQue<QuePosition::VECIN, 2> wIn_, wScale_;
    TQue<QuePosition::VECOUT, 2> wOut_;
    TBuf<TPosition::VECCALC> work_, lut_;
    GlobalTensor<T> xGm_, yGm_, slabWs_;
    GlobalTensor<int64_t> groupGm_;
};

}  // namespace ascend_v4

#endif  // ASCEND_V4_MOE_GEMM_KERNEL_H
