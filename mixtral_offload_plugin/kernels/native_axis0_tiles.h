/* Included by native_axis0.c (inside its AVX-512 part; not a standalone header): the paths for several tokens that
 * build weights once into a float32 tile in L1 and then run register-blocked dot products, `wordrow_tile` (any layout)
 * and `class_2bit16_tile` (the demo layout). kernels/native.py hashes this file with native_axis0.c for its cache. */
/* sums[f][t] += tile row f . x[t] over `width` columns (tile rows TILE_COLS apart, zero-padded to whole blocks of
 * 16; x rows `in` apart) for NF rows and NT tokens: NF * NT sums in registers, NF + NT loads per NF * NT products */
#define MO_DOT(NF, NT)                                                                                               \
    static void dot_##NF##_##NT(const float *w, const float *x, int64_t in, int64_t width, float *sums,            \
                                int64_t tokens) {                                                                  \
        __m512 a[NF][NT];                                                                                          \
        for (int f = 0; f < NF; f++)                                                                               \
            for (int t = 0; t < NT; t++) a[f][t] = _mm512_setzero_ps();                                            \
        for (int64_t c = 0; c < width; c += 16) {                                                                  \
            __mmask16 mk = width - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (width - c)) - 1u);            \
            __m512 xv[NT];                                                                                         \
            for (int t = 0; t < NT; t++) xv[t] = _mm512_maskz_loadu_ps(mk, x + t * in + c);                        \
            for (int f = 0; f < NF; f++) {                                                                         \
                __m512 wv = _mm512_load_ps(w + f * TILE_COLS + c);                                                 \
                for (int t = 0; t < NT; t++) a[f][t] = _mm512_fmadd_ps(wv, xv[t], a[f][t]);                       \
            }                                                                                                      \
        }                                                                                                          \
        for (int f = 0; f < NF; f++)                                                                               \
            for (int t = 0; t < NT; t++) sums[f * tokens + t] += _mm512_reduce_add_ps(a[f][t]);                    \
    }
#define TILE_COLS 512 /* columns per tile chunk: per * 512 floats stay in L1 (20 KiB at 3 bits) */
MO_DOT(1, 1) MO_DOT(1, 4) MO_DOT(2, 1) MO_DOT(2, 4) MO_DOT(4, 1) MO_DOT(4, 4)
static __thread float *tl_tile;
static __thread size_t tl_tile_cap;

/* Many tokens: the word row's weights are built once per chunk of columns into a float32 tile (zero-padded to
 * whole blocks of 16, in L1) and every token is a plain dot product with it. Returns -1 when the tile (or the
 * partial sums) cannot be allocated. */
static int wordrow_tile(const mo_a0mat *m, const float *x, float *y, int64_t tokens, int64_t i, int shared) {
    int per = per_word(m->bits), mask = (1 << m->bits) - 1, nf = 0;
    int64_t in = m->in, rows[10];
    const uint16_t *sr[10], *zr[10];
    size_t need = (size_t)(per * TILE_COLS + per * tokens) * sizeof(float);
    if (tl_tile_cap < need) {
        free(tl_tile);
        tl_tile = (float *)aligned_alloc(64, (need + 63) & ~(size_t)63);
        tl_tile_cap = tl_tile ? need : 0;
        if (tl_tile == NULL) return -1;
    }
    float *sums = tl_tile + per * TILE_COLS; /* [per][tokens] */
    for (; nf < per && row_of(m, i, nf) < m->out; nf++) { /* rows grow with the field: the rest is padding */
        rows[nf] = row_of(m, i, nf);
        sr[nf] = m->s + (rows[nf] % m->classes) * in;
        zr[nf] = m->z + (rows[nf] % m->classes) * in;
    }
    memset(sums, 0, (size_t)(per * tokens) * sizeof(float));
    for (int64_t c0 = 0; c0 < in; c0 += TILE_COLS) {
        int64_t width = in - c0 < TILE_COLS ? in - c0 : TILE_COLS;
        for (int64_t c = c0; c < c0 + width; c += 16) {
            __mmask16 mk = in - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (in - c)) - 1u);
            __m512i words = load_words(m, i * in + c, mk);
            __m512 s = _mm512_setzero_ps(), z = s;
            if (shared) {
                s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, sr[0] + c));
                z = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, zr[0] + c));
            }
            for (int f = 0; f < nf; f++) {
                int sh = field_shift(m->bits, f);
                __m512 w;
                if (shared) {
                    __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(words, (unsigned)sh),
                                                                   _mm512_set1_epi32(mask)));
                    w = round16(_mm512_mul_ps(round16(_mm512_sub_ps(q, z)), s));
                } else {
                    w = weight(words, sh, mask, sr[f] + c, zr[f] + c, mk);
                }
                _mm512_store_ps(tl_tile + f * TILE_COLS + (c - c0), w);
            }
        }
        for (int f = 0; f < nf;) {
            int step = nf - f >= 4 ? 4 : nf - f >= 2 ? 2 : 1;
            const float *w = tl_tile + f * TILE_COLS;
            int64_t t = 0;
            for (; t + 4 <= tokens; t += 4) {
                float *at = sums + f * tokens + t;
                if (step == 4) dot_4_4(w, x + t * in + c0, in, width, at, tokens);
                else if (step == 2) dot_2_4(w, x + t * in + c0, in, width, at, tokens);
                else dot_1_4(w, x + t * in + c0, in, width, at, tokens);
            }
            for (; t < tokens; t++) {
                float *at = sums + f * tokens + t;
                if (step == 4) dot_4_1(w, x + t * in + c0, in, width, at, tokens);
                else if (step == 2) dot_2_1(w, x + t * in + c0, in, width, at, tokens);
                else dot_1_1(w, x + t * in + c0, in, width, at, tokens);
            }
            f += step;
        }
    }
    for (int f = 0; f < nf; f++)
        for (int64_t t = 0; t < tokens; t++) y[t * m->out + rows[f]] = sums[f * tokens + t];
    return 0;
}

/* Several tokens, the demo layout: class k's 16 rows are selected as in class_2bit16 into a float32 tile, 256 columns
 * at a time, then every token is a register-blocked dot product with it. */
static int class_2bit16_tile(const mo_a0mat *m, const float *x, float *y, int64_t tokens, int64_t k) {
    int64_t in = m->in, R = m->classes;
    const uint8_t *q = (const uint8_t *)m->q;
    const uint16_t *sr = m->s + k * in, *zr = m->z + k * in;
    size_t need = (size_t)(16 * TILE_COLS + 16 * tokens) * sizeof(float);
    if (tl_tile_cap < need) {
        free(tl_tile);
        tl_tile = (float *)aligned_alloc(64, (need + 63) & ~(size_t)63);
        tl_tile_cap = tl_tile ? need : 0;
        if (tl_tile == NULL) return -1;
    }
    float *sums = tl_tile + 16 * TILE_COLS; /* [16 rows][tokens], row r = 4 f + j is k + r R */
    memset(sums, 0, (size_t)(16 * tokens) * sizeof(float));
    for (int64_t c0 = 0; c0 < in; c0 += 256) {
        int64_t width = in - c0 < 256 ? in - c0 : 256;
        for (int64_t c = c0; c < c0 + width; c += 16) {
            __mmask16 mk = in - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (in - c)) - 1u);
            __m512 t[4];
            weights2_g16(sr, zr, c, mk, t);
            for (int j = 0; j < 4; j++) {
                __m512i words = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, q + (k + j * R) * in + c));
                for (int f = 0; f < 4; f++)
                    _mm512_store_ps(tl_tile + (4 * f + j) * TILE_COLS + (c - c0), select2(words, f, t));
            }
        }
        for (int r = 0; r < 16; r += 4) {
            int64_t t = 0;
            for (; t + 4 <= tokens; t += 4)
                dot_4_4(tl_tile + r * TILE_COLS, x + t * in + c0, in, width, sums + r * tokens + t, tokens);
            for (; t < tokens; t++)
                dot_4_1(tl_tile + r * TILE_COLS, x + t * in + c0, in, width, sums + r * tokens + t, tokens);
        }
    }
    for (int r = 0; r < 16; r++)
        for (int64_t t = 0; t < tokens; t++) y[t * m->out + k + r * R] = sums[r * tokens + t];
    return 0;
}
