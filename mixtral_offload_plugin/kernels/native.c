/* Native CPU kernels of mixtral-offload: y = x W^T for a few tokens, reading the weights in place, in the packed
 * forms the package stores (see quant/formats.py), with float32 accumulation.
 *
 * Built at first use by kernels/native.py with the system C compiler (-O3 -march=native -fopenmp) and called through
 * ctypes, which releases the GIL; rows are split over OpenMP threads (the process's one OpenMP runtime, torch's).
 * Three paths: AVX-512 intrinsics, AVX512-BF16 dot products for 16-bit weights when the CPU has them, and portable C
 * (built with -DMO_PORTABLE, or wherever AVX-512 is missing) that computes the same sums.
 *
 * Quantized matrices (mo_qmat) are W [N, K] in groups of `gs` consecutive weights along K:
 *  - form 0, "int4pack": torch's CPU int4 layout. Rows in blocks of 64: for block b and column c, 32 bytes whose low
 *    nibbles are rows 0..31 and high nibbles rows 32..63; the N % 64 last rows follow as [K][r/2] bytes holding rows
 *    2j (low nibble) and 2j+1 (high). w = (v - 8) * s + zero_t with (s, zero_t) from sz [G][N][2].
 *  - form 1, "planes": the same nibble sequence, each nibble holding q + offset, stored as a 2-bit plane (the low two
 *    bits of q, 4 per byte, bits 2i..2i+1 of byte m holding nibble 4m+i) and for 3 bits a 1-bit plane (bit i of byte m
 *    holding the third bit of nibble 8m+i). With sz: w = (q + offset - 8) * s + zero_t; with 8-bit meta (meta 1):
 *    w = (q - z) * s, s = sq * step + min and z likewise, (min, step) per `meta_group` consecutive entries of the
 *    [N][G] arrays. Meta 2: the same 8-bit values stored per block of 64 rows and group in decode order (see below;
 *    the N % 64 last rows as [G][r]), one (min, step) per two consecutive (block, group) entries.
 *  - form 2, 8-bit values as bytes [N][K] (native_u8.h).
 * Files: this one (the matrix type, the entry points, the dispatch of mo_quant_mm), native_common.h, native_int4.h
 * (forms 0-1), native_u8.h (form 2), native_dense.h (bf16 matrices), native_expert.h (an expert's MLP).
 * Every form is computed as y = sum over groups g of s * dot_g + c * sum_g(x), c = zero_t + (offset - 8) * s (sz) or
 * c = -z * s (8-bit meta), dot_g = sum over the group of q * x.
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
    const uint8_t *q;   /* form 0: int4pack bytes; form 1: 2-bit plane */
    const uint8_t *hi;  /* form 1 with 3 bits: 1-bit plane; else NULL */
    const void *sz;     /* meta 0: [G][N][2] (scale, zero_t), bfloat16 or float32 */
    const uint8_t *sq;  /* meta 1: [N][G] 8-bit scales */
    const uint8_t *zq;  /* meta 1: [N][G] 8-bit zeros */
    const float *smm;   /* meta 1: [N*G/meta_group][2] (min, step) of the scales */
    const float *zmm;   /* meta 1: the same for the zeros */
    int64_t n, k, gs, meta_group;
    int32_t form, meta, sz_bf16, offset;
    const void *zp;     /* form 2: [N][G] zeros (sz holds the [N][G] scales); see native_u8.h */
} mo_qmat;

int mo_abi(void) { return 2; }

int mo_simd(void) {
#if defined(MO_AVX512) && defined(__AVX512BF16__)
    return 2;
#elif defined(MO_AVX512)
    return 1;
#else
    return 0;
#endif
}

#include "native_common.h"
#include "native_int4.h"
#include "native_u8.h"

/* y [tokens][N] (bfloat16 or float32) = x [tokens][K] W^T. Returns 0, or -1 when scratch memory is exhausted. */
int mo_quant_mm(const mo_qmat *m, const void *x, int x_bf16, void *y, int y_bf16, int64_t tokens, int nthreads) {
    float *xf = load_x(x, x_bf16, tokens, m->k, m->gs);
    if (xf == NULL) return -1;
    const float *sx = xf + tokens * m->k;
    if (m->form == 2) {
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t r = 0; r < m->n; r += 64) u8_rows(m, xf, sx, y, y_bf16, tokens, r, r + 64 < m->n ? r + 64 : m->n);
        return 0;
    }
    int64_t nb = m->n / 64;
    int failed = 0;
#ifdef MO_AVX512
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : failed)
    for (int64_t b = 0; b <= nb; b++) {
        if (b == nb) {
            rows_generic(m, xf, sx, y, y_bf16, tokens, nb * 64, m->n);
            continue;
        }
        float *tile = NULL;
        if (m->meta == 1 || (m->meta == 0 && (m->form != 0 || !m->sz_bf16))) { /* else (s, c) are read directly */
            tile = (float *)tl_grow(&tl_tile, &tl_tile_cap, (size_t)TILE_GROUPS * 128 * sizeof(float));
            if (tile == NULL) {
                failed = 1;
                continue;
            }
        }
        int64_t t = 0;
#ifdef MO_HAVE_BF16_PAIRS
        if (x_bf16 && m->hi == NULL) {
            for (; t + 2 <= tokens; t += 2) block_bf16_2(m, tile, (const uint16_t *)x, sx, y, y_bf16, b, t);
            for (; t < tokens; t++) block_bf16_1(m, tile, (const uint16_t *)x, sx, y, y_bf16, b, t);
        }
#endif
        for (; t + 2 <= tokens; t += 2) block_2(m, tile, xf, sx, y, y_bf16, b, t);
        for (; t < tokens; t++) block_1(m, tile, xf, sx, y, y_bf16, b, t);
    }
#else
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b <= nb; b++) {
        if (b == nb)
            rows_generic(m, xf, sx, y, y_bf16, tokens, nb * 64, m->n);
        else
            block_portable(m, xf, sx, y, y_bf16, b, tokens);
    }
#endif
    return failed ? -1 : 0;
}

#include "native_dense.h"
#include "native_expert.h"
