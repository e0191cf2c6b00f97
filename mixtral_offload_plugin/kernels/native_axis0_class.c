/* Class-major kernel for 3-bit HQQ axis-0 matrices (the 4bit-3bit mixtral-offloading release: group 64), a companion
 * of native_axis0.c built and loaded the same way by kernels/axis0_native.py.
 *
 * In an axis-0 group (k, c) (row class k = r mod R, column c) the g = out / R weights share one scale and zero, so
 * they take only 8 values: T[v] = fp16(fp16(v - z) * s), v < 8, exactly hqq's dequantized weights. Vectorizing over
 * the rows of a group instead of the columns, the 8 values are one table per column and each row's weight is one
 * lane permutation (vpermps) of it: the fp16 roundings are done 8 times per group instead of once per weight.
 *
 * That needs the 3-bit values of a group's rows side by side: `mo_a0c_repack` rewrites a matrix's stored words (any
 * packing, see native_axis0.c) once per slot load into qr[k][c][g * 3 / 8 bytes], rows k + m R in chunks of 16
 * (6 bytes each; value of row m at bit 3 (m mod 16) of chunk m / 16), 2 bytes of padding after the last. Needs
 * AVX-512 VBMI (vpmultishiftqb spreads a chunk's 16 values over 16 lanes); `mo_a0c_available` says whether built so.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { /* the same as mo_a0mat in native_axis0.c */
    const void *q;
    const uint16_t *s, *z;
    int64_t out, in, classes, word_rows;
    int32_t bits, planar;
} mo_a0mat;

#if !defined(MO_PORTABLE) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__AVX512VBMI__)
#define MO_A0C 1
#include <immintrin.h>
#endif

int mo_a0c_abi(void) { return 1; }

/* bytes of the repacked values of a matrix (0: this build or this matrix cannot use the class-major kernel) */
int64_t mo_a0c_nbytes(const mo_a0mat *m) {
#ifdef MO_A0C
    int64_t g = m->classes > 0 ? m->out / m->classes : 0;
    if (m->bits == 3 && g > 0 && g % 16 == 0 && g <= 128 && m->out % m->classes == 0)
        return m->out * m->in * 3 / 8 + 8;
#endif
    (void)m;
    return 0;
}

#ifdef MO_A0C
static inline int64_t row_word(const mo_a0mat *m, int64_t r, int *shift) {
    int64_t i = m->planar ? r % m->word_rows : r / 10;
    int f = (int)(m->planar ? r / m->word_rows : r % 10);
    *shift = 27 - 3 * f;
    return i;
}

static inline __m512 round16(__m512 v) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

/* qr (mo_a0c_nbytes bytes) = the values of m, class-major. Returns 0, -1 (no memory) or -2 (not readable). */
int mo_a0c_repack(const mo_a0mat *m, uint8_t *qr, int nthreads) {
    if (mo_a0c_nbytes(m) == 0) return -2;
#ifdef MO_A0C
    int64_t in = m->in, R = m->classes, chunks = m->out / R / 16, bytes = chunks * 6;
    const int32_t *words = (const int32_t *)m->q;
    int64_t *where = (int64_t *)malloc((size_t)m->out * sizeof(int64_t)); /* row -> word offset * 32 + shift */
    if (where == NULL) return -1;
    for (int64_t r = 0; r < m->out; r++) {
        int sh;
        int64_t i = row_word(m, r, &sh);
        where[r] = i * in * 32 + sh;
    }
    memset(qr + m->out * in * 3 / 8, 0, 8);
    for (int64_t c0 = 0; c0 < in; c0 += 16) { /* columns outside: a word row's 64 bytes serve all its classes */
        int64_t width = in - c0 < 16 ? in - c0 : 16;
        __mmask16 mk = (__mmask16)((1u << width) - 1u);
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t k = 0; k < R; k++) {
            for (int64_t j = 0; j < chunks; j++) {
                __m512i lo = _mm512_setzero_si512(), hi = lo; /* columns c0..c0+7, c0+8..c0+15: one qword each */
                for (int l = 0; l < 16; l++) {
                    int64_t at = where[k + (16 * j + l) * R];
                    __m512i w = _mm512_maskz_loadu_epi32(mk, words + (at >> 5) + c0);
                    __m512i v = _mm512_and_si512(_mm512_srli_epi32(w, (unsigned)(at & 31)), _mm512_set1_epi32(7));
                    lo = _mm512_or_si512(lo, _mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(v)),
                                                               (unsigned)(3 * l)));
                    hi = _mm512_or_si512(hi, _mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(v, 1)),
                                                               (unsigned)(3 * l)));
                }
                uint64_t q[16];
                _mm512_storeu_si512((void *)q, lo);
                _mm512_storeu_si512((void *)(q + 8), hi);
                for (int64_t c = 0; c < width; c++) memcpy(qr + (k * in + c0 + c) * bytes + 6 * j, q + c, 6);
            }
        }
    }
    free(where);
    return 0;
#else
    (void)qr;
    (void)nthreads;
    return -2;
#endif
}

#ifdef MO_A0C
/* the 8-entry tables of 16 columns of class k into tb: column c's 8 floats at tb + 32 (c mod 4) + 8 (c / 4) */
static inline void tables(const mo_a0mat *m, int64_t k, int64_t c0, __mmask16 mk, float *tb) {
    __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, m->s + k * m->in + c0));
    __m512 z = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, m->z + k * m->in + c0));
    __m512 t[8];
    for (int v = 0; v < 8; v++) t[v] = round16(_mm512_mul_ps(round16(_mm512_sub_ps(_mm512_set1_ps((float)v), z)), s));
    __m512 lo[4], hi[4]; /* lo[r] / hi[r]: 128-bit lane i holds entries 0-3 / 4-7 of column 4 i + r */
    for (int h = 0; h < 2; h++) {
        __m512 a = _mm512_unpacklo_ps(t[4 * h], t[4 * h + 1]), b = _mm512_unpacklo_ps(t[4 * h + 2], t[4 * h + 3]);
        __m512 c = _mm512_unpackhi_ps(t[4 * h], t[4 * h + 1]), d = _mm512_unpackhi_ps(t[4 * h + 2], t[4 * h + 3]);
        __m512 *out = h ? hi : lo;
        out[0] = _mm512_shuffle_ps(a, b, 0x44);
        out[1] = _mm512_shuffle_ps(a, b, 0xEE);
        out[2] = _mm512_shuffle_ps(c, d, 0x44);
        out[3] = _mm512_shuffle_ps(c, d, 0xEE);
    }
    const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    for (int r = 0; r < 4; r++) {
        _mm512_store_ps(tb + 32 * r, _mm512_permutex2var_ps(lo[r], first, hi[r]));
        _mm512_store_ps(tb + 32 * r + 16, _mm512_permutex2var_ps(lo[r], second, hi[r]));
    }
}

/* class k, tokens t0 .. t0 + MC - 1, CH chunks of 16 rows: CH * MC sums in registers */
#define MO_A0C_CLASS(CH, MC)                                                                                         \
    static void class_##CH##_##MC(const mo_a0mat *m, const uint8_t *qr, const float *x, float *y, int64_t k,       \
                                  int64_t t0, float *tb) {                                                          \
        int64_t in = m->in, R = m->classes;                                                                          \
        /* lane l's low byte: bits 3 l .. 3 l + 7 of the chunk (vpermps reads its low 4 bits; the table repeats) */   \
        const __m512i spread = _mm512_set_epi32(45, 42, 39, 36, 33, 30, 27, 24, 21, 18, 15, 12, 9, 6, 3, 0);         \
        __m512 acc[CH][MC];                                                                                          \
        float sums[CH][MC][16]; /* partial sums flushed every 256 columns: shorter float32 chains */                \
        memset(sums, 0, sizeof(sums));                                                                               \
        for (int j = 0; j < CH; j++)                                                                                 \
            for (int t = 0; t < MC; t++) acc[j][t] = _mm512_setzero_ps();                                            \
        for (int64_t c0 = 0; c0 < in; c0 += 16) {                                                                   \
            int64_t width = in - c0 < 16 ? in - c0 : 16;                                                             \
            if (c0 % 256 == 0 && c0 > 0)                                                                             \
                for (int j = 0; j < CH; j++)                                                                         \
                    for (int t = 0; t < MC; t++) {                                                                   \
                        _mm512_storeu_ps(sums[j][t], _mm512_add_ps(_mm512_loadu_ps(sums[j][t]), acc[j][t]));       \
                        acc[j][t] = _mm512_setzero_ps();                                                             \
                    }                                                                                                \
            tables(m, k, c0, (__mmask16)((1u << width) - 1u), tb);                                                  \
            const uint8_t *q = qr + (k * in + c0) * 6 * CH;                                                          \
            for (int64_t c = 0; c < width; c++, q += 6 * CH) {                                                       \
                __m512 table = _mm512_broadcast_f32x8(_mm256_load_ps(tb + 32 * (c & 3) + 8 * (c >> 2)));            \
                for (int j = 0; j < CH; j++) {                                                                       \
                    uint64_t bits;                                                                                   \
                    memcpy(&bits, q + 6 * j, 8);                                                                     \
                    __m512i idx = _mm512_multishift_epi64_epi8(spread, _mm512_set1_epi64((long long)bits));         \
                    __m512 w = _mm512_permutexvar_ps(idx, table);                                                    \
                    for (int t = 0; t < MC; t++)                                                                     \
                        acc[j][t] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[(t0 + t) * in + c0 + c]), acc[j][t]);       \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
        for (int j = 0; j < CH; j++)                                                                                 \
            for (int t = 0; t < MC; t++) {                                                                           \
                float out[16];                                                                                       \
                _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(sums[j][t]), acc[j][t]));                     \
                for (int l = 0; l < 16; l++) y[(t0 + t) * m->out + k + (16 * j + l) * R] = out[l];                  \
            }                                                                                                        \
    }
MO_A0C_CLASS(1, 1) MO_A0C_CLASS(1, 2) MO_A0C_CLASS(1, 4)
MO_A0C_CLASS(2, 1) MO_A0C_CLASS(2, 2) MO_A0C_CLASS(2, 4)
MO_A0C_CLASS(4, 1) MO_A0C_CLASS(4, 2) MO_A0C_CLASS(4, 4)
MO_A0C_CLASS(8, 1) MO_A0C_CLASS(8, 2)

typedef void (*class_fn)(const mo_a0mat *, const uint8_t *, const float *, float *, int64_t, int64_t, float *);
static const class_fn fns[4][3] = {{class_1_1, class_1_2, class_1_4}, {class_2_1, class_2_2, class_2_4},
                                   {class_4_1, class_4_2, class_4_4}, {class_8_1, class_8_2, class_8_2}};
#endif

/* y [tokens][out] = x [tokens][in] W^T, float32, from the repacked values qr. Returns 0, or -2 (not readable). */
int mo_a0c_mm(const mo_a0mat *m, const uint8_t *qr, const float *x, float *y, int64_t tokens, int nthreads) {
    if (mo_a0c_nbytes(m) == 0) return -2;
#ifdef MO_A0C
    int64_t chunks = m->out / m->classes / 16;
    int row = chunks == 1 ? 0 : chunks == 2 ? 1 : chunks == 4 ? 2 : 3, most = chunks == 8 ? 2 : 4;
    if (chunks != 1 && chunks != 2 && chunks != 4 && chunks != 8) return -2;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t k = 0; k < m->classes; k++) {
        float tb[128] __attribute__((aligned(64)));
        for (int64_t t0 = 0; t0 < tokens;) {
            int64_t left = tokens - t0;
            int mc = left >= most ? most : left >= 2 ? 2 : 1;
            fns[row][mc == 4 ? 2 : mc - 1](m, qr, x, y, k, t0, tb);
            t0 += mc;
        }
    }
    return 0;
#else
    (void)qr, (void)x, (void)y, (void)tokens, (void)nthreads;
    return -2;
#endif
}
