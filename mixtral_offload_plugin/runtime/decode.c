/* One decoded token of a Mixtral model, all its layers in native code (see fused.py, which builds the descriptors).
 *
 * Scope: batch 1, one new token, CPU, bf16 or float32 model. Experts are reached through a pointer table per layer:
 * with every expert resident the whole step is one call; with experts in cache slots the step stops after routing a
 * layer, the caller makes its experts available (and keeps the cache's counters, policy and prefetch as the modules
 * do) and calls again to resume at that layer's experts. The matrices are computed by the kernels of native.c (and
 * the expert kernels), reached through the function pointers in `mo_model`, so this file holds only what
 * transformers' modules do around them: RMSNorm, rotary embedding, the KV cache write, attention over the cache, the
 * router's softmax and top-k, the weighted sum of the experts and the residuals.
 *
 * Rounding follows the module path op for op: every value that torch holds in the model's dtype is rounded to it at the
 * same point (bf16: round to nearest even), so results differ from the module path only by the order of float32 sums
 * (RMSNorm's mean, attention, the router's dot products). Those are not bit-identical to torch's: fused.py is only
 * used where the model is quantized (the 16-bit path stays the reference, equal to transformers bit for bit).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int (*mo_mm_fn)(const void *m, const void *x, int x_bf16, void *y, int y_bf16, int64_t tokens, int nthreads);
typedef int (*mo_dense_fn)(const uint16_t *w, const uint16_t *x, void *y, int y_bf16, int64_t tokens, int64_t n,
                           int64_t k, int nthreads);
typedef int (*mo_expert_fn)(const void *a, const void *b, const void *x, int x_bf16, void *y, int y_bf16,
                            int64_t tokens, int nthreads);

enum { MAT_QUANT = 0, MAT_DENSE_BF16 = 1, MAT_DENSE_F32 = 2 };

typedef struct {
    const void *w; /* mo_qmat * (MAT_QUANT) or the [n, k] weight */
    int64_t n, k;
    int32_t kind;
    int32_t pad;
} mo_mat;

typedef struct {
    mo_mat q, k, v, o;
    const void *ln1, *ln2, *router; /* model dtype: [H], [H], [E, H] */
    void *kcache, *vcache;          /* model dtype: [kv_heads, cap, head_dim]; the new token goes to row `pos` */
    const void *const *experts;     /* [E][2]: the two arguments of `expert` for each expert */
} mo_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, n_experts, top_k, n_layers, cap;
    int32_t bf16, pad;
    float eps, scale, rope_scaling, pad2;
    const float *inv_freq; /* [head_dim / 2] */
    mo_mm_fn mm;
    mo_dense_fn dense;
    mo_expert_fn expert;
    const mo_layer *layers;
    const void *embed; /* [vocab, H] */
    const void *norm;  /* [H] */
    mo_mat head;
} mo_model;

int mo_decode_abi(void) { return 2; }

static inline float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_bf16(float f) { /* round to nearest even, as torch does (NaN stays NaN) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float rd(int bf16, float f) { return bf16 ? bf16_f32(f32_bf16(f)) : f; }

static inline float at(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static void store(void *p, int bf16, int64_t i, float v) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_bf16(v);
    else
        ((float *)p)[i] = v;
}

static void to_act(const float *x, int bf16, void *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) store(out, bf16, i, x[i]);
}

static void from_act(const void *y, int bf16, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = at(y, bf16, i);
}

/* sum a[i] * b[i] with 16 independent float32 lanes (vectorized without reassociation flags) */
static float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[i + l] * b[i + l];
    float s = 0.f;
    for (; i < n; i++) s += a[i] * b[i];
    for (int l = 0; l < 16; l++) s += acc[l];
    return s;
}

static float dot_act(const float *a, const void *w, int bf16, int64_t n) { /* a float32, w in the model dtype */
    if (!bf16) return dot_f32(a, (const float *)w, n);
    const uint16_t *h = (const uint16_t *)w;
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[i + l] * bf16_f32(h[i + l]);
    float s = 0.f;
    for (; i < n; i++) s += a[i] * bf16_f32(h[i]);
    for (int l = 0; l < 16; l++) s += acc[l];
    return s;
}

/* y = x @ W.T for one token; x, y float32 holding model-dtype values; `act` scratch of max(n, k) model-dtype values */
static int matvec(const mo_model *m, const mo_mat *w, const float *x, float *y, void *act, void *out, int nth) {
    int bf16 = m->bf16;
    int rc = 0;
    if (w->kind == MAT_DENSE_F32) {
        const float *wf = (const float *)w->w;
#pragma omp parallel for num_threads(nth) schedule(static) if (w->n * w->k > (1 << 16))
        for (int64_t r = 0; r < w->n; r++) y[r] = dot_f32(x, wf + r * w->k, w->k);
        return 0;
    }
    to_act(x, bf16, act, w->k);
    if (w->kind == MAT_QUANT)
        rc = m->mm(w->w, act, bf16, out, bf16, 1, nth);
    else if (bf16)
        rc = m->dense((const uint16_t *)w->w, (const uint16_t *)act, out, 1, 1, w->n, w->k, nth);
    else
        return -2;
    from_act(out, bf16, y, w->n);
    return rc;
}

static void rmsnorm(const float *x, const void *w, int bf16, float eps, int64_t n, float *y) {
    float r = 1.0f / sqrtf(dot_f32(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = rd(bf16, at(w, bf16, i) * rd(bf16, x[i] * r));
}

/* q_embed = q * cos + rotate_half(q) * sin, each product and the sum rounded as torch rounds them */
static void rotary(float *x, int64_t heads, int64_t d, const float *cs, const float *sn, int bf16) {
    int64_t half = d / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * d;
        for (int64_t i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = rd(bf16, rd(bf16, a * cs[i]) + rd(bf16, -b * sn[i]));
            v[i + half] = rd(bf16, rd(bf16, b * cs[i + half]) + rd(bf16, a * sn[i + half]));
        }
    }
}

/* softmax(q K^T * scale) V over rows 0..len-1 of one layer's cache, per query head (grouped-query heads share K, V) */
static void attend(const mo_model *m, const mo_layer *L, const float *q, int64_t len, float *out, int nth) {
    int64_t d = m->head_dim, group = m->heads / m->kv_heads;
    int bf16 = m->bf16;
#pragma omp parallel num_threads(nth) if (len * m->heads * d > (1 << 18))
    {
        float *sc = (float *)malloc(sizeof(float) * (size_t)(len + d));
        float *acc = sc + len;
#pragma omp for schedule(static)
        for (int64_t h = 0; h < m->heads; h++) {
            int64_t g = h / group;
            const char *kb = (const char *)L->kcache + (size_t)(g * m->cap * d) * (bf16 ? 2 : 4);
            const char *vb = (const char *)L->vcache + (size_t)(g * m->cap * d) * (bf16 ? 2 : 4);
            float mx = -INFINITY;
            for (int64_t j = 0; j < len; j++) {
                float s = dot_act(q + h * d, kb + (size_t)(j * d) * (bf16 ? 2 : 4), bf16, d) * m->scale;
                sc[j] = s;
                if (s > mx) mx = s;
            }
            float total = 0.f;
            for (int64_t j = 0; j < len; j++) {
                sc[j] = expf(sc[j] - mx);
                total += sc[j];
            }
            for (int64_t i = 0; i < d; i++) acc[i] = 0.f;
            for (int64_t j = 0; j < len; j++) {
                const void *vr = vb + (size_t)(j * d) * (bf16 ? 2 : 4);
                float p = sc[j];
                for (int64_t i = 0; i < d; i++) acc[i] += p * at(vr, bf16, i);
            }
            for (int64_t i = 0; i < d; i++) out[h * d + i] = rd(bf16, acc[i] / total);
        }
        free(sc);
    }
}

/* router: logits in the model dtype, softmax in float32, top-k (lowest index first among equals), renormalized */
static void route(const mo_model *m, const mo_layer *L, const float *h, int32_t *ids, float *wts) {
    int64_t E = m->n_experts, H = m->hidden;
    float p[256];
    float mx = -INFINITY, total = 0.f;
    for (int64_t e = 0; e < E; e++) {
        p[e] = rd(m->bf16, dot_act(h, (const char *)L->router + (size_t)(e * H) * (m->bf16 ? 2 : 4), m->bf16, H));
        if (p[e] > mx) mx = p[e];
    }
    for (int64_t e = 0; e < E; e++) {
        p[e] = expf(p[e] - mx);
        total += p[e];
    }
    for (int64_t e = 0; e < E; e++) p[e] /= total;
    unsigned char taken[256] = {0};
    float sum = 0.f;
    for (int64_t j = 0; j < m->top_k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
        taken[best] = 1;
        ids[j] = (int32_t)best;
        wts[j] = p[best];
        sum += p[best];
    }
    for (int64_t j = 0; j < m->top_k; j++) wts[j] /= sum;
    for (int64_t a = 1; a < m->top_k; a++) /* expert order: the module path sums the experts by ascending id */
        for (int64_t b = a; b > 0 && ids[b] < ids[b - 1]; b--) {
            int32_t ti = ids[b];
            ids[b] = ids[b - 1];
            ids[b - 1] = ti;
            float tw = wts[b];
            wts[b] = wts[b - 1];
            wts[b - 1] = tw;
        }
}

/* Where a decode step stands between calls, and its scratch (caller-owned, reused by every token; widest =
 * max(H, heads * head_dim, vocab)). */
typedef struct {
    int64_t layer; /* the layer to run next (in and out) */
    int32_t phase; /* 0: that layer's attention and routing next; 1: its experts next (`act` holds their input) */
    int32_t stop;  /* 1: return after routing every layer; 0: only where a routed expert's pointers are NULL */
    int32_t *done; /* [top_k]: that expert's output is in `eout` (set here, or by the caller, which computed it) */
    float *wts;    /* [top_k]: the current layer's routing weights */
    float *x;      /* [H]: the residual stream */
    void *act;     /* [widest] model dtype: a matrix's input; between the phases, the experts' input [H] */
    void *out;     /* [widest] model dtype: a matrix's output */
    void *eout;    /* [top_k, H] model dtype: the experts' outputs, in routing order */
    float *work;   /* [3 H + 2 (heads + kv_heads) head_dim + 2 head_dim + widest] float32 */
} mo_step;

/* One token at position `pos` (the cache holds rows 0..pos-1), resumable: run from `s->layer` / `s->phase` (the
 * caller sets 0 / 0 for a new token) until the logits [vocab] are written (returns 0), or until a layer is routed
 * and `s->stop` asks to stop or one of its routed experts has NULL pointers (returns 1, `s->layer` = that layer,
 * `s->phase` = 1: its routed experts [top_k] are in `routed`, ascending, and the caller fills their pointers before
 * calling again; experts already computed (`s->done`) are not read again). The routed experts of every layer go to
 * `routed` [layers][top_k]. Returns -2 (unsupported matrix kind), -3 (more than 256 experts, or no KV row left for
 * `pos`), -4 (a bad `s`), or a kernel's error (-1: its scratch allocation failed). Rounding and order are the same however often the step stops. */
int mo_decode_run(const mo_model *m, mo_step *s, int64_t token, int64_t pos, void *logits, int32_t *routed,
                  int nthreads) {
    int bf16 = m->bf16, el = bf16 ? 2 : 4;
    int64_t H = m->hidden, d = m->head_dim, qn = m->heads * d, kvn = m->kv_heads * d;
    if (m->n_experts > 256 || m->top_k > m->n_experts || pos >= m->cap) return -3;
    if (s->layer < 0 || s->layer > m->n_layers || (s->phase != 0 && s->phase != 1)) return -4;
    float *x = s->x, *h = s->work, *y = h + H, *moe = y + H, *q = moe + H, *att = q + qn, *k = att + qn, *v = k + kvn;
    float *cs = v + kvn, *sn = cs + d, *wide = sn + d;
    void *act = s->act, *out = s->out, *eout = s->eout;
    int rc = 0;
    for (int64_t i = 0; i < d / 2; i++) { /* transformers: cos(cat(f, f)) * scaling, then to the model dtype */
        float f = (float)pos * m->inv_freq[i];
        cs[i] = cs[i + d / 2] = rd(bf16, cosf(f) * m->rope_scaling);
        sn[i] = sn[i + d / 2] = rd(bf16, sinf(f) * m->rope_scaling);
    }
    if (s->layer == 0 && s->phase == 0)
        for (int64_t i = 0; i < H; i++) x[i] = at(m->embed, bf16, token * H + i);
    for (int64_t l = s->layer; l < m->n_layers; l++) {
        const mo_layer *L = &m->layers[l];
        int32_t *ids = routed + l * m->top_k;
        if (s->phase == 0) {
            rmsnorm(x, L->ln1, bf16, m->eps, H, h);
            if ((rc = matvec(m, &L->q, h, q, act, out, nthreads)) ||
                (rc = matvec(m, &L->k, h, k, act, out, nthreads)) || (rc = matvec(m, &L->v, h, v, act, out, nthreads)))
                return rc;
            rotary(q, m->heads, d, cs, sn, bf16);
            rotary(k, m->kv_heads, d, cs, sn, bf16);
            for (int64_t g = 0; g < m->kv_heads; g++)
                for (int64_t i = 0; i < d; i++) {
                    store(L->kcache, bf16, (g * m->cap + pos) * d + i, k[g * d + i]);
                    store(L->vcache, bf16, (g * m->cap + pos) * d + i, v[g * d + i]);
                }
            attend(m, L, q, pos + 1, att, nthreads);
            if ((rc = matvec(m, &L->o, att, y, act, out, nthreads))) return rc;
            for (int64_t i = 0; i < H; i++) x[i] = rd(bf16, x[i] + y[i]);
            rmsnorm(x, L->ln2, bf16, m->eps, H, h);
            route(m, L, h, ids, s->wts);
            to_act(h, bf16, act, H);
            for (int64_t j = 0; j < m->top_k; j++) s->done[j] = 0;
            s->phase = 1;
            if (s->stop) {
                s->layer = l;
                return 1;
            }
        }
        int pending = 0;
        for (int64_t j = 0; j < m->top_k; j++) {
            if (s->done[j]) continue;
            const void *const *e = L->experts + 2 * ids[j];
            if (e[0] == NULL || e[1] == NULL) {
                pending = 1;
                continue;
            }
            if ((rc = m->expert(e[0], e[1], act, bf16, (char *)eout + (size_t)(j * H * el), bf16, 1, nthreads)))
                return rc;
            s->done[j] = 1;
        }
        if (pending) {
            s->layer = l;
            return 1;
        }
        for (int64_t j = 0; j < m->top_k; j++) {
            const void *ye = (const char *)eout + (size_t)(j * H * el);
            for (int64_t i = 0; i < H; i++) { /* (y_e * w) in float32, then the model dtype; summed in it */
                float t = rd(bf16, at(ye, bf16, i) * s->wts[j]);
                moe[i] = j == 0 ? t : rd(bf16, moe[i] + t);
            }
        }
        for (int64_t i = 0; i < H; i++) x[i] = rd(bf16, x[i] + moe[i]);
        s->phase = 0;
        s->layer = l + 1;
    }
    rmsnorm(x, m->norm, bf16, m->eps, H, h);
    if ((rc = matvec(m, &m->head, h, wide, act, out, nthreads))) return rc;
    to_act(wide, bf16, logits, m->head.n);
    s->layer = m->n_layers;
    return 0;
}
