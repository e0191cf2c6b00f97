/* native_int4.h: forms 0 (torch's int4pack) and 1 (2/3-bit planes): the nibble order, the generic
 * rows, one block of 64 rows portable and with AVX-512 (float and bf16-pair paths).
 * Part of native.c's one translation unit (included there, in order); not compiled alone. */

/* the nibble sequence index of (row, col) in torch's int4pack layout */
static inline int64_t nib_index(int64_t n, int64_t k, int64_t row, int64_t col) {
    int64_t nb = n / 64;
    if (row < nb * 64) {
        int64_t b = row / 64, r = row % 64;
        return ((b * k + col) * 32 + (r & 31)) * 2 + (r >> 5);
    }
    int64_t r = n - nb * 64, t = row - nb * 64;
    return nb * 64 * k + (col * (r / 2) + t / 2) * 2 + (t & 1);
}

static inline int val_at(const mo_qmat *m, int64_t nib) {
    if (m->form == 0) {
        uint8_t b = m->q[nib >> 1];
        return (nib & 1) ? b >> 4 : b & 15;
    }
    int v = (m->q[nib >> 2] >> (2 * (nib & 3))) & 3;
    if (m->hi) v |= ((m->hi[nib >> 3] >> (nib & 7)) & 1) << 2;
    return v;
}


/* rows [r0, r1) for all tokens, one weight at a time (the rows after the last full block of 64) */
static void rows_generic(const mo_qmat *m, const float *x, const float *sx, void *y, int y_bf16, int64_t tokens,
                         int64_t r0, int64_t r1) {
    int64_t G = m->k / m->gs;
    for (int64_t row = r0; row < r1; row++) {
        for (int64_t t = 0; t < tokens; t++) {
            const float *xt = x + t * m->k;
            float acc = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                float d = 0.0f, s, c;
                for (int64_t j = g * m->gs; j < (g + 1) * m->gs; j++)
                    d += (float)val_at(m, nib_index(m->n, m->k, row, j)) * xt[j];
                meta_at(m, row, g, &s, &c);
                acc += s * d + c * sx[t * G + g];
            }
            store_row(y, y_bf16, t * m->n + row, acc);
        }
    }
}

#ifndef MO_AVX512
/* -- portable: one block of 64 rows in decode order (see row_of), plain loops the compiler vectorizes ------------ */
static inline int row_of_portable(int form, int p) {
    return form == 0 ? p : 2 * (p & 15) + ((p >> 4) & 1) * 32 + (p >> 5);
}

static void decode_col_portable(const mo_qmat *m, int64_t b, int64_t col, float w[64]) {
    if (m->form == 0) {
        const uint8_t *p = m->q + (b * m->k + col) * 32;
        for (int j = 0; j < 32; j++) {
            w[j] = (float)(p[j] & 15);
            w[j + 32] = (float)(p[j] >> 4);
        }
        return;
    }
    const uint8_t *p = m->q + (b * m->k + col) * 16, *h = m->hi ? m->hi + (b * m->k + col) * 8 : NULL;
    for (int i = 0; i < 4; i++)
        for (int t = 0; t < 16; t++) { /* plane byte t, field i: nibble 4t + i */
            int v = (p[t] >> (2 * i)) & 3;
            if (h) v |= ((h[t >> 1] >> (4 * (t & 1) + i)) & 1) << 2;
            w[16 * i + t] = (float)v;
        }
}

static void block_portable(const mo_qmat *m, const float *x, const float *sx, void *y, int y_bf16, int64_t b,
                           int64_t tokens) {
    int64_t G = m->k / m->gs;
    float s[64], c[64], w[64];
    for (int64_t t = 0; t < tokens; t++) {
        float acc[64] = {0.0f};
        for (int64_t g = 0; g < G; g++) {
            float d[64] = {0.0f};
            for (int64_t col = g * m->gs; col < (g + 1) * m->gs; col++) {
                decode_col_portable(m, b, col, w);
                float xc = x[t * m->k + col];
                for (int p = 0; p < 64; p++) d[p] += w[p] * xc;
            }
            if (m->meta == 2) { /* 8-bit scales already in decode order */
                const uint8_t *sq = m->sq + (b * G + g) * 64, *zq = m->zq + (b * G + g) * 64;
                const float *smm = m->smm + ((b * G + g) >> 1) * 2, *zmm = m->zmm + ((b * G + g) >> 1) * 2;
                for (int p = 0; p < 64; p++) {
                    s[p] = (float)sq[p] * smm[1] + smm[0];
                    c[p] = -((float)zq[p] * zmm[1] + zmm[0]) * s[p];
                }
            } else {
                for (int p = 0; p < 64; p++) meta_at(m, b * 64 + row_of_portable(m->form, p), g, s + p, c + p);
            }
            float xs = sx[t * G + g];
            for (int p = 0; p < 64; p++) acc[p] += s[p] * d[p] + c[p] * xs;
        }
        for (int p = 0; p < 64; p++) store_row(y, y_bf16, t * m->n + b * 64 + row_of_portable(m->form, p), acc[p]);
    }
}
#endif /* !MO_AVX512 */

#ifdef MO_AVX512
#ifndef MO_PREFETCH
#define MO_PREFETCH 8192 /* bytes ahead in the weight stream, one prefetch per cache line */
#endif
/* -- AVX-512: one block of 64 rows ------------------------------------------------------------------------------ */
/* Decoded column order: form 0 gives rows 0-15, 16-31, 32-47, 48-63; form 1 gives rows 2t, 2t+32, 2t+1, 2t+33 (t the
 * lane), the order of the nibbles in a 2-bit plane byte. Tiles of (s, c) are built in the same order. */
static inline void decode_col(const mo_qmat *m, int64_t b, int64_t col, __m512 w[4]) {
    if (m->form == 0) {
        const uint8_t *p = m->q + (b * m->k + col) * 32;
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        __m256i m4 = _mm256_set1_epi8(15);
        __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        w[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo)));
        w[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1)));
        w[2] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi)));
        w[3] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1)));
        return;
    }
    const uint8_t *p = m->q + (b * m->k + col) * 16;
    __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512i three = _mm512_set1_epi32(3);
    __m512i v0 = _mm512_and_si512(d, three), v1 = _mm512_and_si512(_mm512_srli_epi32(d, 2), three);
    __m512i v2 = _mm512_and_si512(_mm512_srli_epi32(d, 4), three), v3 = _mm512_srli_epi32(d, 6);
    if (m->hi) {
        __m128i h = _mm_loadl_epi64((const __m128i *)(m->hi + (b * m->k + col) * 8));
        __m512i hd = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(h, h)); /* lane t holds byte t/2 */
        hd = _mm512_srlv_epi32(hd, _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0));
        __m512i one = _mm512_set1_epi32(1);
        v0 = _mm512_add_epi32(v0, _mm512_slli_epi32(_mm512_and_si512(hd, one), 2));
        v1 = _mm512_add_epi32(v1, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hd, 1), one), 2));
        v2 = _mm512_add_epi32(v2, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hd, 2), one), 2));
        v3 = _mm512_add_epi32(v3, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hd, 3), one), 2));
    }
    w[0] = _mm512_cvtepi32_ps(v0);
    w[1] = _mm512_cvtepi32_ps(v1);
    w[2] = _mm512_cvtepi32_ps(v2);
    w[3] = _mm512_cvtepi32_ps(v3);
}

static inline __m512 u8x16_ps(const uint8_t *p) { /* 16 bytes -> 16 floats */
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static inline __m512 affine(__m512 q, const float *mm) { /* q * step + min for one (min, step) pair */
    return _mm512_fmadd_ps(q, _mm512_set1_ps(mm[1]), _mm512_set1_ps(mm[0]));
}

static inline __m512i idx16(int a0, int step) {
    return _mm512_add_epi32(_mm512_set1_epi32(a0), _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8,
                            7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(step)));
}

static void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++) {
            t[8 * h + j] = _mm512_shuffle_f32x4(r[8 * h + j], r[8 * h + j + 4], 0x88);
            t[8 * h + j + 4] = _mm512_shuffle_f32x4(r[8 * h + j], r[8 * h + j + 4], 0xDD);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
    }
}

int mo_test_transpose(float *a) { /* a [16][16] in place (tests) */
    __m512 r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(a + 16 * i);
    transpose16(r);
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(a + 16 * i, r[i]);
    return 0;
}

/* the row (within the block) of decode position p (0..63) */
static inline int row_of(int form, int p) {
    if (form == 0) return p;
    int i = p >> 4, t = p & 15;
    return 2 * t + (i & 1) * 32 + (i >> 1);
}

/* the (s, zero_t) pairs of block b for groups [g0, g1): one [G][N][2] row each, far apart in memory */
static inline void prefetch_sz(const mo_qmat *m, int64_t b, int64_t g0, int64_t g1) {
    int64_t row_bytes = m->sz_bf16 ? 256 : 512;
    for (int64_t g = g0; g < g1; g++) {
        const char *p = (const char *)m->sz + (g * m->n + b * 64) * (row_bytes / 64);
        for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
    }
}

/* (s, c) of groups [g0, g1) for the 64 rows of block b, in decode order: tile[(g - g0) * 128 + p] = s,
 * [(g - g0) * 128 + 64 + p] = c. Built TILE_GROUPS groups at a time, just before they are used (stays in L1). */
#define TILE_GROUPS 16
static void build_tile(const mo_qmat *m, int64_t b, int64_t g0, int64_t g1, float *tile) {
    int64_t G = m->k / m->gs, n0 = b * 64;
    if (m->meta == 0) {
        __m512 shift = _mm512_set1_ps((float)(m->offset - 8));
        __m512i even = idx16(0, 2), odd = idx16(1, 2);
        prefetch_sz(m, b, g1, g1 + TILE_GROUPS < G ? g1 + TILE_GROUPS : G); /* sz rows are N apart: no HW prefetch */
        for (int64_t g = g0; g < g1; g++) {
            __m512 s[4], zt[4];
            float *out = tile + (g - g0) * 128;
            if (m->sz_bf16) {
                const uint16_t *p = (const uint16_t *)m->sz + (g * m->n + n0) * 2;
                for (int i = 0; i < 4; i++) {
                    __m512i pr = _mm512_loadu_si512((const void *)(p + 32 * i));
                    s[i] = _mm512_castsi512_ps(_mm512_slli_epi32(pr, 16));
                    zt[i] = _mm512_castsi512_ps(_mm512_and_si512(pr, _mm512_set1_epi32((int)0xffff0000u)));
                }
            } else {
                const float *p = (const float *)m->sz + (g * m->n + n0) * 2;
                for (int i = 0; i < 4; i++) {
                    __m512 a = _mm512_loadu_ps(p + 32 * i), c = _mm512_loadu_ps(p + 32 * i + 16);
                    s[i] = _mm512_permutex2var_ps(a, even, c);
                    zt[i] = _mm512_permutex2var_ps(a, odd, c);
                }
            }
            if (m->form == 1) { /* natural rows -> 2t, 2t+32, 2t+1, 2t+33 */
                __m512 ns[4] = {_mm512_permutex2var_ps(s[0], even, s[1]), _mm512_permutex2var_ps(s[2], even, s[3]),
                                _mm512_permutex2var_ps(s[0], odd, s[1]), _mm512_permutex2var_ps(s[2], odd, s[3])};
                __m512 nz[4] = {_mm512_permutex2var_ps(zt[0], even, zt[1]), _mm512_permutex2var_ps(zt[2], even, zt[3]),
                                _mm512_permutex2var_ps(zt[0], odd, zt[1]), _mm512_permutex2var_ps(zt[2], odd, zt[3])};
                for (int i = 0; i < 4; i++) s[i] = ns[i], zt[i] = nz[i];
            }
            for (int i = 0; i < 4; i++) {
                _mm512_storeu_ps(out + 16 * i, s[i]);
                _mm512_storeu_ps(out + 64 + 16 * i, _mm512_fmadd_ps(shift, s[i], zt[i]));
            }
        }
        return;
    }
    if (G % 16 || m->meta_group % 16 || g1 - g0 != 16) { /* odd shapes: one value at a time */
        for (int64_t g = g0; g < g1; g++)
            for (int p = 0; p < 64; p++) {
                float *out = tile + (g - g0) * 128 + p;
                meta_at(m, n0 + row_of(m->form, p), g, out, out + 64);
            }
        return;
    }
    int shift = m->meta_group == 128 ? 7 : -1; /* a 64-bit division per row costs more than the row itself */
    for (int i = 0; i < 4; i++) { /* 16 rows of one decode vector times 16 groups, then transposed */
        {
            __m512 s[16], c[16];
            for (int t = 0; t < 16; t++) {
                int64_t f = (n0 + row_of(m->form, 16 * i + t)) * G + g0;
                int64_t mg = shift >= 0 ? f >> shift : f / m->meta_group;
                s[t] = affine(u8x16_ps(m->sq + f), m->smm + 2 * mg);
                c[t] = _mm512_fnmadd_ps(affine(u8x16_ps(m->zq + f), m->zmm + 2 * mg), s[t], _mm512_setzero_ps());
            }
            transpose16(s);
            transpose16(c);
            for (int j = 0; j < 16; j++) {
                _mm512_storeu_ps(tile + j * 128 + 16 * i, s[j]);
                _mm512_storeu_ps(tile + j * 128 + 64 + 16 * i, c[j]);
            }
        }
    }
}

/* (s, c) of group g for decode vector i of block b: from the tile, or (tile NULL: int4pack with bf16 sz, natural row
 * order) straight from sz */
static inline void group_sc(const mo_qmat *m, const float *tile, int64_t b, int64_t g, int64_t G, int i, __m512 *s,
                            __m512 *c) {
    if (m->meta == 2) { /* 8-bit values already in decode order: 16 bytes per vector, one (min, step) per group */
        int64_t at = b * G + g, mg = at >> 1;
        *s = affine(u8x16_ps(m->sq + at * 64 + 16 * i), m->smm + 2 * mg);
        *c = _mm512_fnmadd_ps(affine(u8x16_ps(m->zq + at * 64 + 16 * i), m->zmm + 2 * mg), *s, _mm512_setzero_ps());
        return;
    }
    if (tile != NULL) {
        const float *at = tile + (g % TILE_GROUPS) * 128;
        *s = _mm512_loadu_ps(at + 16 * i);
        *c = _mm512_loadu_ps(at + 64 + 16 * i);
        return;
    }
    __m512i pr = _mm512_loadu_si512((const void *)((const uint16_t *)m->sz + (g * m->n + b * 64 + 16 * i) * 2));
    *s = _mm512_castsi512_ps(_mm512_slli_epi32(pr, 16));
    __m512 zt = _mm512_castsi512_ps(_mm512_and_si512(pr, _mm512_set1_epi32((int)0xffff0000u)));
    *c = _mm512_fmadd_ps(_mm512_set1_ps((float)(m->offset - 8)), *s, zt);
}

static inline void store_block(const mo_qmat *m, void *y, int y_bf16, int64_t t, int64_t b, __m512 a[4]) {
    __m512 out[4];
    if (m->form == 0) {
        for (int i = 0; i < 4; i++) out[i] = a[i];
    } else { /* back from 2t, 2t+32, 2t+1, 2t+33 to natural rows */
        __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        out[0] = _mm512_permutex2var_ps(a[0], lo, a[2]);
        out[1] = _mm512_permutex2var_ps(a[0], hi, a[2]);
        out[2] = _mm512_permutex2var_ps(a[1], lo, a[3]);
        out[3] = _mm512_permutex2var_ps(a[1], hi, a[3]);
    }
    int64_t at = t * m->n + b * 64;
    for (int i = 0; i < 4; i++) {
        if (y_bf16) { /* round to nearest even, as f32_to_bf16 (finite values) */
            __m512i u = _mm512_castps_si512(out[i]);
            __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
            __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
            _mm256_storeu_si256((__m256i *)((uint16_t *)y + at + 16 * i), _mm512_cvtepi32_epi16(r));
        } else {
            _mm512_storeu_ps((float *)y + at + 16 * i, out[i]);
        }
    }
}

/* one block, tokens t0 .. t0 + MC - 1 */
#define MO_BLOCK(MC)                                                                                                 \
    static void block_##MC(const mo_qmat *m, float *tile, const float *x, const float *sx, void *y, int y_bf16, \
                           int64_t b, int64_t t0) {                                                                  \
        int64_t G = m->k / m->gs, gs = m->gs, k = m->k, col_bytes = m->form == 0 ? 32 : 16;                          \
        int64_t pf_mask = 64 / col_bytes - 1;                                                                        \
        const uint8_t *pf_base = m->q + b * k * col_bytes + MO_PREFETCH;                                             \
        __m512 acc[MC][4];                                                                                           \
        for (int t = 0; t < MC; t++)                                                                                 \
            for (int i = 0; i < 4; i++) acc[t][i] = _mm512_setzero_ps();                                             \
        for (int64_t g = 0; g < G; g++) {                                                                            \
            __m512 d[MC][4];                                                                                         \
            if (tile != NULL && g % TILE_GROUPS == 0)                                                                \
                build_tile(m, b, g, g + TILE_GROUPS < G ? g + TILE_GROUPS : G, tile);                                \
            else if (tile == NULL && g + 4 < G)                                                                      \
                prefetch_sz(m, b, g + 4, g + 5);                                                                     \
            for (int t = 0; t < MC; t++)                                                                             \
                for (int i = 0; i < 4; i++) d[t][i] = _mm512_setzero_ps();                                           \
            for (int64_t c = g * gs; c < (g + 1) * gs; c++) {                                                        \
                __m512 w[4];                                                                                         \
                if ((c & pf_mask) == 0) _mm_prefetch((const char *)(pf_base + c * col_bytes), _MM_HINT_T0);          \
                decode_col(m, b, c, w);                                                                              \
                for (int t = 0; t < MC; t++) {                                                                       \
                    __m512 xb = _mm512_set1_ps(x[(t0 + t) * k + c]);                                                 \
                    for (int i = 0; i < 4; i++) d[t][i] = _mm512_fmadd_ps(w[i], xb, d[t][i]);                        \
                }                                                                                                    \
            }                                                                                                        \
            for (int i = 0; i < 4; i++) {                                                                            \
                __m512 s, cc;                                                                                        \
                group_sc(m, tile, b, g, G, i, &s, &cc);                                                             \
                for (int t = 0; t < MC; t++)                                                                         \
                    acc[t][i] = _mm512_fmadd_ps(s, d[t][i], _mm512_fmadd_ps(cc, _mm512_set1_ps(sx[(t0 + t) * G + g]), \
                                                                            acc[t][i]));                            \
            }                                                                                                        \
        }                                                                                                            \
        for (int t = 0; t < MC; t++) store_block(m, y, y_bf16, t0 + t, b, acc[t]);                                   \
    }
MO_BLOCK(1)
MO_BLOCK(2)

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
/* bf16 activations: two columns at once as bf16 pairs (small integers are exact in bf16; the bf16 dot-product
 * instruction sums the exact products in float32). Word lanes of the decoded vectors pair a row's weight in column c
 * with its weight in column c + 1, so dword lane t keeps the row order of the float path. Integers become bf16 by one
 * table lookup (vpermw reads the low 5 bits of each word: the tables repeat every 4 or 16 entries). */
static const uint16_t lut_bf16[32] = {0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                      0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,
                                      0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                      0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
static const uint16_t lut2_bf16[32] = {0, 0x3f80, 0x4000, 0x4040, 0, 0x3f80, 0x4000, 0x4040, 0, 0x3f80, 0x4000,
                                       0x4040, 0, 0x3f80, 0x4000, 0x4040, 0, 0x3f80, 0x4000, 0x4040, 0, 0x3f80,
                                       0x4000, 0x4040, 0, 0x3f80, 0x4000, 0x4040, 0, 0x3f80, 0x4000, 0x4040};
/* byte gathers: word i holds (column c, column c + 1) bytes of the same row; `pair16` for int4pack (bytes i and 32 + i
 * of the 64 loaded, rows half `h`), `pair_planes` for 2-bit planes (bytes i and 16 + i of the 32 loaded) */
static uint8_t pair16[2][64], pair_planes[64];
__attribute__((constructor)) static void init_pairs(void) { /* at library load */
    for (int i = 0; i < 16; i++)
        for (int h = 0; h < 2; h++) {
            pair16[h][4 * i] = pair16[h][4 * i + 1] = (uint8_t)(16 * h + i);
            pair16[h][4 * i + 2] = pair16[h][4 * i + 3] = (uint8_t)(32 + 16 * h + i);
        }
    for (int i = 0; i < 16; i++) {
        pair_planes[4 * i] = pair_planes[4 * i + 1] = (uint8_t)i;
        pair_planes[4 * i + 2] = pair_planes[4 * i + 3] = (uint8_t)(16 + i);
    }
}

static inline void decode2_bf16(const mo_qmat *m, const uint8_t *p, __m512i w[4]) {
    if (m->form == 0) { /* 64 bytes: columns c and c + 1 of int4pack */
        const __m512i lut = _mm512_loadu_si512((const void *)lut_bf16);
        __m512i v = _mm512_loadu_si512((const void *)p);
        __m512i z0 = _mm512_permutexvar_epi8(_mm512_loadu_si512((const void *)pair16[0]), v);
        __m512i z1 = _mm512_permutexvar_epi8(_mm512_loadu_si512((const void *)pair16[1]), v);
        w[0] = _mm512_permutexvar_epi16(z0, lut);                          /* rows 0-15: low nibbles */
        w[1] = _mm512_permutexvar_epi16(z1, lut);                          /* rows 16-31 */
        w[2] = _mm512_permutexvar_epi16(_mm512_srli_epi16(z0, 4), lut);    /* rows 32-47: high nibbles */
        w[3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(z1, 4), lut);    /* rows 48-63 */
        return;
    }
    const __m512i lut = _mm512_loadu_si512((const void *)lut2_bf16);
    __m512i v = _mm512_permutexvar_epi8(_mm512_loadu_si512((const void *)pair_planes),
                                        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)));
    w[0] = _mm512_permutexvar_epi16(v, lut);
    w[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 2), lut);
    w[2] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
    w[3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 6), lut);
}

#define MO_BLOCK_BF16(MC)                                                                                            \
    static void block_bf16_##MC(const mo_qmat *m, float *tile, const uint16_t *xb, const float *sx, void *y,  \
                                int y_bf16, int64_t b, int64_t t0) {                                                 \
        int64_t G = m->k / m->gs, gs = m->gs, k = m->k, col_bytes = m->form == 0 ? 32 : 16;                          \
        const uint8_t *base = m->q + b * k * col_bytes;                                                              \
        int64_t pf_mask = 64 / col_bytes - 1;                                                                        \
        __m512 acc[MC][4];                                                                                           \
        for (int t = 0; t < MC; t++)                                                                                 \
            for (int i = 0; i < 4; i++) acc[t][i] = _mm512_setzero_ps();                                             \
        for (int64_t g = 0; g < G; g++) {                                                                            \
            __m512 d[MC][4];                                                                                         \
            if (tile != NULL && g % TILE_GROUPS == 0)                                                                \
                build_tile(m, b, g, g + TILE_GROUPS < G ? g + TILE_GROUPS : G, tile);                                \
            else if (tile == NULL && g + 4 < G)                                                                      \
                prefetch_sz(m, b, g + 4, g + 5);                                                                     \
            for (int t = 0; t < MC; t++)                                                                             \
                for (int i = 0; i < 4; i++) d[t][i] = _mm512_setzero_ps();                                           \
            for (int64_t c = g * gs; c < (g + 1) * gs; c += 2) {                                                     \
                __m512i w[4];                                                                                        \
                if (((c >> 1) & (pf_mask >> 1)) == 0)                                                                \
                    _mm_prefetch((const char *)(base + c * col_bytes + MO_PREFETCH), _MM_HINT_T0);                   \
                decode2_bf16(m, base + c * col_bytes, w);                                                            \
                for (int t = 0; t < MC; t++) {                                                                       \
                    uint32_t pair;                                                                                   \
                    memcpy(&pair, xb + (t0 + t) * k + c, 4);                                                         \
                    __m512bh xp = (__m512bh)_mm512_set1_epi32((int)pair);                                            \
                    for (int i = 0; i < 4; i++) d[t][i] = _mm512_dpbf16_ps(d[t][i], (__m512bh)w[i], xp);            \
                }                                                                                                    \
            }                                                                                                        \
            for (int i = 0; i < 4; i++) {                                                                            \
                __m512 s, cc;                                                                                        \
                group_sc(m, tile, b, g, G, i, &s, &cc);                                                             \
                for (int t = 0; t < MC; t++)                                                                         \
                    acc[t][i] = _mm512_fmadd_ps(s, d[t][i], _mm512_fmadd_ps(cc, _mm512_set1_ps(sx[(t0 + t) * G + g]), \
                                                                            acc[t][i]));                            \
            }                                                                                                        \
        }                                                                                                            \
        for (int t = 0; t < MC; t++) store_block(m, y, y_bf16, t0 + t, b, acc[t]);                                   \
    }
MO_BLOCK_BF16(1)
MO_BLOCK_BF16(2)
#define MO_HAVE_BF16_PAIRS 1
#endif /* __AVX512BF16__ && __AVX512VBMI__ */
#endif /* MO_AVX512 */
