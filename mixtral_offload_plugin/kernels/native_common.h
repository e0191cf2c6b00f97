/* native_common.h: scalar helpers, per-thread scratch, the meta of a group, row stores and the
 * float32 copy of the activations with their group sums: what every form's kernels share.
 * Part of native.c's one translation unit (included there, in order); not compiled alone. */

/* -- scalar helpers ------------------------------------------------------------------------------------------- */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void *tl_grow(void **buf, size_t *cap, size_t nbytes) {
    if (*cap < nbytes) {
        free(*buf);
        *cap = nbytes + (nbytes >> 2) + 4096;
        *buf = aligned_alloc(64, (*cap + 63) & ~(size_t)63);
        if (*buf == NULL) *cap = 0;
    }
    return *buf;
}

static __thread void *tl_x, *tl_h;
static __thread size_t tl_x_cap, tl_h_cap;
#ifdef MO_AVX512
static __thread void *tl_tile;
static __thread size_t tl_tile_cap;
#endif

static inline void meta_at(const mo_qmat *m, int64_t row, int64_t g, float *s, float *c) {
    int64_t G = m->k / m->gs;
    if (m->meta == 0) {
        int64_t i = (g * m->n + row) * 2;
        float sv, zt;
        if (m->sz_bf16) {
            const uint16_t *p = (const uint16_t *)m->sz;
            sv = bf16_to_f32(p[i]);
            zt = bf16_to_f32(p[i + 1]);
        } else {
            const float *p = (const float *)m->sz;
            sv = p[i];
            zt = p[i + 1];
        }
        *s = sv;
        *c = zt + (float)(m->offset - 8) * sv;
    } else if (m->meta == 2) {
        int64_t nb = m->n / 64, pos, mg;
        if (row < nb * 64) {
            int r = (int)(row % 64); /* decode position of row r: the inverse of row_of */
            pos = (row / 64 * G + g) * 64 + 16 * ((r >= 32) + 2 * (r & 1)) + ((r & 31) >> 1);
            mg = (row / 64 * G + g) >> 1;
        } else {
            int64_t r = m->n - nb * 64;
            pos = nb * G * 64 + g * r + (row - nb * 64);
            mg = (nb * G + g) >> 1;
        }
        float sv = (float)m->sq[pos] * m->smm[2 * mg + 1] + m->smm[2 * mg];
        float z = (float)m->zq[pos] * m->zmm[2 * mg + 1] + m->zmm[2 * mg];
        *s = sv;
        *c = -z * sv;
    } else {
        int64_t f = row * G + g, mg = f / m->meta_group;
        float sv = (float)m->sq[f] * m->smm[2 * mg + 1] + m->smm[2 * mg];
        float z = (float)m->zq[f] * m->zmm[2 * mg + 1] + m->zmm[2 * mg];
        *s = sv;
        *c = -z * sv;
    }
}


static inline void store_row(void *y, int y_bf16, int64_t i, float v) {
    if (y_bf16)
        ((uint16_t *)y)[i] = f32_to_bf16(v);
    else
        ((float *)y)[i] = v;
}

/* x (bfloat16 or float32, [tokens][K]) -> float32 copy followed by the group sums [tokens][G], in scratch */
static float *load_x(const void *x, int x_bf16, int64_t tokens, int64_t k, int64_t gs) {
    int64_t G = gs ? k / gs : 0;
    float *xf = (float *)tl_grow(&tl_x, &tl_x_cap, (size_t)(tokens * (k + G)) * sizeof(float));
    if (xf == NULL) return NULL;
    for (int64_t i = 0; i < tokens * k; i++)
        xf[i] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
    float *sx = xf + tokens * k;
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0.0f;
            for (int64_t j = 0; j < gs; j++) s += xf[t * k + g * gs + j];
            sx[t * G + g] = s;
        }
    return xf;
}
