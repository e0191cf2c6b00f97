/* native_expert.h: one expert's MLP, down(silu(gate) * up), on two quantized matrices.
 * Part of native.c's one translation unit (included there, in order); not compiled alone. */

/* -- one expert's MLP: down(silu(gate) * up) with [gate; up] = gate_up x ----------------------------------------- */
#ifdef MO_AVX512
static inline __m512 exp512(__m512 x) { /* exp to about 2 ulp: 2^n * p(r), |r| <= ln2 / 2 */
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.98756912e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.39819994e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.33345205e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.16657962e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.66666657e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.00000001e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* a[t][i] = silu(h[t][i]) * h[t][I + i], packed to [tokens][I] in place (h is [tokens][2I]) */
static void silu_mul(float *h, int64_t tokens, int64_t inter) {
    for (int64_t t = 0; t < tokens; t++) {
        const float *g = h + t * 2 * inter, *u = g + inter;
        float *a = h + t * inter;
        int64_t i = 0;
#ifdef MO_AVX512
        for (; i + 16 <= inter; i += 16) {
            __m512 gv = _mm512_loadu_ps(g + i);
            __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            __m512 sg = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            _mm512_storeu_ps(a + i, _mm512_mul_ps(sg, _mm512_loadu_ps(u + i)));
        }
#endif
        for (; i < inter; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* y [tokens][H] = down(silu(gate) * up) for one token batch x [tokens][H]; float32 between the two matrices, except
 * that with bfloat16 activations (a bf16 model) silu(gate) * up is rounded to bfloat16, as the model's own MLP holds
 * it, so the down projection takes the bf16 pair path (two columns per instruction) instead of the float one. */
int mo_expert_silu(const mo_qmat *gate_up, const mo_qmat *down, const void *x, int x_bf16, void *y, int y_bf16,
                   int64_t tokens, int nthreads) {
    int64_t inter = down->k;
    if (gate_up->n != 2 * inter) return -2;
    float *h = (float *)tl_grow(&tl_h, &tl_h_cap, (size_t)(tokens * 2 * inter) * sizeof(float));
    if (h == NULL) return -1;
    int rc = mo_quant_mm(gate_up, x, x_bf16, h, 0, tokens, nthreads);
    if (rc) return rc;
    silu_mul(h, tokens, inter);
    if (!x_bf16) return mo_quant_mm(down, h, 0, y, y_bf16, tokens, nthreads);
    uint16_t *hb = (uint16_t *)(h + tokens * inter); /* the up half, free once silu_mul has packed its results */
    for (int64_t i = 0; i < tokens * inter; i++) hb[i] = f32_to_bf16(h[i]);
    return mo_quant_mm(down, hb, 1, y, y_bf16, tokens, nthreads);
}
