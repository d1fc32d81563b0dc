/* Native CPU kernels of ascend-v4 (ops/cpu_native.py builds this file with the system C compiler at first use).
 *
 * Each function is one pass of an op whose torch reference (ops/reference/formats.py) takes 8-12 element-wise
 * ops, each with its own dispatch and its own temporary: the block amax of the FP8 / FP4 QAT round-trips, and
 * their quantise-dequantise pass once the scales are known. The scales themselves are computed in torch by the
 * caller, with the reference's own ops, so that they are the reference's bits (its log2 goes through ATen).
 *
 * Every result equals the reference bit for bit (tests/unit/ops/test_cpu_native.py): the same IEEE operations
 * in the same order, compiled without fast-math and without contraction into FMAs (-fno-trapping-math only lets
 * GCC vectorise ceilf: it changes exception flags, not results); NaN comes out with the bit pattern torch's
 * float8 casts give it.
 *
 * Layout: x, y are n_blocks x block contiguous fp32 values; scale holds one fp32 value per block.
 * nt: the number of OpenMP threads (torch.get_num_threads() of the caller).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PARALLEL_MIN_BLOCKS 512 /* below this a parallel region costs more than it saves */

static inline float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* max |x| over each block; NaN if the block holds one (torch's amax propagates NaN). The maximum is taken on the
 * bit patterns with the sign cleared: for non-negative floats their order is the integers' order, an integer max
 * vectorises without fast-math, and any pattern above +inf's is a NaN. */
void block_amax(const float *restrict x, float *restrict out, int64_t n_blocks, int64_t block, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (n_blocks >= PARALLEL_MIN_BLOCKS)
    for (int64_t b = 0; b < n_blocks; b++) {
        const uint32_t *xb = (const uint32_t *)(x + b * block);
        uint32_t m = 0;
        for (int64_t k = 0; k < block; k++) {
            uint32_t a = xb[k] & 0x7FFFFFFFu;
            m = a > m ? a : m;
        }
        out[b] = m > 0x7F800000u ? NAN : bits_to_float(m);
    }
}

/* The e4m3 value nearest to v (ties to even), as torch's v.to(float8_e4m3fn).to(float32) for |v| <= 448 or NaN:
 * normal range (|v| >= 2^-6): keep 3 mantissa bits, rounding half to even on the fp32 bit pattern (a carry
 * into the exponent is the correct rounding up); subnormal range: multiples of 2^-9, by adding and removing
 * 1.5 * 2^14 (ulp 2^-9 throughout), sign restored so -0.0 stays negative. */
static inline float round_e4m3(float v) {
    uint32_t i = float_to_bits(v);
    if (v != v) return bits_to_float((i & 0x80000000u) | 0x7FF00000u); /* torch's e4m3 NaN, back in fp32 */
    float a = fabsf(v);
    if (a < 0x1p-6f) return copysignf((a + 24576.0f) - 24576.0f, v);
    return bits_to_float((i + 0x7FFFFu + ((i >> 20) & 1u)) & 0xFFF00000u);
}

/* y = e4m3(clamp(x / s, +-448)) * s per block: formats.fp8_roundtrip after its scale */
void fp8_apply(const float *restrict x, const float *restrict scale, float *restrict y, int64_t n_blocks,
               int64_t block, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (n_blocks >= PARALLEL_MIN_BLOCKS)
    for (int64_t b = 0; b < n_blocks; b++) {
        const float *xb = x + b * block;
        float *yb = y + b * block;
        const float s = scale[b];
        for (int64_t k = 0; k < block; k++) {
            float q = xb[k] / s;
            q = q < -448.0f ? -448.0f : (q > 448.0f ? 448.0f : q); /* NaN passes, as torch.clamp */
            yb[k] = round_e4m3(q) * s;
        }
    }
}

/* y = e2m1(x / s) * s per block: formats.round_to_fp4 (grid steps 0.5 below 2, 1 below 4, 2 up to 6; a tie goes
 * to the smaller magnitude: ceil(|v| / step - 1/2) * step, + 0.0 for ceil's -0.0) with the sign of v < 0 */
void fp4_apply(const float *restrict x, const float *restrict scale, float *restrict y, int64_t n_blocks,
               int64_t block, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (n_blocks >= PARALLEL_MIN_BLOCKS)
    for (int64_t b = 0; b < n_blocks; b++) {
        const float *xb = x + b * block;
        float *yb = y + b * block;
        const float s = scale[b];
        for (int64_t k = 0; k < block; k++) {
            float v = xb[k] / s;
            float mag = fabsf(v);
            mag = mag > 6.0f ? 6.0f : mag; /* NaN passes, as torch.clamp_(max=6) */
            float step = mag > 3.5f ? 2.0f : (mag > 1.75f ? 1.0f : 0.5f);
            float q = ceilf(mag / step - 0.5f) * step + 0.0f;
            yb[k] = (v < 0.0f ? -q : q) * s;
        }
    }
}
