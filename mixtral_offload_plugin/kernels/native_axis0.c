/* Native CPU kernel for HQQ matrices grouped along axis 0 (hqq 0.1.1, as mixtral-offloading stores them): y = x W^T
 * for a few tokens, reading the packed words in place, with every weight rebuilt exactly as hqq dequantizes it.
 *
 * Built at first use by kernels/axis0_native.py (the same compiler, flags and cache as native.c) and called through
 * ctypes, which releases the GIL; word rows are split over OpenMP threads.
 *
 * A matrix W [out, in] in groups of g rows along axis 0 has R = out / g row classes: weight (r, c) belongs to group
 * (r mod R, c), whose fp16 scale and zero are s[r mod R][c], z[r mod R][c] ([R][in] arrays, dequantized from their
 * 8-bit form at slot load). Packed words ([word_rows][in], uint8 for 2 and 4 bits, int32 for 3 bits) hold `per`
 * values each (4, 10, 2), field f at bit offset 8 - bits (f + 1) (27 - 3 f for 3 bits): word row i field f is row
 *   planar (hqq BitPack):         f * word_rows + i     (rows >= out are padding)
 *   interleaved (mixtral-offloading's own packing):  per * i + f
 * Each weight is w = fp16(fp16(q - z) * s), the two fp16 roundings of hqq's fp16 arithmetic done with the F16C
 * conversions (round to nearest even), so w equals the dequantized reference bit for bit; y sums w x in float32.
 * A cheaper factorisation (y = sum q (s x) - sum z s x) would skip those roundings and differ from the reference by
 * about 2^-11 relative per weight, more than the float32 sums, so it is not used. The roundings are half the work.
 * Paths: the demo layout (2 bits, group 16, hqq's own shape) builds the 4 possible weights of a group once for its 16
 * rows and selects by bits (`class_2bit16`; several tokens: into an L1 tile, then dot products); other layouts build
 * each word row's weights per block of 16 columns for up to 4 (3 bits: 2) tokens in registers (`wordrow_*`), or for
 * many tokens once into an L1 tile (`wordrow_tile`). Without AVX-512 (or built with -DMO_PORTABLE) plain C computes
 * the same weights one at a time.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(MO_PORTABLE) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define MO_AVX512 1
#include <immintrin.h>
#endif

typedef struct {
    const void *q;                 /* [word_rows][in] words: uint8 (2, 4 bits) or int32 (3 bits) */
    const uint16_t *s, *z;         /* fp16 [classes][in] */
    int64_t out, in, classes, word_rows;
    int32_t bits, planar;
} mo_a0mat;

int mo_a0_abi(void) { return 1; }

int mo_a0_simd(void) {
#ifdef MO_AVX512
    return 1;
#else
    return 0;
#endif
}

static inline int per_word(int bits) { return bits == 3 ? 10 : 8 / bits; }

static inline int field_shift(int bits, int f) { return bits == 3 ? 27 - 3 * f : 8 - bits * (f + 1); }

static inline int64_t row_of(const mo_a0mat *m, int64_t i, int f) {
    return m->planar ? (int64_t)f * m->word_rows + i : (int64_t)per_word(m->bits) * i + f;
}

/* -- portable: fp16 rounding in software ---------------------------------------------------------------------- */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, man = h & 1023u, u;
    if (e == 0) { /* zero or subnormal: man * 2^-24 */
        float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    u = e == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((e + 112u) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float round_half(float f) { /* f rounded to the nearest fp16 value, ties to even (finite range) */
    uint32_t u;
    memcpy(&u, &f, 4);
    int e = (int)((u >> 23) & 255u) - 127;
    if (e >= -14) { /* normal fp16: keep 10 mantissa bits */
        u += 0x0fffu + ((u >> 13) & 1u);
        u &= ~0x1fffu;
        memcpy(&f, &u, 4);
        return f;
    }
    return nearbyintf(f * 16777216.0f) * 5.9604644775390625e-8f; /* subnormal fp16: multiples of 2^-24 */
}

__attribute__((unused)) static void wordrow_portable(const mo_a0mat *m, const float *x, float *y, int64_t tokens, int64_t i) {
    int per = per_word(m->bits), mask = (1 << m->bits) - 1;
    for (int f = 0; f < per; f++) {
        int64_t r = row_of(m, i, f);
        if (r >= m->out) continue;
        const uint16_t *sr = m->s + (r % m->classes) * m->in, *zr = m->z + (r % m->classes) * m->in;
        int sh = field_shift(m->bits, f);
        for (int64_t t = 0; t < tokens; t++) {
            const float *xt = x + t * m->in;
            float acc = 0.0f;
            for (int64_t c = 0; c < m->in; c++) {
                int64_t at = i * m->in + c;
                uint32_t word = m->bits == 3 ? (uint32_t)((const int32_t *)m->q)[at] : ((const uint8_t *)m->q)[at];
                float q = (float)((word >> sh) & (uint32_t)mask);
                float w = round_half(round_half(q - half_to_float(zr[c])) * half_to_float(sr[c]));
                acc += w * xt[c];
            }
            y[t * m->out + r] = acc;
        }
    }
}

#ifdef MO_AVX512
/* -- AVX-512: one word row, MC tokens, all `PER` fields at once ----------------------------------------------- */
static inline __m512 round16(__m512 v) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

static inline __m512i load_words(const mo_a0mat *m, int64_t at, __mmask16 mk) {
    if (m->bits == 3) return _mm512_maskz_loadu_epi32(mk, (const int32_t *)m->q + at);
    return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, (const uint8_t *)m->q + at));
}

static inline __m512 weight(__m512i words, int sh, int mask, const uint16_t *sr, const uint16_t *zr, __mmask16 mk) {
    __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(words, (unsigned)sh), _mm512_set1_epi32(mask)));
    __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, sr));
    __m512 z = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, zr));
    return round16(_mm512_mul_ps(round16(_mm512_sub_ps(q, z)), s));
}

/* SHARED: every field of the word row is of one row class (planar words in hqq's own shape), so (s, z) are
 * converted once per column block. */
#define MO_A0_ROW(PER, BITS, MC, SHARED)                                                                             \
    static void wordrow_##PER##_##MC##_##SHARED(const mo_a0mat *m, const float *x, float *y, int64_t i,          \
                                                 int64_t t0) {                                                     \
        int64_t in = m->in, rows[PER];                                                                             \
        const uint16_t *sr[PER], *zr[PER];                                                                         \
        __m512 acc[PER][MC];                                                                                       \
        for (int f = 0; f < PER; f++) {                                                                            \
            rows[f] = row_of(m, i, f);                                                                             \
            int64_t k = rows[f] < m->out ? rows[f] % m->classes : 0;                                               \
            sr[f] = m->s + k * in;                                                                                 \
            zr[f] = m->z + k * in;                                                                                 \
            for (int t = 0; t < MC; t++) acc[f][t] = _mm512_setzero_ps();                                          \
        }                                                                                                          \
        for (int64_t c = 0; c < in; c += 16) {                                                                     \
            __mmask16 mk = in - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (in - c)) - 1u);                  \
            __m512i words = load_words(m, i * in + c, mk);                                                         \
            __m512 xv[MC];                                                                                         \
            for (int t = 0; t < MC; t++) xv[t] = _mm512_maskz_loadu_ps(mk, x + (t0 + t) * in + c);                 \
            __m512 s = _mm512_setzero_ps(), z = s;                                                                 \
            if (SHARED) {                                                                                          \
                s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, sr[0] + c));                                      \
                z = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, zr[0] + c));                                      \
            }                                                                                                      \
            _Pragma("GCC unroll 10") for (int f = 0; f < PER; f++) {                                               \
                __m512 w;                                                                                          \
                if (SHARED) {                                                                                      \
                    __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(                                                \
                        _mm512_srli_epi32(words, (unsigned)field_shift(BITS, f)), _mm512_set1_epi32((1 << BITS) - 1))); \
                    w = round16(_mm512_mul_ps(round16(_mm512_sub_ps(q, z)), s));                                   \
                } else {                                                                                           \
                    w = weight(words, field_shift(BITS, f), (1 << BITS) - 1, sr[f] + c, zr[f] + c, mk);            \
                }                                                                                                  \
                for (int t = 0; t < MC; t++) acc[f][t] = _mm512_fmadd_ps(w, xv[t], acc[f][t]);                     \
            }                                                                                                      \
        }                                                                                                          \
        for (int f = 0; f < PER; f++)                                                                              \
            if (rows[f] < m->out)                                                                                  \
                for (int t = 0; t < MC; t++) y[(t0 + t) * m->out + rows[f]] = _mm512_reduce_add_ps(acc[f][t]);    \
    }

#define MO_A0_ROWS(PER, BITS, MC) MO_A0_ROW(PER, BITS, MC, 0) MO_A0_ROW(PER, BITS, MC, 1)
MO_A0_ROWS(4, 2, 1) MO_A0_ROWS(4, 2, 2) MO_A0_ROWS(4, 2, 3) MO_A0_ROWS(4, 2, 4)
MO_A0_ROWS(10, 3, 1) MO_A0_ROWS(10, 3, 2)
MO_A0_ROWS(2, 4, 1) MO_A0_ROWS(2, 4, 2) MO_A0_ROWS(2, 4, 3) MO_A0_ROWS(2, 4, 4)

typedef void (*row_fn)(const mo_a0mat *, const float *, float *, int64_t, int64_t);
static const row_fn rows2[2][4] = {{wordrow_4_1_0, wordrow_4_2_0, wordrow_4_3_0, wordrow_4_4_0},
                                   {wordrow_4_1_1, wordrow_4_2_1, wordrow_4_3_1, wordrow_4_4_1}};
static const row_fn rows3[2][2] = {{wordrow_10_1_0, wordrow_10_2_0}, {wordrow_10_1_1, wordrow_10_2_1}};
static const row_fn rows4[2][4] = {{wordrow_2_1_0, wordrow_2_2_0, wordrow_2_3_0, wordrow_2_4_0},
                                   {wordrow_2_1_1, wordrow_2_2_1, wordrow_2_3_1, wordrow_2_4_1}};

/* One token, 2 bits in hqq's own shape at group 16 (the demo layout): the 16 rows of class k sit in word rows
 * k + j R (j < 4), 4 fields each. Per column block the 4 possible weights of each column are built once (16 fp16
 * roundings' worth of work shared by 16 rows) and each row selects its weight by its two bits. */
/* the 4 possible weights (v - z) * s, fp16-rounded as hqq computes them, of 16 columns from column c */
static inline void weights2_g16(const uint16_t *sr, const uint16_t *zr, int64_t c, __mmask16 mk, __m512 t[4]) {
    __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, sr + c));
    __m512 z = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, zr + c));
    for (int v = 0; v < 4; v++) t[v] = round16(_mm512_mul_ps(round16(_mm512_sub_ps(_mm512_set1_ps((float)v), z)), s));
}

/* field f's weights of 16 columns: each lane's two bits of `words` select one of the 4 built by weights2_g16 */
static inline __m512 select2(__m512i words, int f, const __m512 t[4]) {
    __mmask16 b0 = _mm512_test_epi32_mask(words, _mm512_set1_epi32(1 << (6 - 2 * f)));
    __mmask16 b1 = _mm512_test_epi32_mask(words, _mm512_set1_epi32(2 << (6 - 2 * f)));
    __m512 lo = _mm512_mask_blend_ps(b0, t[0], t[1]), hi = _mm512_mask_blend_ps(b0, t[2], t[3]);
    return _mm512_mask_blend_ps(b1, lo, hi);
}

static void class_2bit16(const mo_a0mat *m, const float *x, float *y, int64_t k) {
    int64_t in = m->in, R = m->classes;
    const uint8_t *q = (const uint8_t *)m->q;
    const uint16_t *sr = m->s + k * in, *zr = m->z + k * in;
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < in; c += 16) {
        __mmask16 mk = in - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (in - c)) - 1u);
        __m512 t[4], xv = _mm512_maskz_loadu_ps(mk, x + c);
        weights2_g16(sr, zr, c, mk, t);
        for (int j = 0; j < 4; j++) {
            __m512i words = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, q + (k + j * R) * in + c));
            for (int f = 0; f < 4; f++) acc[4 * f + j] = _mm512_fmadd_ps(select2(words, f, t), xv, acc[4 * f + j]);
        }
    }
    for (int r = 0; r < 16; r++) y[k + r * R] = _mm512_reduce_add_ps(acc[r]); /* row f * 4R + k + j R, r = 4 f + j */
}

#include "native_axis0_tiles.h" /* many tokens: weights built once into an L1 tile, then dots */

static void wordrow_avx512(const mo_a0mat *m, const float *x, float *y, int64_t tokens, int64_t i, int shared) {
    int most = m->bits == 3 ? 2 : 4;
    const row_fn *fns = m->bits == 2 ? rows2[shared] : m->bits == 3 ? rows3[shared] : rows4[shared];
    for (int64_t t0 = 0; t0 < tokens; t0 += most) {
        int64_t mc = tokens - t0 < most ? tokens - t0 : most;
        fns[mc - 1](m, x, y, i, t0);
    }
}
#endif /* MO_AVX512 */

/* whether every field of every word row lies in one row class: planar rows f * word_rows + i with word_rows a
 * multiple of the class count */
static int shared_classes(const mo_a0mat *m) { return m->planar && m->word_rows % m->classes == 0; }

/* y [tokens][out] = x [tokens][in] W^T, float32. Returns 0, or -2 for a matrix this kernel does not read. */
int mo_a0_mm(const mo_a0mat *m, const float *x, float *y, int64_t tokens, int nthreads) {
    if (m->bits != 2 && m->bits != 3 && m->bits != 4) return -2;
    if (m->classes <= 0 || m->out % m->classes || m->word_rows * per_word(m->bits) < m->out) return -2;
    int shared = shared_classes(m);
    (void)shared;
#ifdef MO_AVX512
    if (m->bits == 2 && m->planar && m->word_rows == 4 * m->classes && m->out == 16 * m->classes) {
        int failed = 0;
        #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : failed)
        for (int64_t k = 0; k < m->classes; k++) {
            if (tokens == 1)
                class_2bit16(m, x, y, k);
            else
                failed |= class_2bit16_tile(m, x, y, tokens, k);
        }
        return failed ? -1 : 0;
    }
#endif
    int failed = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : failed)
    for (int64_t i = 0; i < m->word_rows; i++) {
#ifdef MO_AVX512
        if (tokens >= (m->bits == 3 ? 5 : 12)) /* where building the weights once beats passes of 2 or 4 tokens */
            failed |= wordrow_tile(m, x, y, tokens, i, shared);
        else
            wordrow_avx512(m, x, y, tokens, i, shared);
#else
        wordrow_portable(m, x, y, tokens, i);
#endif
    }
    return failed ? -1 : 0;
}

/* y [tokens][H] = w2(silu(w1 x) * (w3 x)) with float32 between the matrices; h: scratch of 2 * tokens * I floats. */
int mo_a0_expert_silu(const mo_a0mat *w1, const mo_a0mat *w3, const mo_a0mat *w2, const float *x, float *y,
                      float *h, int64_t tokens, int nthreads) {
    int64_t inter = w1->out;
    if (w3->out != inter || w2->in != inter || w1->in != w2->out || w3->in != w1->in) return -3;
    float *g = h, *u = h + tokens * inter;
    int rc = mo_a0_mm(w1, x, g, tokens, nthreads);
    if (rc == 0) rc = mo_a0_mm(w3, x, u, tokens, nthreads);
    if (rc) return rc;
    for (int64_t j = 0; j < tokens * inter; j++) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    return mo_a0_mm(w2, g, y, tokens, nthreads);
}

static inline uint16_t half_bits(float f) { /* the fp16 bits of a float that holds an fp16 value (or +-inf) */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    float a = fabsf(f);
    if (a >= 65536.0f) return sign | 0x7c00u;
    if (a < 6.103515625e-05f) return sign | (uint16_t)(a * 16777216.0f); /* subnormal: a multiple of 2^-24 */
    return sign | (uint16_t)(((((u >> 23) & 255u) - 112u) << 10) | ((u >> 13) & 1023u));
}

/* out[j] = fp16(fp16(q[j] - zero[p]) * scale[p]), p = j mod period (period 1: one zero and scale for all), j < n, n a
 * multiple of period: the 8-bit scales or zeros of a matrix dequantized as hqq does (fp16 in and out), at slot load. */
int mo_a0_meta(const uint8_t *q, const uint16_t *zero, const uint16_t *scale, int64_t n, int64_t period,
               uint16_t *out) {
    if (period <= 0 || n % period) return -2;
    int64_t width = period == 1 ? n : period;
    for (int64_t row = 0; row < n; row += width) {
        int64_t c = 0;
#ifdef MO_AVX512
        for (; c < width; c += 16) {
            __mmask16 mk = width - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (width - c)) - 1u);
            __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, q + row + c)));
            __m512 z = period == 1 ? _mm512_set1_ps(half_to_float(zero[0]))
                                   : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, zero + c));
            __m512 s = period == 1 ? _mm512_set1_ps(half_to_float(scale[0]))
                                   : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, scale + c));
            __m256i h = _mm512_cvtps_ph(_mm512_mul_ps(round16(_mm512_sub_ps(v, z)), s),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm256_mask_storeu_epi16(out + row + c, mk, h);
        }
#endif
        for (; c < width; c++) {
            int64_t p = period == 1 ? 0 : c;
            float v = round_half(round_half((float)q[row + c] - half_to_float(zero[p])) * half_to_float(scale[p]));
            out[row + c] = half_bits(v);
        }
    }
    return 0;
}
