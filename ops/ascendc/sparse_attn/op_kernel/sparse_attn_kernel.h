// SparseAttn: MQA over a shared K = V latent, one index list per query, sink logit in the denominator only
// (model-spec.md §4.6; golden: ops/reference/attention.py::sparse_attn). Work split and buffer sizes come from
// the host tiling (tiling_rules.h = ops/npu/tiling.py); the schedule below is the one
// ops/npu/tiling.py::sparse_attn_schedule enumerates and tests/unit/npu/_kernel_model.py replays on CPU.
//
// Per unit (t, head tile hb, split s), on the two vector cores (AIV) of a block, each owning hTile/2 heads and
// driving the cube core (AIC) through the high-level Matmul API (MIX mode):
//   for each block of kvBlock index slots:
//     1. gather: each AIV copies half of the block's kv rows (idx -1 -> zero row, masked later) into the
//        core's GM workspace as a dense [kvBlock, D] bf16 tile; FP8-KV variant: each gathered row is a packed
//        cache entry (ops/reference/kv_fp8.py) decoded on the way: e4m3 x 2^(s-127) per 64 nope dims, the
//        bf16 rope dims copied; AIVs sync with a cross-core flag
//     2. mm1  S[h/2, kb] = q[t, rows] . Kblk^T            (fp32 out, workspace)
//     3. online softmax on the AIV: m' = max(m, max S*scale), p = exp(S*scale - m'), l = l e^(m-m') + sum p,
//        P -> bf16 (workspace)
//     4. mm2  Oblk[h/2, D] = P . Kblk                       (fp32 out, workspace)
//     5. O = O e^(m-m') + Oblk  (UB resident, fp32)
//   final (no split): out = O e^(m-M) / (l e^(m-M) + e^(sink-M)), M = max(m, sink)
//   split: write (O, m, l) to the partial area; after SyncAll the combine pass merges the splits with the sink.
// Evidence: written only (the Ascend C toolchain is not available here).
#ifndef ASCEND_V4_SPARSE_ATTN_KERNEL_H
#define ASCEND_V4_SPARSE_ATTN_KERNEL_H

#include "kernel_operator.h"
#include "lib/matmul_intf.h"

namespace ascend_v4 {

using namespace AscendC;

constexpr uint32_t DQ_ROWS = 16;       // tiling_rules.h DQ_ROWS
constexpr uint32_t FP8_SCALE_BLOCK = 64;
constexpr int32_t GATHER_FLAG = 3;     // cross-core flag id: both AIVs finished their half of the gather
constexpr float NEG_INF = -3.402823466e+38f;

template <typename T, bool KV_FP8, bool SPLIT>
class SparseAttnKernel {
public:
    using AType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T>;
    using BTrans = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T, true>;
    using BType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T>;
    using CType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, float>;
    matmul::Matmul<AType, BTrans, CType> mm1;  // S = Q K^T
    matmul::Matmul<AType, BType, CType> mm2;   // O = P V

    __aicore__ inline void Init(GM_ADDR q, GM_ADDR kv, GM_ADDR idx, GM_ADDR sink, GM_ADDR out, GM_ADDR ws,
                                const SparseAttnTilingData *td)
    {
        td_ = td;
        T_ = td->T; H_ = td->H; D_ = td->D; K_ = td->K;
        hTile_ = td->hTile; kvBlock_ = td->kvBlock; dPv_ = td->dPv;
        rows_ = hTile_ / 2;  // heads per AIV
        qGm_.SetGlobalBuffer((__gm__ T *)q, static_cast<uint64_t>(T_) * H_ * D_);
        idxGm_.SetGlobalBuffer((__gm__ int32_t *)idx, static_cast<uint64_t>(T_) * K_);
        sinkGm_.SetGlobalBuffer((__gm__ float *)sink, H_);
        outGm_.SetGlobalBuffer((__gm__ T *)out, static_cast<uint64_t>(T_) * H_ * D_);
        if constexpr (KV_FP8) {
            entryBytes_ = td->entryBytes;
            nope_ = D_ - td->ropeDim;
            scaleOff_ = nope_ + 2 * td->ropeDim;
            kv8Gm_.SetGlobalBuffer((__gm__ uint8_t *)kv, static_cast<uint64_t>(td->N) * entryBytes_);
        } else {
            kvGm_.SetGlobalBuffer((__gm__ T *)kv, static_cast<uint64_t>(td->N) * D_);
        }
        // Per-core exchange area: [kv tile | S | P | Oblk] x 2 (ping-pong), then the split partials.
        const uint32_t core = GetBlockIdx() / GetTaskRation();
        GM_ADDR base = ws + core * td->wsPerCore;
        kvWs_.SetGlobalBuffer((__gm__ T *)base, 2 * kvBlock_ * D_);
        sWs_.SetGlobalBuffer((__gm__ float *)(base + 2 * kvBlock_ * D_ * sizeof(T)), 2 * hTile_ * kvBlock_);
        pWs_.SetGlobalBuffer((__gm__ T *)(base + 2 * kvBlock_ * D_ * sizeof(T) + 2 * hTile_ * kvBlock_ * 4),
                             2 * hTile_ * kvBlock_);
        oWs_.SetGlobalBuffer((__gm__ float *)(base + 2 * kvBlock_ * D_ * sizeof(T) + 2 * hTile_ * kvBlock_ * 6),
                             2 * hTile_ * D_);
        partGm_.SetGlobalBuffer((__gm__ float *)(ws + td->wsPartialOffset));

        pipe_.InitBuffer(sQ_, 2, rows_ * kvBlock_ * sizeof(float));
        pipe_.InitBuffer(pQ_, 2, rows_ * kvBlock_ * sizeof(T));
        pipe_.InitBuffer(idxQ_, 2, kvBlock_ * sizeof(int32_t));
        pipe_.InitBuffer(oBlkQ_, 2, rows_ * dPv_ * sizeof(float));
        pipe_.InitBuffer(oAcc_, rows_ * D_ * sizeof(float));
        pipe_.InitBuffer(stats_, 4 * AlignUp(rows_ * sizeof(float), 32));
        if constexpr (KV_FP8) {
            // Sized as the host tiling accounts them (tiling_rules.h: DQ_ROWS rows of D bytes in, of D bf16
            // out); one entry (AlignUp(entryBytes, 32) <= DQ_ROWS * D) is decoded at a time. The scale bytes
            // live inside the entry, so the rules' separate dq_scale buffer is not allocated (over-counted).
            pipe_.InitBuffer(dqIn_, 2, DQ_ROWS * D_);
            pipe_.InitBuffer(dqOut_, 2, DQ_ROWS * D_ * sizeof(T));
        }
        REGIST_MATMUL_OBJ(&pipe_, GetSysWorkSpacePtr(), mm1, &td->mm1Tiling, mm2, &td->mm2Tiling);
    }

    __aicore__ inline void Process()
    {
        if ASCEND_IS_AIC {
            return;  // the cube side is driven by the Matmul objects registered above
        }
        const uint32_t core = GetBlockIdx() / GetTaskRation();
        const uint32_t sub = GetSubBlockIdx();  // which half of the head tile this AIV owns
        for (uint32_t u = core; u < td_->units; u += td_->usedCores) {
            const uint32_t s = u % td_->kvSplits;
            const uint32_t th = u / td_->kvSplits;
            const uint32_t t = th / td_->nHBlk;
            const uint32_t hb = th % td_->nHBlk;
            const uint32_t h0 = hb * hTile_ + sub * rows_;
            const uint32_t nRows = h0 >= H_ ? 0 : Min(rows_, H_ - h0);
            const uint32_t b0 = s * td_->blocksPerSplit;
            const uint32_t b1 = Min(td_->nKvBlk, b0 + td_->blocksPerSplit);
            RunUnit(t, h0, nRows, b0, b1);
            if constexpr (SPLIT) {
                StorePartial(t, hb, s, sub, nRows);
            } else {
                StoreFinal(t, h0, nRows);
            }
        }
        if constexpr (SPLIT) {
            SyncAll();  // every split's partial is in GM
            for (uint32_t c = core; c < T_ * td_->nHBlk; c += td_->usedCores) {
                Combine(c / td_->nHBlk, c % td_->nHBlk, sub);
            }
        }
    }

private:
    __aicore__ inline uint32_t Min(uint32_t a, uint32_t b) { return a < b ? a : b; }
    __aicore__ inline uint32_t AlignUp(uint32_t a, uint32_t b) { return (a + b - 1) / b * b; }

    __aicore__ inline void ResetStats()
    {
        LocalTensor<float> st = stats_.Get<float>();
        const uint32_t stride = AlignUp(rows_ * sizeof(float), 32) / sizeof(float);
        Duplicate(st, NEG_INF, stride);                    // running max m
        Duplicate(st[stride], 0.0f, stride);               // running sum l
        Duplicate(oAcc_.Get<float>(), 0.0f, rows_ * D_);   // O accumulator
    }

    // 1. gather this AIV's half of the block's kv rows into the dense workspace tile (ping-pong slot `buf`)
    __aicore__ inline void Gather(uint32_t t, uint32_t slot0, uint32_t n, uint32_t buf)
    {
        LocalTensor<int32_t> ix = idxQ_.AllocTensor<int32_t>();
        DataCopy(ix, idxGm_[static_cast<uint64_t>(t) * K_ + slot0], AlignUp(n, 8));
        idxQ_.EnQue(ix);
        ix = idxQ_.DeQue<int32_t>();
        const uint32_t half = (n + 1) / 2;
        const uint32_t r0 = GetSubBlockIdx() * half;
        const uint32_t r1 = Min(n, r0 + half);
        for (uint32_t r = r0; r < r1; ++r) {
            const int32_t row = ix.GetValue(r);
            GlobalTensor<T> dst = kvWs_[(buf * kvBlock_ + r) * D_];
            if constexpr (KV_FP8) {
                DequantRow(row, dst);
            } else if (row >= 0) {
                DataCopyRowGmToGm(dst, kvGm_[static_cast<uint64_t>(row) * D_]);
            } else {
                ZeroRow(dst);  // masked in the softmax; a zero row keeps P.V finite
            }
        }
        idxQ_.FreeTensor(ix);
        CrossCoreSetFlag<0x1, PIPE_MTE3>(GATHER_FLAG);  // mode 1: the two AIVs of this block
        CrossCoreWaitFlag(GATHER_FLAG);
    }

    __aicore__ inline void DataCopyRowGmToGm(GlobalTensor<T> dst, GlobalTensor<T> src)
    {
        LocalTensor<T> tmp = pQ_.AllocTensor<T>();  // reuse the P buffer as a bounce buffer (D <= rows*kvBlock)
        DataCopy(tmp, src, D_);
        pQ_.EnQue(tmp);
        tmp = pQ_.DeQue<T>();
        DataCopy(dst, tmp, D_);
        pQ_.FreeTensor(tmp);
    }

    __aicore__ inline void ZeroRow(GlobalTensor<T> dst)
    {
        LocalTensor<T> tmp = pQ_.AllocTensor<T>();
        Duplicate(tmp, static_cast<T>(0), D_);
        pQ_.EnQue(tmp);
        tmp = pQ_.DeQue<T>();
        DataCopy(dst, tmp, D_);
        pQ_.FreeTensor(tmp);
    }

    // FP8-KV variant: decode one cache entry to a bf16 row (950 has an e4m3 Cast). Entry bytes
    // (ops/reference/kv_fp8.py, model-spec.md §10.2): [0, nope) e4m3 | [nope, nope + 2 rope) bf16 little-endian
    // (the NPU's own byte order) | [nope + 2 rope, +nope/64) UE8M0 exponents | zero padding to a multiple of 8.
    // With nope % 64 == 0 and rope % 16 == 0 (the tiling rejects other shapes) every part starts 32-byte aligned
    // in UB (448 and 576 for D = 512).
    __aicore__ inline void DequantRow(int32_t row, GlobalTensor<T> dst)
    {
        if constexpr (KV_FP8) {
            if (row < 0) {
                ZeroRow(dst);
                return;
            }
            LocalTensor<uint8_t> in = dqIn_.AllocTensor<uint8_t>();
            // 584 B is not a whole number of 32-byte blocks: DataCopyPad moves exactly the entry's bytes
            DataCopyExtParams cp{1, entryBytes_, 0, 0, 0};
            DataCopyPadExtParams<uint8_t> noPad{false, 0, 0, 0};
            DataCopyPad(in, kv8Gm_[static_cast<uint64_t>(row) * entryBytes_], cp, noPad);
            dqIn_.EnQue(in);
            in = dqIn_.DeQue<uint8_t>();
            LocalTensor<T> o = dqOut_.AllocTensor<T>();
            LocalTensor<float> f = oBlkQ_.AllocTensor<float>();  // fp32 scratch, nope <= D <= rows*dPv
            Cast(f, in.template ReinterpretCast<fp8_e4m3fn_t>(), RoundMode::CAST_NONE, nope_);
            for (uint32_t b = 0; b < nope_ / FP8_SCALE_BLOCK; ++b) {
                const float s = ScalarExp2(static_cast<int32_t>(in.GetValue(scaleOff_ + b)) - 127);
                Muls(f[b * FP8_SCALE_BLOCK], f[b * FP8_SCALE_BLOCK], s, FP8_SCALE_BLOCK);
            }
            Cast(o, f, RoundMode::CAST_RINT, nope_);  // exact: an e4m3 value times a power of two fits bf16
            if (D_ > nope_) {  // the rope dims are stored as bf16: copy them unchanged
                DataCopy(o[nope_], in[nope_].template ReinterpretCast<T>(), D_ - nope_);
            }
            oBlkQ_.FreeTensor(f);
            dqOut_.EnQue(o);
            o = dqOut_.DeQue<T>();
            DataCopy(dst, o, D_);
            dqOut_.FreeTensor(o);
            dqIn_.FreeTensor(in);
        }
    }

    __aicore__ inline float ScalarExp2(int32_t e)
    {
        // 2^e as an fp32 bit pattern (e in [-126, 127] for UE8M0 bytes 1..254; byte 0 gives 0.0, the
        // reference 2^-127: kv_pack_fp8 never writes it, its scale exponent is >= -22)
        uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
        return *reinterpret_cast<float *>(&bits);
    }

    __aicore__ inline void RunUnit(uint32_t t, uint32_t h0, uint32_t nRows, uint32_t b0, uint32_t b1)
    {
        ResetStats();
        LocalTensor<float> st = stats_.Get<float>();
        const uint32_t stride = AlignUp(rows_ * sizeof(float), 32) / sizeof(float);
        LocalTensor<float> m = st, l = st[stride], alpha = st[2 * stride], tmp = st[3 * stride];
        LocalTensor<float> o = oAcc_.Get<float>();
        for (uint32_t b = b0; b < b1; ++b) {
            const uint32_t buf = (b - b0) & 1;
            const uint32_t slot0 = b * kvBlock_;
            const uint32_t n = Min(kvBlock_, K_ - slot0);
            Gather(t, slot0, n, buf);
            if (nRows == 0) {
                continue;
            }
            // 2. mm1 on this AIV's rows: S[nRows, n] = q[t, h0:h0+nRows, :] . Kblk^T
            mm1.SetOrgShape(nRows, n, D_);
            mm1.SetSingleShape(nRows, n, D_);
            mm1.SetTensorA(qGm_[(static_cast<uint64_t>(t) * H_ + h0) * D_]);
            mm1.SetTensorB(kvWs_[buf * kvBlock_ * D_], true);
            mm1.IterateAll(sWs_[(buf * hTile_ + GetSubBlockIdx() * rows_) * kvBlock_]);
            mm1.End();
            // 3. online softmax over the block
            LocalTensor<float> s = sQ_.AllocTensor<float>();
            DataCopy(s, sWs_[(buf * hTile_ + GetSubBlockIdx() * rows_) * kvBlock_], nRows * kvBlock_);
            sQ_.EnQue(s);
            s = sQ_.DeQue<float>();
            LocalTensor<int32_t> ix = idxQ_.AllocTensor<int32_t>();
            DataCopy(ix, idxGm_[static_cast<uint64_t>(t) * K_ + slot0], AlignUp(n, 8));
            idxQ_.EnQue(ix);
            ix = idxQ_.DeQue<int32_t>();
            LocalTensor<T> p = pQ_.AllocTensor<T>();
            for (uint32_t r = 0; r < nRows; ++r) {
                LocalTensor<float> sr = s[r * kvBlock_];
                Muls(sr, sr, td_->scale, n);
                for (uint32_t j = 0; j < n; ++j) {  // mask empty slots (idx -1)
                    if (ix.GetValue(j) < 0) {
                        sr.SetValue(j, NEG_INF);
                    }
                }
                ReduceMax(tmp, sr, tmp, n);
                const float mOld = m.GetValue(r);
                const float mNew = mOld > tmp.GetValue(0) ? mOld : tmp.GetValue(0);
                Adds(sr, sr, -mNew, n);
                Exp(sr, sr, n);
                ReduceSum(tmp, sr, tmp, n);
                alpha.SetValue(r, mOld == NEG_INF ? 0.0f : ScalarExpF(mOld - mNew));
                l.SetValue(r, l.GetValue(r) * alpha.GetValue(r) + tmp.GetValue(0));
                m.SetValue(r, mNew);
                Cast(p[r * kvBlock_], sr, RoundMode::CAST_RINT, n);  // P -> bf16 for the cube
            }
            idxQ_.FreeTensor(ix);
            sQ_.FreeTensor(s);
            pQ_.EnQue(p);
            p = pQ_.DeQue<T>();
            DataCopy(pWs_[(buf * hTile_ + GetSubBlockIdx() * rows_) * kvBlock_], p, nRows * kvBlock_);
            pQ_.FreeTensor(p);
            // 4. mm2: Oblk[nRows, D] = P . Kblk ; 5. O = O * alpha + Oblk, in dPv chunks
            mm2.SetOrgShape(nRows, D_, n);
            mm2.SetSingleShape(nRows, D_, n);
            mm2.SetTensorA(pWs_[(buf * hTile_ + GetSubBlockIdx() * rows_) * kvBlock_]);
            mm2.SetTensorB(kvWs_[buf * kvBlock_ * D_]);
            mm2.IterateAll(oWs_[(buf * hTile_ + GetSubBlockIdx() * rows_) * D_]);
            mm2.End();
            for (uint32_t r = 0; r < nRows; ++r) {
                Muls(o[r * D_], o[r * D_], alpha.GetValue(r), D_);
            }
            for (uint32_t d0 = 0; d0 < D_; d0 += dPv_) {
                LocalTensor<float> ob = oBlkQ_.AllocTensor<float>();
                for (uint32_t r = 0; r < nRows; ++r) {
                    DataCopy(ob[r * dPv_], oWs_[(buf * hTile_ + GetSubBlockIdx() * rows_ + r) * D_ + d0], dPv_);
                }
                oBlkQ_.EnQue(ob);
                ob = oBlkQ_.DeQue<float>();
                for (uint32_t r = 0; r < nRows; ++r) {
                    Add(o[r * D_ + d0], o[r * D_ + d0], ob[r * dPv_], dPv_);
                }
                oBlkQ_.FreeTensor(ob);
            }
        }
    }

    __aicore__ inline float ScalarExpF(float x)
    {
        LocalTensor<float> st = stats_.Get<float>();
        const uint32_t stride = AlignUp(rows_ * sizeof(float), 32) / sizeof(float);
        LocalTensor<float> tmp = st[3 * stride];
        tmp.SetValue(0, x);
        Exp(tmp, tmp, 1);
        return tmp.GetValue(0);
    }

    // out = O e^(m-M) / (l e^(m-M) + e^(sink-M)), M = max(m, sink)
    __aicore__ inline void StoreFinal(uint32_t t, uint32_t h0, uint32_t nRows)
    {
        LocalTensor<float> st = stats_.Get<float>();
        const uint32_t stride = AlignUp(rows_ * sizeof(float), 32) / sizeof(float);
        LocalTensor<float> m = st, l = st[stride];
        LocalTensor<float> o = oAcc_.Get<float>();
        for (uint32_t r = 0; r < nRows; ++r) {
            const float sk = sinkGm_.GetValue(h0 + r);
            const float mr = m.GetValue(r);
            const float M = mr > sk ? mr : sk;
            const float a = mr == NEG_INF ? 0.0f : ScalarExpF(mr - M);
            const float den = l.GetValue(r) * a + ScalarExpF(sk - M);
            Muls(o[r * D_], o[r * D_], a / den, D_);
        }
        LocalTensor<T> res = pQ_.AllocTensor<T>();
        for (uint32_t r = 0; r < nRows; ++r) {
            Cast(res, o[r * D_], RoundMode::CAST_RINT, D_);
            pQ_.EnQue(res);
            res = pQ_.DeQue<T>();
            DataCopy(outGm_[(static_cast<uint64_t>(t) * H_ + h0 + r) * D_], res, D_);
        }
        pQ_.FreeTensor(res);
    }

    // partial layout: [(t * nHBlk + hb) * kvSplits + s][hTile][D + 2] fp32 (O row, m, l)
    __aicore__ inline void StorePartial(uint32_t t, uint32_t hb, uint32_t s, uint32_t sub, uint32_t nRows)
    {
        const uint64_t base = ((static_cast<uint64_t>(t) * td_->nHBlk + hb) * td_->kvSplits + s) * hTile_ * (D_ + 2);
        LocalTensor<float> st = stats_.Get<float>();
        const uint32_t stride = AlignUp(rows_ * sizeof(float), 32) / sizeof(float);
        LocalTensor<float> o = oAcc_.Get<float>();
        for (uint32_t r = 0; r < nRows; ++r) {
            const uint64_t row = base + static_cast<uint64_t>(sub * rows_ + r) * (D_ + 2);
            DataCopy(partGm_[row], o[r * D_], D_);
            partGm_.SetValue(row + D_, st.GetValue(r));
            partGm_.SetValue(row + D_ + 1, st.GetValue(stride + r));
        }
    }

    __aicore__ inline void Combine(uint32_t t, uint32_t hb, uint32_t sub)
    {
        const uint32_t h0 = hb * hTile_ + sub * rows_;
        if (h0 >= H_) {
            return;
        }
        const uint32_t nRows = Min(rows_, H_ - h0);
        LocalTensor<float> o = oAcc_.Get<float>();
        for (uint32_t r = 0; r < nRows; ++r) {
            const float sk = sinkGm_.GetValue(h0 + r);
            float M = sk;
            for (uint32_t s = 0; s < td_->kvSplits; ++s) {
                const uint64_t row = (((static_cast<uint64_t>(t) * td_->nHBlk + hb) * td_->kvSplits + s) * hTile_ +
                                      sub * rows_ + r) * (D_ + 2);
                const float ms = partGm_.GetValue(row + D_);
                M = ms > M ? ms : M;
            }
            Duplicate(o[r * D_], 0.0f, D_);
            float den = ScalarExpF(sk - M);
            for (uint32_t s = 0; s < td_->kvSplits; ++s) {
                const uint64_t row = (((static_cast<uint64_t>(t) * td_->nHBlk + hb) * td_->kvSplits + s) * hTile_ +
                                      sub * rows_ + r) * (D_ + 2);
                const float ms = partGm_.GetValue(row + D_);
                const float a = ms == NEG_INF ? 0.0f : ScalarExpF(ms - M);
                den += partGm_.GetValue(row + D_ + 1) * a;
                LocalTensor<float> ob = oBlkQ_.AllocTensor<float>();
                DataCopy(ob, partGm_[row], D_);
                oBlkQ_.EnQue(ob);
                ob = oBlkQ_.DeQue<float>();
                Axpy(o[r * D_], ob, a, D_);
                oBlkQ_.FreeTensor(ob);
            }
            Muls(o[r * D_], o[r * D_], 1.0f / den, D_);
        }
        LocalTensor<T> res = pQ_.AllocTensor<T>();
        for (uint32_t r = 0; r < nRows; ++r) {
            Cast(res, o[r * D_], RoundMode::CAST_RINT, D_);
            pQ_.EnQue(res);
            res = pQ_.DeQue<T>();
            DataCopy(outGm_[(static_cast<uint64_t>(t) * H_ + h0 + r) * D_], res, D_);
        }
        pQ_.FreeTensor(res);
    }

    const SparseAttnTilingData *td_;
    uint32_t T_, H_, D_, K_, hTile_, kvBlock_, dPv_, rows_;
    uint32_t nope_ = 0, scaleOff_ = 0, entryBytes_ = 0;  // FP8-KV entry layout (tiling: ropeDim, entryBytes)
    TPipe pipe_;
    TQue<QuePosition::VECIN, 2> sQ_, idxQ_, dqIn_;
    TQue<QuePosition::VECOUT, 2> pQ_, dqOut_;
    TQue<QuePosition::VECIN, 2> oBlkQ_;
    TBuf<TPosition::VECCALC> oAcc_, stats_;
    GlobalTensor<T> qGm_, kvGm_, outGm_, kvWs_, pWs_;
    GlobalTensor<uint8_t> kv8Gm_;
    GlobalTensor<int32_t> idxGm_;
    GlobalTensor<float> sinkGm_, sWs_, oWs_, partGm_;
};

}  // namespace ascend_v4

#endif  // ASCEND_V4_SPARSE_ATTN_KERNEL_H
