// FP8 KV-cache entry decoder of SparseAttnKvQuant -- Ascend 950 only.
// Included by op_kernel/sparse_attn_kv_quant.cpp alone, the kernel entry of the OpDef SparseAttnKvQuant, which
// is registered for ascend950 only (op_host/sparse_attn_def.cpp); sparse_attn.cpp (built for ascend910b,
// ascend910_93 and ascend950) never includes it. Reason: Cast from fp8_e4m3fn_t exists only on 950 (asc-devkit
// docs/zh/api/SIMD-API/基础API/Memory矢量计算/类型转换/Cast.md: "fp8_e4m3fn_t | float | CAST_NONE" is in the
// Ascend 950PR/950DT table only; the A2 / A3 tables list no fp8 type).
//
// Entry bytes (ops/reference/kv_fp8.py, model-spec.md §10.2): [0, nope) e4m3 | [nope, nope + 2 rope) bf16
// little-endian (the NPU's own byte order) | [nope + 2 rope, + nope/64) UE8M0 exponents | zero padding to a
// multiple of 8. With nope % 64 == 0 and rope % 16 == 0 (the host tiling rejects other shapes) every part starts
// 32-byte aligned in UB (448 and 576 for D = 512). One entry is decoded at a time: e4m3 and bf16 -> fp32
// (CAST_NONE, both in the 950 Cast table), nope dims times 2^(s-127) per 64, fp32 -> bf16 (CAST_RINT; exact,
// every value is a bf16 value). No UB -> UB DataCopy (its documented paths are VECIN -> VECCALC -> VECOUT).
// Evidence: written only (no CANN here).
#ifndef ASCEND_V4_SPARSE_ATTN_KV_FP8_H
#define ASCEND_V4_SPARSE_ATTN_KV_FP8_H

#include "kernel_operator.h"
#include "sparse_attn_kernel.h"

namespace ascend_v4 {

class KvFp8Decoder {
public:
    static constexpr bool PACKED = true;
    static constexpr uint32_t SCALE_BLOCK = 64;  // nope dims per UE8M0 byte

    __aicore__ inline void Init(TPipe *pipe, GM_ADDR kv, const SparseAttnTilingData *td)
    {
        D_ = td->D;
        nope_ = D_ - td->ropeDim;
        scaleOff_ = nope_ + 2 * td->ropeDim;
        entryBytes_ = td->entryBytes;
        kvGm_.SetGlobalBuffer((__gm__ uint8_t *)kv, static_cast<uint64_t>(td->N) * entryBytes_);
        // Sized as the host tiling lists them (tiling.py sparse_attn_buffers, kv_fp8). One entry is
        // entryBytes = nope + 2 rope + AlignUp(nope / 64, 8) <= 2 D + D / 64 + 8 bytes (host: KvFp8EntryBytes,
        // checked against kv's row width), so AlignUp(entryBytes, 32) <= DQ_ROWS * D.
        pipe->InitBuffer(inQ_, 2, DQ_ROWS * D_);                        // tiling: dq_in
        pipe->InitBuffer(f32_, D_ * sizeof(float));                     // tiling: dq_f32
        pipe->InitBuffer(outQ_, 2, DQ_ROWS * D_ * sizeof(bfloat16_t));  // tiling: dq_out
    }

    // Decode cache entry `row` (>= 0) into the dense bf16 row `dst` of the workspace kv tile.
    __aicore__ inline void DecodeRow(int32_t row, const GlobalTensor<bfloat16_t> &dst)
    {
        LocalTensor<uint8_t> in = inQ_.AllocTensor<uint8_t>();
        // 584 B is not a whole number of 32-byte blocks: DataCopyPad moves exactly the entry's bytes
        DataCopyExtParams cp{1, entryBytes_, 0, 0, 0};
        DataCopyPadExtParams<uint8_t> noPad{false, 0, 0, 0};
        DataCopyPad(in, kvGm_[static_cast<uint64_t>(row) * entryBytes_], cp, noPad);
        inQ_.EnQue(in);
        in = inQ_.DeQue<uint8_t>();
        LocalTensor<float> f = f32_.Get<float>();
        Cast(f, in.ReinterpretCast<fp8_e4m3fn_t>(), RoundMode::CAST_NONE, nope_);
        if (D_ > nope_) {  // rope dims: stored as bf16, widened unchanged
            Cast(f[nope_], in[nope_].ReinterpretCast<bfloat16_t>(), RoundMode::CAST_NONE, D_ - nope_);
        }
        for (uint32_t b = 0; b < nope_ / SCALE_BLOCK; ++b) {
            const float s = ScalarExp2(static_cast<int32_t>(in.GetValue(scaleOff_ + b)) - 127);
            Muls(f[b * SCALE_BLOCK], f[b * SCALE_BLOCK], s, SCALE_BLOCK);
        }
        LocalTensor<bfloat16_t> o = outQ_.AllocTensor<bfloat16_t>();
        Cast(o, f, RoundMode::CAST_RINT, D_);
        inQ_.FreeTensor(in);
        outQ_.EnQue(o);
        o = outQ_.DeQue<bfloat16_t>();
        DataCopy(dst, o, D_);
        outQ_.FreeTensor(o);
    }

private:
    __aicore__ inline float ScalarExp2(int32_t e)
    {
        // 2^e as an fp32 bit pattern (e in [-126, 127] for UE8M0 bytes 1..254; byte 0 gives 0.0, the
        // reference 2^-127: kv_pack_fp8 never writes it, its scale exponent is >= -22)
        uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
        return *reinterpret_cast<float *>(&bits);
    }

    uint32_t D_ = 0, nope_ = 0, scaleOff_ = 0, entryBytes_ = 0;
    GlobalTensor<uint8_t> kvGm_;
    TQue<QuePosition::VECIN, 2> inQ_;
    TQue<QuePosition::VECOUT, 2> outQ_;
    TBuf<TPosition::VECCALC> f32_;
};

}  // namespace ascend_v4

#endif  // ASCEND_V4_SPARSE_ATTN_KV_FP8_H
