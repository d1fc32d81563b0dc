// Lookup-table entries of the MoeGemm vector-dequant path (moe_gemm_kernel.h, tiling keys 1 / 2), as integer bit
// manipulation only: A2 / A3 have no fp8 / fp4 vector Cast (asc-devkit docs/zh/api/SIMD-API/基础API/
// Memory矢量计算/类型转换/Cast.md lists fp8 pairs in the Ascend 950 table only), so the kernel fills a 256-entry
// UB table once with these functions and decodes weight bytes with a vector Gather.
// No CANN header and no include: the kernel includes this after kernel_operator.h (uint32_t, __aicore__);
// tests/unit/npu/test_moe_gemm_mx.py compiles it with the host g++ (-D__aicore__=, <cstdint>) and compares all
// 256 entries with torch's float8_e4m3fn / the FP4 table. Evidence: compiled and checked on CPU only.
#ifndef ASCEND_V4_MOE_GEMM_DECODE_H
#define ASCEND_V4_MOE_GEMM_DECODE_H

namespace ascend_v4 {

// fp32 bit pattern of the e4m3fn byte b (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no inf; only
// S.1111.111 is NaN; exponent 0 is subnormal: m * 2^-9).
__aicore__ inline uint32_t E4m3ToF32Bits(uint32_t b)
{
    const uint32_t sign = (b & 0x80u) << 24;
    const uint32_t e = (b >> 3) & 0xFu;
    uint32_t m = b & 0x7u;
    if (e == 0xFu && m == 0x7u) {
        return sign | 0x7FC00000u;  // NaN
    }
    if (e != 0u) {
        return sign | ((e + 120u) << 23) | (m << 20);  // (1 + m/8) * 2^(e-7): fp32 exponent e - 7 + 127
    }
    if (m == 0u) {
        return sign;  // +-0
    }
    uint32_t ex = 121u;  // value (m/8) * 2^-6: normalise 0.m to 1.m', fp32 biased exponent starts at -6 + 127
    while ((m & 0x8u) == 0u) {
        m <<= 1;
        --ex;
    }
    return sign | (ex << 23) | ((m & 0x7u) << 20);
}

// fp16 bit pattern of the e2m1 code c (1 sign, 2 exponent bits with bias 1, 1 mantissa bit): 0, .5, 1, 1.5, 2,
// 3, 4, 6 and the negatives; every one is exact in fp16.
__aicore__ inline uint32_t E2m1ToF16Bits(uint32_t c)
{
    const uint32_t sign = (c & 0x8u) << 12;
    const uint32_t e = (c >> 1) & 0x3u;
    const uint32_t m = c & 0x1u;
    if (e == 0u) {
        return sign | (m != 0u ? 0x3800u : 0u);  // 0 or 0.5 (subnormal in e2m1)
    }
    return sign | ((e + 14u) << 10) | (m << 9);  // (1 + m/2) * 2^(e-1): fp16 exponent e - 1 + 15
}

// Packed FP4 byte b (element 2j in the low nibble, 2j+1 in the high one; model-spec.md §8.4) -> both values
// as two fp16 in one little-endian uint32: the low half is element 2j, so a gathered uint32 row read as fp16
// keeps the element order.
__aicore__ inline uint32_t Fp4PairF16Bits(uint32_t b)
{
    return E2m1ToF16Bits(b & 0xFu) | (E2m1ToF16Bits((b >> 4) & 0xFu) << 16);
}

}  // namespace ascend_v4

#endif  // ASCEND_V4_MOE_GEMM_DECODE_H
