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

/* formats.fp8_roundtrip after its scale, per value v = x / s: e4m3(clamp(v, +-448)) */
static inline float fp8_value(float v) {
    v = v < -448.0f ? -448.0f : (v > 448.0f ? 448.0f : v); /* NaN passes, as torch.clamp */
    return round_e4m3(v);
}

/* formats.round_to_fp4 per value v = x / s (grid steps 0.5 below 2, 1 below 4, 2 up to 6; a tie goes to the
 * smaller magnitude: ceil(|v| / step - 1/2) * step, + 0.0 for ceil's -0.0), with the sign of v < 0 */
static inline float fp4_value(float v) {
    float mag = fabsf(v);
    mag = mag > 6.0f ? 6.0f : mag; /* NaN passes, as torch.clamp_(max=6) */
    float step = mag > 3.5f ? 2.0f : (mag > 1.75f ? 1.0f : 0.5f);
    float q = ceilf(mag / step - 0.5f) * step + 0.0f;
    return v < 0.0f ? -q : q;
}

/* y = VALUE(x / s) * s for every value of every block, s = the block's scale: fp8_apply, fp4_apply */
#define BLOCK_APPLY(NAME, VALUE)                                                                                 \
    void NAME(const float *restrict x, const float *restrict scale, float *restrict y, int64_t n_blocks,         \
              int64_t block, int nt) {                                                                           \
        _Pragma("omp parallel for schedule(static) num_threads(nt) if (n_blocks >= PARALLEL_MIN_BLOCKS)")       \
        for (int64_t b = 0; b < n_blocks; b++) {                                                                 \
            const float *xb = x + b * block;                                                                     \
            float *yb = y + b * block;                                                                           \
            const float s = scale[b];                                                                            \
            for (int64_t k = 0; k < block; k++) yb[k] = VALUE(xb[k] / s) * s;                                    \
        }                                                                                                        \
    }
BLOCK_APPLY(fp8_apply, fp8_value)
BLOCK_APPLY(fp4_apply, fp4_value)

/* ------------------------------------------------------------------------------------------- mHC, Hadamard
 * Sinkhorn normalisation of row-softmaxed comb [T, n, n] in place: one column step, then iters - 1 (row, column)
 * pairs (reference.mhc.sinkhorn). Each sum runs over its n values in order, as torch and numpy sum 4 values; the
 * whole sum is taken before its divisions, as in the reference. */
void sinkhorn(float *restrict c, int64_t T, int64_t n, float eps, int64_t iters, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (T >= PARALLEL_MIN_BLOCKS)
    for (int64_t t = 0; t < T; t++) {
        float *ct = c + t * n * n;
        for (int64_t it = 0; it < 2 * iters - 1; it++) {
            int cols = it % 2 == 0; /* steps 0, 2, 4, ...: columns; 1, 3, ...: rows */
            for (int64_t a = 0; a < n; a++) {
                /* element b of line a: column a holds ct[b * n + a], row a holds ct[a * n + b] */
                int64_t base = cols ? a : a * n, stride = cols ? n : 1;
                float s = ct[base];
                for (int64_t b = 1; b < n; b++) s += ct[base + b * stride];
                s += eps;
                for (int64_t b = 0; b < n; b++) ct[base + b * stride] /= s;
            }
        }
    }
}

/* Orthonormal Walsh-Hadamard transform of each row of n values (n a power of two, at most 4096): the butterfly
 * stages of reference.formats.hadamard (a + b, a - b at distance h = 1, 2, 4, ...), then the product by the fp32
 * value of n^-1/2. */
void hadamard(const float *restrict x, float *restrict y, int64_t rows, int64_t n, float scale, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if (rows >= PARALLEL_MIN_BLOCKS)
    for (int64_t r = 0; r < rows; r++) {
        float buf[2][4096];
        const float *src = x + r * n;
        int cur = 0;
        for (int64_t h = 1; h < n; h *= 2) {
            float *dst = buf[cur];
            for (int64_t j = 0; j < n; j += 2 * h)
                for (int64_t i = 0; i < h; i++) {
                    float a = src[j + i], b = src[j + h + i];
                    dst[j + i] = a + b;
                    dst[j + h + i] = a - b;
                }
            src = dst;
            cur ^= 1;
        }
        for (int64_t k = 0; k < n; k++) y[r * n + k] = src[k] * scale;
    }
}

/* Interleaved RoPE in place on the last rd of the D values of each of the T * H rows of x, row t's factors
 * c, s = cos[t], sin[t] (rd each; C = (cos, cos), S = (-sin, sin) per pair, S negated for the inverse):
 * (x0, x1) -> (x0 c0 + x1 s0, x1 c1 + x0 s1), two products and a sum each as reference.rope.apply_rope. */
void rope_(float *restrict x, const float *restrict cos_, const float *restrict sin_, int64_t T, int64_t H,
           int64_t D, int64_t rd, int inverse, int nt) {
    const float sign = inverse ? -1.0f : 1.0f; /* an exact negation */
    #pragma omp parallel for schedule(static) num_threads(nt) if (T * H >= PARALLEL_MIN_BLOCKS)
    for (int64_t row = 0; row < T * H; row++) {
        float *r = x + row * D + (D - rd);
        const float *c = cos_ + (row / H) * rd, *s = sin_ + (row / H) * rd;
        for (int64_t i = 0; i < rd; i += 2) {
            float x0 = r[i], x1 = r[i + 1];
            r[i] = x0 * c[i] + x1 * (sign * s[i]);
            r[i + 1] = x1 * c[i + 1] + x0 * (sign * s[i + 1]);
        }
    }
}

/* ------------------------------------------------------------------------------------- GEMMs of a few rows
 * out[m, v] = sum_k y[m, k] * w[v, k] in fp32: y [M, K], w [V, K] (a linear's own [out, in] layout, read in place),
 * out [M, V], all row-major, K % 16 == 0, V % 4 == 0. Not a reference-bit-identical kernel: like any GEMM it sums
 * in its own order (16 lanes over k, then a tree over the lanes), the same order for every row count.
 *
 * Why: decode steps multiply a few rows by every weight, and MKL's fp32 kernels run those shapes well below both
 * the memory and the FMA limit: the LM head (129,280 x 512 for `small`) at 4-32 rows, the linears and experts at
 * 1-16 (docs/perf.md). Tiles of 4 weight rows x RM activation
 * rows keep 4 * RM accumulators in registers; the 4 weight rows (4 * K floats) stay in L1 while every activation
 * row passes over them, so the weight is read from memory once whatever the row count, and the next 4 rows are
 * prefetched meanwhile. */
#if defined(__AVX512F__)
#include <immintrin.h>

/* the four horizontal sums of a[0..3] as one vector: pairs of lanes, then pairs of pairs, then the 128-bit
 * quarters (a fixed order, whatever the row count) */
static inline __m128 head_sum4(const __m512 *a) {
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    __m512d d01 = _mm512_castps_pd(s01), d23 = _mm512_castps_pd(s23);
    __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23)));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* RM activation rows x the 4 weight rows at w: out[i, 0..3] for i < RM. `prefetch`: bit r asks for row r of the
 * next 4 weight rows, brought into L1 while this tile computes */
#define HEAD_TILE(RM)                                                                                            \
    static inline void head_tile_##RM(const float *restrict y, const float *restrict w, float *restrict o,        \
                                      int64_t K, int64_t V, int prefetch) {                                      \
        __m512 acc[RM][4];                                                                                       \
        for (int i = 0; i < RM; i++)                                                                             \
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();                                         \
        for (int64_t k = 0; k < K; k += 16) {                                                                    \
            __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + K + k);                                 \
            __m512 w2 = _mm512_loadu_ps(w + 2 * K + k), w3 = _mm512_loadu_ps(w + 3 * K + k);                     \
            for (int r = 0; r < 4; r++)                                                                          \
                if (prefetch & (1 << r)) _mm_prefetch((const char *)(w + (4 + r) * K + k), _MM_HINT_T0);         \
            for (int i = 0; i < RM; i++) {                                                                       \
                __m512 x = _mm512_loadu_ps(y + i * K + k);                                                       \
                acc[i][0] = _mm512_fmadd_ps(x, w0, acc[i][0]);                                                   \
                acc[i][1] = _mm512_fmadd_ps(x, w1, acc[i][1]);                                                   \
                acc[i][2] = _mm512_fmadd_ps(x, w2, acc[i][2]);                                                   \
                acc[i][3] = _mm512_fmadd_ps(x, w3, acc[i][3]);                                                   \
            }                                                                                                    \
        }                                                                                                        \
        for (int i = 0; i < RM; i++) _mm_storeu_ps(o + i * V, head_sum4(acc[i]));                               \
    }
HEAD_TILE(4)
HEAD_TILE(3)
HEAD_TILE(2)
HEAD_TILE(1)

/* Which rows of the next 4 weight rows pass p of npass (one pass per 4 activation rows) prefetches: all in the
 * first pass when there are fewer than 4 passes, else row r in pass r * npass / 4, spreading the memory traffic
 * over the compute (measured: 16 rows 15.9 -> 14.0 ms, 32 rows 25.8 -> 20.9 ms). */
static inline int head_prefetch_rows(int64_t p, int64_t npass) {
    if (npass < 4) return p == 0 ? 15 : 0;
    int mask = 0;
    for (int r = 0; r < 4; r++)
        if ((r * npass) / 4 == p) mask |= 1 << r;
    return mask;
}

int rows_gemm_available(void) { return 1; }

void rows_gemm(const float *restrict y, const float *restrict w, float *restrict out, int64_t M, int64_t K,
               int64_t V, int nt) {
    const int64_t npass = (M + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t v = 0; v < V; v += 4) {
        const float *wv = w + v * K;
        const int more = v + 4 < V; /* there are next rows to prefetch */
        int64_t m = 0, p = 0;
        for (; m + 4 <= M; m += 4, p++)
            head_tile_4(y + m * K, wv, out + m * V + v, K, V, more ? head_prefetch_rows(p, npass) : 0);
        const int pf = more ? head_prefetch_rows(p, npass) : 0;
        switch (M - m) {
            case 3: head_tile_3(y + m * K, wv, out + m * V + v, K, V, pf); break;
            case 2: head_tile_2(y + m * K, wv, out + m * V + v, K, V, pf); break;
            case 1: head_tile_1(y + m * K, wv, out + m * V + v, K, V, pf); break;
        }
    }
}
#else
int rows_gemm_available(void) { return 0; } /* without AVX-512 these GEMMs stay on MKL */

void rows_gemm(const float *y, const float *w, float *out, int64_t M, int64_t K, int64_t V, int nt) {
    (void)y; (void)w; (void)out; (void)M; (void)K; (void)V; (void)nt;
}
#endif
