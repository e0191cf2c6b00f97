/* native_dense.h: bfloat16 matrices (lm_head, 16-bit attention and experts): y = x W^T with
 * AVX512-BF16 dot products where the CPU has them.
 * Part of native.c's one translation unit (included there, in order); not compiled alone. */

#ifdef MO_AVX512
static inline __m512 dot_bf16(__m512 a, __m512i w, __m512i x) {
#ifdef __AVX512BF16__
    return _mm512_dpbf16_ps(a, (__m512bh)w, (__m512bh)x);
#else
    __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    __m512 wl = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), xl = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    __m512 wh = _mm512_castsi512_ps(_mm512_and_si512(w, hi)), xh = _mm512_castsi512_ps(_mm512_and_si512(x, hi));
    return _mm512_fmadd_ps(wh, xh, _mm512_fmadd_ps(wl, xl, a));
#endif
}

/* four rows for one token: full 32-wide steps, then one masked step */
static inline void rows4_bf16(const uint16_t *w, const uint16_t *xt, int64_t k, float out[4]) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const uint16_t *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;
    int64_t c = 0;
    for (; c + 32 <= k; c += 32) {
        __m512i xv = _mm512_loadu_si512((const void *)(xt + c));
        a0 = dot_bf16(a0, _mm512_loadu_si512((const void *)(w0 + c)), xv);
        a1 = dot_bf16(a1, _mm512_loadu_si512((const void *)(w1 + c)), xv);
        a2 = dot_bf16(a2, _mm512_loadu_si512((const void *)(w2 + c)), xv);
        a3 = dot_bf16(a3, _mm512_loadu_si512((const void *)(w3 + c)), xv);
    }
    if (c < k) {
        __mmask32 mk = (__mmask32)((1u << (k - c)) - 1u);
        __m512i xv = _mm512_maskz_loadu_epi16(mk, xt + c);
        a0 = dot_bf16(a0, _mm512_maskz_loadu_epi16(mk, w0 + c), xv);
        a1 = dot_bf16(a1, _mm512_maskz_loadu_epi16(mk, w1 + c), xv);
        a2 = dot_bf16(a2, _mm512_maskz_loadu_epi16(mk, w2 + c), xv);
        a3 = dot_bf16(a3, _mm512_maskz_loadu_epi16(mk, w3 + c), xv);
    }
    out[0] = _mm512_reduce_add_ps(a0);
    out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2);
    out[3] = _mm512_reduce_add_ps(a3);
}
#endif

static inline float row_bf16(const uint16_t *w, const uint16_t *xt, int64_t k) {
    float s = 0.0f;
    for (int64_t c = 0; c < k; c++) s += bf16_to_f32(w[c]) * bf16_to_f32(xt[c]);
    return s;
}


/* y [tokens][N] = x [tokens][K] W^T for bfloat16 W [N][K] (row-major) and bfloat16 x; float32 sums. Rows are taken
 * four at a time with every token, so a row chunk is read from memory once. */
int mo_dense_bf16(const uint16_t *w, const uint16_t *x, void *y, int y_bf16, int64_t tokens, int64_t n, int64_t k,
                  int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r += 4) {
        for (int64_t t = 0; t < tokens; t++) {
            const uint16_t *xt = x + t * k;
#ifdef MO_AVX512
            float out[4];
            if (r + 4 <= n) {
                rows4_bf16(w + r * k, xt, k, out);
                for (int i = 0; i < 4; i++) store_row(y, y_bf16, t * n + r + i, out[i]);
                continue;
            }
#endif
            for (int64_t i = r; i < n && i < r + 4; i++) store_row(y, y_bf16, t * n + i, row_bf16(w + i * k, xt, k));
        }
    }
    return 0;
}
