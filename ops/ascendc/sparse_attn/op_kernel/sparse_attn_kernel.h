// SparseAttn: MQA over a shared K = V latent, one index list per query, sink logit in the denominator only
// (model-spec.md §4.6; golden: ops/reference/attention.py::sparse_attn). Work split and buffer sizes come from
// the host tiling (tiling_rules.h = ops/npu/tiling.py); the schedule below is the one
// ops/npu/tiling.py::sparse_attn_schedule enumerates and tests/unit/npu/_kernel_model.py replays on CPU.
//
// Per unit (t, head tile hb, split s), on the two vector cores (AIV) of a block, each owning hTile/2 heads and
// driving the cube core (AIC) through the high-level Matmul API (MIX mode):
//   for each block of kvBlock index slots (the tail block is padded to kvBlock with masked zero rows, so S, P
//   and both matmuls always use row stride / N / K = kvBlock):
//     1. gather: each AIV copies half of the block's kv rows (idx -1 or past K -> zero row, masked later) into
//        the core's GM workspace as a dense [kvBlock, D] 16-bit tile; FP8-KV variant (SparseAttnKvQuant, 950
//        only, sparse_attn_kv_fp8.h): each row is a packed cache entry decoded on the way; the two AIVs then
//        hand off through a mode-1 cross-core flag
//     2. mm1  S[h/2, kb] = q[t, rows] . Kblk^T            (fp32 out, workspace)
//     3. online softmax on the AIV: m' = max(m, max S*scale), p = exp(S*scale - m'), l = l e^(m-m') + sum p,
//        P -> 16-bit (workspace)
//     4. mm2  Oblk[h/2, D] = P . Kblk                       (fp32 out, workspace)
//     5. O = O e^(m-m') + Oblk  (UB resident, fp32)
//   final (no split): out = O e^(m-M) / (l e^(m-M) + e^(sink-M)), M = max(m, sink)
//   split: write (O, m, l) to the partial area; after SyncAll the combine pass merges the splits with the sink.
//
// Synchronisation (compiled with --cce-auto-sync=on, ../CMakeLists.txt): the compiler inserts S<->V, S<->MTE2,
// S<->MTE3 (and V<->V on A2/A3) hand-offs for LocalTensor/GlobalTensor accesses (asc-devkit
// docs/zh/api/SIMD-API/基础API/同步控制/核内同步/关键特性说明.md, "开启cce-auto-sync编译选项自动同步"); the TQue
// EnQue/DeQue pairs give MTE2->V (VECIN), V->MTE3 (VECOUT) and MTE2->MTE3 (TQueBind<VECIN, VECOUT>); what
// neither covers is written out with PipeHandOff below.
// Evidence: written only (the Ascend C toolchain is not available here). API facts cited per use, from
// cann/asc-devkit (mirror-cann/asc-devkit @ 82b89a15f).
#ifndef ASCEND_V4_SPARSE_ATTN_KERNEL_H
#define ASCEND_V4_SPARSE_ATTN_KERNEL_H

#include "kernel_operator.h"
#include "lib/matmul_intf.h"

namespace ascend_v4 {

using namespace AscendC;

constexpr uint32_t DQ_ROWS = 16;  // tiling_rules.h DQ_ROWS (FP8-KV decode buffers)
// Cross-core flag of the gather hand-off between the two AIVs of a block. Ids taken elsewhere: the Matmul API
// [0, 2N-1] for N objects (N <= 4: [0, 7]) and SyncAll [11, 14] (asc-devkit docs .../核间同步/
// CrossCoreSetFlag(ISASI).md, 约束说明), KFC_SYNC_ID 15 (asc-devkit impl/basic_api/dav_c220/kfc/kfc_comm.h).
constexpr uint16_t GATHER_FLAG = 8;
constexpr float NEG_INF = -3.402823466e+38f;

// One in-core pipe hand-off (SetFlag/WaitFlag on an id from TPipe::FetchEventID), for the hand-offs that neither
// auto-sync nor a TQue covers. asc-devkit include/basic_api/kernel_tpipe.h (FetchEventID),
// include/basic_api/kernel_operator_block_sync_intf.h (SetFlag/WaitFlag); same pattern in
// include/adv_api/matmul/matmul_client.h CopyGlobalAddr.
template <HardEvent EVT>
__aicore__ inline void PipeHandOff()
{
    const event_t id = static_cast<event_t>(GetTPipePtr()->FetchEventID(EVT));
    SetFlag<EVT>(id);
    WaitFlag<EVT>(id);
}

// BF16/FP16 KV (SparseAttn): gathered rows are copied unchanged. The FP8 decoder (KvFp8Decoder) lives in
// sparse_attn_kv_fp8.h, which only the 950-only entry op_kernel/sparse_attn_kv_quant.cpp includes.
struct KvRowCopy {
    static constexpr bool PACKED = false;
};

template <typename T, typename KvDec, bool SPLIT>
class SparseAttnKernel {
public:
    using AType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T>;
    using BTrans = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T, true>;
    using BType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, T>;
    using CType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, float>;
    // Registered by REGIST_MATMUL_OBJ in the kernel entry, before Init() (see sparse_attn.cpp).
    matmul::Matmul<AType, BTrans, CType> mm1;  // S = Q K^T
    matmul::Matmul<AType, BType, CType> mm2;   // O = P V

    __aicore__ inline void Init(TPipe *pipe, GM_ADDR q, GM_ADDR kv, GM_ADDR idx, GM_ADDR sink, GM_ADDR out,
                                GM_ADDR ws, const SparseAttnTilingData *td)
    {
        td_ = td;
        T_ = td->T; H_ = td->H; D_ = td->D; K_ = td->K;
        hTile_ = td->hTile; kvBlock_ = td->kvBlock; dPv_ = td->dPv;
        rows_ = hTile_ / 2;  // heads per AIV
        qGm_.SetGlobalBuffer((__gm__ T *)q, static_cast<uint64_t>(T_) * H_ * D_);
        idxGm_.SetGlobalBuffer((__gm__ int32_t *)idx, static_cast<uint64_t>(T_) * K_);
        sinkGm_.SetGlobalBuffer((__gm__ float *)sink, H_);
        outGm_.SetGlobalBuffer((__gm__ T *)out, static_cast<uint64_t>(T_) * H_ * D_);
        if constexpr (KvDec::PACKED) {
            dec_.Init(pipe, kv, td);  // FP8 cache entries (950): sparse_attn_kv_fp8.h
        } else {
            kvGm_.SetGlobalBuffer((__gm__ T *)kv, static_cast<uint64_t>(td->N) * D_);
        }
        // GM workspace: every offset comes from the host tiling (tiling_rules.h ComputeSparseAttnWorkspace =
        // ops/npu/tiling.py sparse_attn_workspace); test_tiling.py parses these lines against that table.
        // GetTaskRatio: asc-devkit include/basic_api/kernel_operator_sys_var_intf.h (2 AIVs per block in MIX 1:2).
        const uint32_t core = GetBlockIdx() / GetTaskRatio();
        GM_ADDR base = ws + core * td->wsPerCore;
        kvWs_.SetGlobalBuffer((__gm__ T *)(base + td->wsKvOff), 2 * kvBlock_ * D_);        // [buf][kvBlock][D]
        sWs_.SetGlobalBuffer((__gm__ float *)(base + td->wsSOff), 2 * hTile_ * kvBlock_);  // [buf][hTile][kvBlock]
        pWs_.SetGlobalBuffer((__gm__ T *)(base + td->wsPOff), 2 * hTile_ * kvBlock_);      // [buf][hTile][kvBlock]
        oWs_.SetGlobalBuffer((__gm__ float *)(base + td->wsOOff), 2 * hTile_ * D_);        // [buf][hTile][D]
        if constexpr (SPLIT) {
            // partials of unit u: O [u][hTile][D], (m, l) [u][2][hTile]
            partO_.SetGlobalBuffer((__gm__ float *)(ws + td->wsPartOOff), td->units * hTile_ * D_);
            partStat_.SetGlobalBuffer((__gm__ float *)(ws + td->wsPartStatOff), td->units * 2 * hTile_);
        }
        // UB: exactly the host's list (tiling.py sparse_attn_buffers; test_tiling.py parses the tags).
        pipe->InitBuffer(sQ_, 2, rows_ * kvBlock_ * sizeof(float));         // tiling: s
        pipe->InitBuffer(pQ_, 2, rows_ * kvBlock_ * sizeof(T));             // tiling: p_out
        pipe->InitBuffer(idxQ_, 2, kvBlock_ * sizeof(int32_t));             // tiling: idx
        pipe->InitBuffer(oBlkQ_, 2, rows_ * dPv_ * sizeof(float));          // tiling: o_blk
        pipe->InitBuffer(oAcc_, rows_ * D_ * sizeof(float));                // tiling: o_acc
        pipe->InitBuffer(stats_, 4 * AlignUp(rows_ * sizeof(float), 32));   // tiling: stats
        pipe->InitBuffer(rowOutQ_, 2, D_ * sizeof(T));                      // tiling: row_out
        if constexpr (!KvDec::PACKED) {
            pipe->InitBuffer(rowCopyQ_, 2, D_ * sizeof(T));                 // tiling: row_copy
        }
    }

    __aicore__ inline void Process()
    {
        if ASCEND_IS_AIC {
            return;  // the AIC already ran the Matmul server and returned inside REGIST_MATMUL_OBJ
        }
        const uint32_t core = GetBlockIdx() / GetTaskRatio();
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
                StorePartial(u, sub, nRows);
            } else {
                StoreFinal(t, h0, nRows);
            }
        }
        if constexpr (SPLIT) {
            // The partials were written by MTE3 DataCopy only (no scalar GM writes: DMA has no data-cache
            // coherence issue, asc-devkit docs .../缓存控制/DataCacheCleanAndInvalid.md) and Combine reads them
            // with MTE2 DataCopy only, so no DataCacheCleanAndInvalid is needed around this barrier.
            // SyncAll<true>: all-AIV hardware barrier (default config waits on PIPE_ALL); the AIC cannot join a
            // SyncAll<false> because it sits in the Matmul server loop (asc-devkit docs .../核间同步/SyncAll.md).
            // The host sets schedule mode 1 (batch mode) for these tiling keys (sparse_attn_tiling.cpp).
            SyncAll<true>();
            for (uint32_t c = core; c < T_ * td_->nHBlk; c += td_->usedCores) {
                Combine(c / td_->nHBlk, c % td_->nHBlk, sub);
            }
        }
    }

private:
    __aicore__ inline uint32_t Min(uint32_t a, uint32_t b) { return a < b ? a : b; }
    __aicore__ inline uint32_t AlignUp(uint32_t a, uint32_t b) { return (a + b - 1) / b * b; }
    __aicore__ inline uint32_t StatStride() { return AlignUp(rows_ * sizeof(float), 32) / sizeof(float); }

    __aicore__ inline void ResetStats()
    {
        LocalTensor<float> st = stats_.Get<float>();
        Duplicate(st, NEG_INF, StatStride());                  // running max m
        Duplicate(st[StatStride()], 0.0f, StatStride());       // running sum l
        Duplicate(oAcc_.Get<float>(), 0.0f, rows_ * D_);       // O accumulator
    }

    // Exactly n index slots: a plain DataCopy of AlignUp(n, 8) would read past idx's end on its last row.
    // DataCopyPad / DataCopyExtParams / DataCopyPadExtParams: asc-devkit
    // include/basic_api/kernel_operator_data_copy_intf.h, include/basic_api/kernel_struct_data_copy.h.
    __aicore__ inline LocalTensor<int32_t> LoadIdx(uint32_t t, uint32_t slot0, uint32_t n)
    {
        LocalTensor<int32_t> ix = idxQ_.AllocTensor<int32_t>();
        DataCopyExtParams cp{1, static_cast<uint32_t>(n * sizeof(int32_t)), 0, 0, 0};
        DataCopyPadExtParams<int32_t> noPad{false, 0, 0, 0};
        DataCopyPad(ix, idxGm_[static_cast<uint64_t>(t) * K_ + slot0], cp, noPad);
        idxQ_.EnQue(ix);
        return idxQ_.DeQue<int32_t>();
    }

    // 1. gather this AIV's half of the block's kvBlock rows into the dense workspace tile (ping-pong slot buf).
    // Slots >= n (tail block) and idx -1 become zero rows, masked in the softmax.
    __aicore__ inline void Gather(const LocalTensor<int32_t> &ix, uint32_t n, uint32_t buf)
    {
        const uint32_t half = kvBlock_ / 2;  // kvBlock_ is a multiple of 16
        const uint32_t r0 = GetSubBlockIdx() * half;
        for (uint32_t r = r0; r < r0 + half; ++r) {
            const int32_t row = r < n ? ix.GetValue(r) : -1;
            GlobalTensor<T> dst = kvWs_[(static_cast<uint64_t>(buf) * kvBlock_ + r) * D_];
            if (row < 0) {
                ZeroRow(dst);
            } else if constexpr (KvDec::PACKED) {
                dec_.DecodeRow(row, dst);
            } else {
                CopyRow(dst, kvGm_[static_cast<uint64_t>(row) * D_]);
            }
        }
        // Both halves must be in GM before either AIV posts mm1. Mode 1 = the two AIVs of this block; the set
        // fires once this AIV's MTE3 writes are done; the wait uses the same <mode, pipe> (asc-devkit
        // docs .../核间同步/CrossCoreWaitFlag(ISASI).md: modes 0-2 take no PIPE_S; on 950 the wait blocks only the
        // named pipe, on A2/A3 every pipe). The MTE3 -> S hand-off then holds the scalar unit, which posts the
        // Matmul request, behind that wait on 950 too.
        // UNVERIFIED: that a SetFlag<MTE3_S> issued after a pipe-blocking CrossCoreWaitFlag on PIPE_MTE3 fires
        // only after the wait clears is inferred from in-order pipe execution, not stated in a doc.
        CrossCoreSetFlag<1, PIPE_MTE3>(GATHER_FLAG);
        CrossCoreWaitFlag<1, PIPE_MTE3>(GATHER_FLAG);
        PipeHandOff<HardEvent::MTE3_S>();
    }

    // GM -> UB -> GM row copy through TQueBind<VECIN, VECOUT>: its EnQue/DeQue event is MTE2_MTE3 (UB -> UB in
    // GetQueEvt, asc-devkit impl/basic_api/kernel_event.h; TQueBind: include/basic_api/kernel_tpipe.h;
    // docs .../资源管理/TQueBind/TQueBind简介.md lists the VECIN -> VECOUT path).
    __aicore__ inline void CopyRow(const GlobalTensor<T> &dst, const GlobalTensor<T> &src)
    {
        LocalTensor<T> tmp = rowCopyQ_.AllocTensor<T>();
        DataCopy(tmp, src, D_);
        rowCopyQ_.EnQue(tmp);
        tmp = rowCopyQ_.DeQue<T>();
        DataCopy(dst, tmp, D_);
        rowCopyQ_.FreeTensor(tmp);
    }

    // Duplicate (V) -> DataCopy (MTE3): a VECOUT queue, fresh Alloc/Free per row.
    __aicore__ inline void ZeroRow(const GlobalTensor<T> &dst)
    {
        LocalTensor<T> tmp = rowOutQ_.AllocTensor<T>();
        Duplicate(tmp, static_cast<T>(0), D_);
        rowOutQ_.EnQue(tmp);
        tmp = rowOutQ_.DeQue<T>();
        DataCopy(dst, tmp, D_);
        rowOutQ_.FreeTensor(tmp);
    }

    __aicore__ inline void RunUnit(uint32_t t, uint32_t h0, uint32_t nRows, uint32_t b0, uint32_t b1)
    {
        ResetStats();
        LocalTensor<float> st = stats_.Get<float>();
        LocalTensor<float> alpha = st[2 * StatStride()];
        LocalTensor<float> o = oAcc_.Get<float>();
        for (uint32_t b = b0; b < b1; ++b) {
            const uint32_t buf = (b - b0) & 1;
            const uint32_t slot0 = b * kvBlock_;
            const uint32_t n = Min(kvBlock_, K_ - slot0);  // valid slots of this block; the rest are padding
            LocalTensor<int32_t> ix = LoadIdx(t, slot0, n);
            Gather(ix, n, buf);
            if (nRows == 0) {
                idxQ_.FreeTensor(ix);
                continue;
            }
            // S and P rows of this AIV: row stride kvBlock_ in GM and UB (mm1's N = mm2's K = kvBlock_)
            const uint64_t sOff = (static_cast<uint64_t>(buf) * hTile_ + GetSubBlockIdx() * rows_) * kvBlock_;
            // 2. mm1: S[nRows, kvBlock] = q[t, h0:h0+nRows, :] . Kblk^T (matmul_client.h SetOrgShape /
            // SetSingleShape / SetTensorA / SetTensorB(gm, isTransposeB) / IterateAll / End)
            mm1.SetOrgShape(nRows, kvBlock_, D_);
            mm1.SetSingleShape(nRows, kvBlock_, D_);
            mm1.SetTensorA(qGm_[(static_cast<uint64_t>(t) * H_ + h0) * D_]);
            mm1.SetTensorB(kvWs_[static_cast<uint64_t>(buf) * kvBlock_ * D_], true);
            mm1.IterateAll(sWs_[sOff]);
            mm1.End();
            // 3. online softmax over the block; P -> workspace
            Softmax(ix, n, nRows, sOff);
            idxQ_.FreeTensor(ix);
            // P's MTE3 writes complete before the scalar unit posts the mm2 request (on 950 the Matmul message
            // is written by the scalar unit: asc-devkit impl/basic_api/dav_3510/kfc/kfc_comm_client.h)
            PipeHandOff<HardEvent::MTE3_S>();
            // 4. mm2: Oblk[nRows, D] = P . Kblk ; 5. O = O * alpha + Oblk, in dPv chunks
            mm2.SetOrgShape(nRows, D_, kvBlock_);
            mm2.SetSingleShape(nRows, D_, kvBlock_);
            mm2.SetTensorA(pWs_[sOff]);
            mm2.SetTensorB(kvWs_[static_cast<uint64_t>(buf) * kvBlock_ * D_]);
            const uint64_t oOff = (static_cast<uint64_t>(buf) * hTile_ + GetSubBlockIdx() * rows_) * D_;
            mm2.IterateAll(oWs_[oOff]);
            mm2.End();
            for (uint32_t r = 0; r < nRows; ++r) {
                Muls(o[r * D_], o[r * D_], alpha.GetValue(r), D_);
            }
            for (uint32_t d0 = 0; d0 < D_; d0 += dPv_) {
                LocalTensor<float> ob = oBlkQ_.AllocTensor<float>();
                for (uint32_t r = 0; r < nRows; ++r) {
                    DataCopy(ob[r * dPv_], oWs_[oOff + r * D_ + d0], dPv_);
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

    __aicore__ inline void Softmax(const LocalTensor<int32_t> &ix, uint32_t n, uint32_t nRows, uint64_t sOff)
    {
        LocalTensor<float> st = stats_.Get<float>();
        const uint32_t stride = StatStride();
        LocalTensor<float> m = st, l = st[stride], alpha = st[2 * stride], tmp = st[3 * stride];
        LocalTensor<float> s = sQ_.AllocTensor<float>();
        DataCopy(s, sWs_[sOff], nRows * kvBlock_);
        sQ_.EnQue(s);
        s = sQ_.DeQue<float>();
        LocalTensor<T> p = pQ_.AllocTensor<T>();
        for (uint32_t r = 0; r < nRows; ++r) {
            LocalTensor<float> sr = s[r * kvBlock_];
            Muls(sr, sr, td_->scale, kvBlock_);
            for (uint32_t j = 0; j < kvBlock_; ++j) {  // mask padding slots and empty slots (idx -1)
                if (j >= n || ix.GetValue(j) < 0) {
                    sr.SetValue(j, NEG_INF);
                }
            }
            // Reduce scratch: row r of P, overwritten by the Cast below only after both reductions. kvBlock_ * 2
            // bytes cover the first-round need of a no-index fp32 reduction of kvBlock_ <= 512 values (asc-devkit
            // docs .../归约计算/ReduceMax.md, ReduceSum.md: sharedTmpBuffer sizing; dst may overlap it; on 950 no
            // scratch is used).
            LocalTensor<float> work = p[r * kvBlock_].template ReinterpretCast<float>();
            ReduceMax(tmp, sr, work, kvBlock_);
            const float mOld = m.GetValue(r);
            const float bMax = tmp.GetValue(0);
            const float mNew = mOld > bMax ? mOld : bMax;
            Adds(sr, sr, -mNew, kvBlock_);
            Exp(sr, sr, kvBlock_);
            ReduceSum(tmp, sr, work, kvBlock_);
            const float rowSum = tmp.GetValue(0);  // read before ScalarExpF reuses tmp
            const float a = mOld == NEG_INF ? 0.0f : ScalarExpF(mOld - mNew);
            alpha.SetValue(r, a);
            l.SetValue(r, l.GetValue(r) * a + rowSum);
            m.SetValue(r, mNew);
            Cast(p[r * kvBlock_], sr, RoundMode::CAST_RINT, kvBlock_);  // P -> 16-bit for the cube
        }
        sQ_.FreeTensor(s);
        pQ_.EnQue(p);
        p = pQ_.DeQue<T>();
        DataCopy(pWs_[sOff], p, nRows * kvBlock_);
        pQ_.FreeTensor(p);
    }

    __aicore__ inline float ScalarExpF(float x)
    {
        LocalTensor<float> tmp = stats_.Get<float>()[3 * StatStride()];
        tmp.SetValue(0, x);
        Exp(tmp, tmp, 1);
        return tmp.GetValue(0);
    }

    // One fp32 UB row -> 16-bit output row in GM: Cast (V) -> VECOUT queue -> DataCopy (MTE3), a fresh
    // Alloc/EnQue/DeQue/Free per row.
    __aicore__ inline void WriteOutRow(const LocalTensor<float> &src, uint64_t off)
    {
        LocalTensor<T> res = rowOutQ_.AllocTensor<T>();
        Cast(res, src, RoundMode::CAST_RINT, D_);
        rowOutQ_.EnQue(res);
        res = rowOutQ_.DeQue<T>();
        DataCopy(outGm_[off], res, D_);
        rowOutQ_.FreeTensor(res);
    }

    // out = O e^(m-M) / (l e^(m-M) + e^(sink-M)), M = max(m, sink)
    __aicore__ inline void StoreFinal(uint32_t t, uint32_t h0, uint32_t nRows)
    {
        LocalTensor<float> st = stats_.Get<float>();
        LocalTensor<float> m = st, l = st[StatStride()];
        LocalTensor<float> o = oAcc_.Get<float>();
        for (uint32_t r = 0; r < nRows; ++r) {
            const float sk = sinkGm_.GetValue(h0 + r);
            const float mr = m.GetValue(r);
            const float M = mr > sk ? mr : sk;
            const float a = mr == NEG_INF ? 0.0f : ScalarExpF(mr - M);
            const float den = l.GetValue(r) * a + ScalarExpF(sk - M);
            Muls(o[r * D_], o[r * D_], a / den, D_);
            WriteOutRow(o[r * D_], (static_cast<uint64_t>(t) * H_ + h0 + r) * D_);
        }
    }

    // Partial of unit u: O rows -> partO_[u][sub*rows + r][:], m -> partStat_[u][0][sub*rows ..],
    // l -> partStat_[u][1][sub*rows ..] (rows_ floats: a multiple of 8, whole 32-byte blocks).
    __aicore__ inline void StorePartial(uint32_t u, uint32_t sub, uint32_t nRows)
    {
        if (nRows == 0) {
            return;
        }
        LocalTensor<float> st = stats_.Get<float>();
        LocalTensor<float> o = oAcc_.Get<float>();
        const uint64_t oBase = (static_cast<uint64_t>(u) * hTile_ + sub * rows_) * D_;
        const uint64_t sBase = static_cast<uint64_t>(u) * 2 * hTile_ + sub * rows_;
        PipeHandOff<HardEvent::V_MTE3>();  // O was last written by V in a TBuf (no queue event)
        for (uint32_t r = 0; r < nRows; ++r) {
            DataCopy(partO_[oBase + r * D_], o[r * D_], D_);
        }
        DataCopy(partStat_[sBase], st, rows_);                        // m (last written by S: auto-sync)
        DataCopy(partStat_[sBase + hTile_], st[StatStride()], rows_);  // l
        PipeHandOff<HardEvent::MTE3_V>();  // the next unit's ResetStats overwrites oAcc_ / stats_ (V)
    }

    // [m rows | l rows] of one split's partial, via MTE2 into a VECIN buffer (2 * rows_ <= rows_ * kvBlock_).
    __aicore__ inline LocalTensor<float> LoadStats(uint64_t u, uint32_t sub)
    {
        LocalTensor<float> ml = sQ_.AllocTensor<float>();
        const uint64_t base = u * 2 * hTile_ + sub * rows_;
        DataCopy(ml, partStat_[base], rows_);
        DataCopy(ml[rows_], partStat_[base + hTile_], rows_);
        sQ_.EnQue(ml);
        return sQ_.DeQue<float>();
    }

    // out = sum_s O_s e^(m_s-M) / (sum_s l_s e^(m_s-M) + e^(sink-M)), M = max(max_s m_s, sink)
    __aicore__ inline void Combine(uint32_t t, uint32_t hb, uint32_t sub)
    {
        const uint32_t h0 = hb * hTile_ + sub * rows_;
        if (h0 >= H_) {
            return;
        }
        const uint32_t nRows = Min(rows_, H_ - h0);
        const uint32_t stride = StatStride();
        LocalTensor<float> st = stats_.Get<float>();
        LocalTensor<float> M = st, den = st[stride], a = st[2 * stride];
        LocalTensor<float> o = oAcc_.Get<float>();
        const uint64_t u0 = (static_cast<uint64_t>(t) * td_->nHBlk + hb) * td_->kvSplits;
        for (uint32_t r = 0; r < nRows; ++r) {
            M.SetValue(r, sinkGm_.GetValue(h0 + r));
        }
        for (uint32_t s = 0; s < td_->kvSplits; ++s) {
            LocalTensor<float> ml = LoadStats(u0 + s, sub);
            for (uint32_t r = 0; r < nRows; ++r) {
                const float ms = ml.GetValue(r);
                if (ms > M.GetValue(r)) {
                    M.SetValue(r, ms);
                }
            }
            sQ_.FreeTensor(ml);
        }
        Duplicate(o, 0.0f, nRows * D_);
        for (uint32_t r = 0; r < nRows; ++r) {
            den.SetValue(r, ScalarExpF(sinkGm_.GetValue(h0 + r) - M.GetValue(r)));
        }
        for (uint32_t s = 0; s < td_->kvSplits; ++s) {
            LocalTensor<float> ml = LoadStats(u0 + s, sub);
            for (uint32_t r = 0; r < nRows; ++r) {
                const float ms = ml.GetValue(r);
                const float f = ms == NEG_INF ? 0.0f : ScalarExpF(ms - M.GetValue(r));
                a.SetValue(r, f);
                den.SetValue(r, den.GetValue(r) + ml.GetValue(rows_ + r) * f);
            }
            sQ_.FreeTensor(ml);
            const uint64_t oBase = ((u0 + s) * hTile_ + sub * rows_) * D_;
            for (uint32_t d0 = 0; d0 < D_; d0 += dPv_) {  // o_blk holds rows_ x dPv fp32
                LocalTensor<float> ob = oBlkQ_.AllocTensor<float>();
                for (uint32_t r = 0; r < nRows; ++r) {
                    DataCopy(ob[r * dPv_], partO_[oBase + r * D_ + d0], dPv_);
                }
                oBlkQ_.EnQue(ob);
                ob = oBlkQ_.DeQue<float>();
                for (uint32_t r = 0; r < nRows; ++r) {
                    Axpy(o[r * D_ + d0], ob[r * dPv_], a.GetValue(r), dPv_);
                }
                oBlkQ_.FreeTensor(ob);
            }
        }
        for (uint32_t r = 0; r < nRows; ++r) {
            Muls(o[r * D_], o[r * D_], 1.0f / den.GetValue(r), D_);
            WriteOutRow(o[r * D_], (static_cast<uint64_t>(t) * H_ + h0 + r) * D_);
        }
    }

    const SparseAttnTilingData *td_;
    uint32_t T_, H_, D_, K_, hTile_, kvBlock_, dPv_, rows_;
    KvDec dec_;
    TQue<QuePosition::VECIN, 2> sQ_, idxQ_, oBlkQ_;
    TQue<QuePosition::VECOUT, 2> pQ_, rowOutQ_;
    TQueBind<TPosition::VECIN, TPosition::VECOUT, 2> rowCopyQ_;
    TBuf<TPosition::VECCALC> oAcc_, stats_;
    GlobalTensor<T> qGm_, kvGm_, outGm_, kvWs_, pWs_;
    GlobalTensor<int32_t> idxGm_;
    GlobalTensor<float> sinkGm_, sWs_, oWs_, partO_, partStat_;
};

}  // namespace ascend_v4

#endif  // ASCEND_V4_SPARSE_ATTN_KERNEL_H
