/* Form 2 of mo_qmat (included by native.c): 8-bit values, q [N][K] bytes row-major, w = (q - z) * s with s = sz and
 * z = zp, both [N][G] (bfloat16 or float32 per sz_bf16). Computed as y = sum over groups of s (dot_g - z sum_g x),
 * four rows at a time so that four independent sums hide the FMA latency; x and its group sums from load_x. */

static inline float u8_meta(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static void u8_row_plain(const mo_qmat *m, const float *x, const float *sx, void *y, int y_bf16, int64_t t,
                         int64_t r) {
    int64_t k = m->k, gs = m->gs, G = k / gs;
    const uint8_t *q = m->q + r * k;
    const float *xt = x + t * k;
    float total = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        float d = 0.0f;
        for (int64_t c = g * gs; c < (g + 1) * gs; c++) d += (float)q[c] * xt[c];
        total += u8_meta(m->sz, m->sz_bf16, r * G + g) * (d - u8_meta(m->zp, m->sz_bf16, r * G + g) * sx[t * G + g]);
    }
    store_row(y, y_bf16, t * m->n + r, total);
}

/* rows [r0, r1) for every token */
static void u8_rows(const mo_qmat *m, const float *x, const float *sx, void *y, int y_bf16, int64_t tokens, int64_t r0,
                    int64_t r1) {
    int64_t k = m->k, gs = m->gs, G = k / gs;
    int64_t r = r0;
#ifdef MO_AVX512
    if (gs % 16 == 0)
        for (; r + 4 <= r1; r += 4)
            for (int64_t t = 0; t < tokens; t++) {
                const float *xt = x + t * k;
                __m512 tot[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                float zero_terms[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                for (int64_t g = 0; g < G; g++) {
                    if (t == 0) /* the hardware prefetcher alone leaves four row streams at a third of the bandwidth */
                        for (int i = 0; i < 4; i++)
                            _mm_prefetch((const char *)(m->q + (r + i) * k + g * gs) + MO_PREFETCH, _MM_HINT_T0);
                    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                                     _mm512_setzero_ps()};
                    for (int64_t c = g * gs; c < (g + 1) * gs; c += 16) {
                        __m512 xv = _mm512_loadu_ps(xt + c);
                        for (int i = 0; i < 4; i++) acc[i] = _mm512_fmadd_ps(u8x16_ps(m->q + (r + i) * k + c), xv, acc[i]);
                    }
                    for (int i = 0; i < 4; i++) {
                        float s = u8_meta(m->sz, m->sz_bf16, (r + i) * G + g);
                        tot[i] = _mm512_fmadd_ps(_mm512_set1_ps(s), acc[i], tot[i]);
                        zero_terms[i] += s * u8_meta(m->zp, m->sz_bf16, (r + i) * G + g) * sx[t * G + g];
                    }
                }
                for (int i = 0; i < 4; i++)
                    store_row(y, y_bf16, t * m->n + r + i, _mm512_reduce_add_ps(tot[i]) - zero_terms[i]);
            }
#endif
    for (; r < r1; r++)
        for (int64_t t = 0; t < tokens; t++) u8_row_plain(m, x, sx, y, y_bf16, t, r);
}
