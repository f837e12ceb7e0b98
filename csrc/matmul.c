// Matrix-vector products: the row-blocking driver over the kernels of kernels.h, and the one
// place where the instruction set's kernels are chosen.
#include "matmul.h"
#include "kernels.h"
#include "ops.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

#if defined(KERNELS_AVX512)
#define rows_f32 rows_f32_avx512
#ifdef __AVX512VNNI__
#define KERNELS_NAME "avx512-vnni"
#else
#define KERNELS_NAME "avx512"
#endif
#elif defined(KERNELS_AVX2)
#define rows_f32 rows_f32_avx2
#ifdef __AVXVNNI__
#define KERNELS_NAME "avx2-vnni"
#else
#define KERNELS_NAME "avx2"
#endif
#elif defined(KERNELS_NEON)
#define rows_f32 rows_f32_neon
#ifdef __ARM_FEATURE_DOTPROD
#define KERNELS_NAME "neon-dotprod"
#else
#define KERNELS_NAME "neon"
#endif
#else
#define rows_f32 rows_f32_scalar
#define KERNELS_NAME "portable"
#endif

typedef void RowsQ8(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                    const QVector *xq, int n, int gs, const int *lane_group);

// whether chunks of `chunk` int8 values hold whole groups of gs or lie inside one
static inline int fits(int gs, int chunk) { return gs >= 4 && (chunk % gs == 0 || gs % chunk == 0); }

// The Q8_0 kernel for group size gs, and the chunk of values its SIMD steps take (0: portable C).
static RowsQ8 *q8_kernel(int gs, int *chunk) {
    (void)gs; // the portable build takes any
#if defined(KERNELS_AVX512)
    if (gs == 32) { // the 256-bit kernel's four-groups-at-once path: 1.25x the 512-bit one here
        *chunk = 32;
        return rows_q8_avx2;
    }
    if (fits(gs, 64)) {
        *chunk = 64;
        return rows_q8_avx512;
    }
#endif
#if defined(KERNELS_AVX2)
    if (fits(gs, 32)) {
        *chunk = 32;
        return rows_q8_avx2;
    }
#endif
#if defined(KERNELS_NEON)
    if (fits(gs, 16)) {
        *chunk = 16;
        return rows_q8_neon;
    }
#endif
    *chunk = 0;
    return rows_q8_scalar;
}

const char *matmul_kernels(void) { return KERNELS_NAME; }

void quantize_q8(QVector *xq, const float *x, int n, int group_size) {
    for (int g = 0; g < n / group_size; g++) {
        const float *xg = x + (size_t)g * group_size;
        // max |x| on the bits of |x|, which order as integers: fmaxf is a call into libm without
        // -ffast-math (make lib)
        uint32_t bits_max = 0;
        for (int i = 0; i < group_size; i++) {
            uint32_t bits;
            memcpy(&bits, &xg[i], sizeof(bits));
            bits &= 0x7fffffffu;
            bits_max = bits > bits_max ? bits : bits_max;
        }
        float wmax;
        memcpy(&wmax, &bits_max, sizeof(wmax));
        float scale = wmax / 127.0f;
        float inv = scale > 0.0f ? 1.0f / scale : 0.0f; // an all-zero group stays zero
        xq->s[g] = scale;
        int8_t *q = xq->q + (size_t)g * group_size;
        for (int i = 0; i < group_size; i++) {
            // nearbyintf rounds half to even, like numpy, and vectorises (lrintf does not); the
            // clamp only keeps a NaN from being converted to int, which is undefined behaviour
            float v = fminf(fmaxf(nearbyintf(xg[i] * inv), -127.0f), 127.0f);
            q[i] = (int8_t)(int)v;
        }
    }
}

// this thread's share [*lo, *hi) of n items
static void share(Team team, int n, int *lo, int *hi) {
    *lo = (int)((long long)n * team.id / team.n);
    *hi = (int)((long long)n * (team.id + 1) / team.n);
}

// whether this build packs Q8_0 W of group size gs
static int q8_packs(int gs) {
#ifdef KERNELS_Q8_PANELS
    return gs % 4 == 0;
#else
    (void)gs;
    return 0;
#endif
}

size_t panels_size(int n, int d, int group_size) {
    if (!group_size) return (size_t)((d + 2 * PANEL - 1) / (2 * PANEL)) * 2 * PANEL * n * sizeof(float);
    if (!q8_packs(group_size)) return 0;
    const size_t panels = (size_t)(d + 31) / 32 * 2; // whole pairs of 16 rows
    return panels * (16 * (size_t)n + 128 * (size_t)(n / group_size));
}

void pack_panels(void *panels, const Matrix *w, int n, int d, int group_size) {
    const int gs = group_size;
    if (!gs) {
        float *out = panels;
        const int rows = (int)(panels_size(n, d, 0) / sizeof(float) / n);
        for (int p = 0; p < rows / PANEL; p++) {
            for (int j = 0; j < n; j++) {
                float *dst = out + ((size_t)p * n + j) * PANEL;
                for (int i = 0; i < PANEL; i++) {
                    const int r = p * PANEL + i;
                    dst[i] = r < d ? w->f[(size_t)r * n + j] : 0.0f;
                }
            }
        }
        return;
    }
    int8_t *out = panels;
    const int groups = n / gs, rows = (int)((size_t)(d + 31) / 32 * 32);
    for (int p = 0; p < rows / 16; p++) {
        for (int g = 0; g < groups; g++) {
            int8_t *values = out + ((size_t)p * groups + g) * (16 * (size_t)gs + 128);
            int32_t sums[16];
            float scales[16];
            for (int i = 0; i < 16; i++) {
                const int r = p * 16 + i;
                const int8_t *row = r < d ? w->q + (size_t)r * n + (size_t)g * gs : NULL;
                sums[i] = 0;
                for (int k = 0; k < gs; k++) {
                    const int8_t v = row ? row[k] : 0;
                    values[16 * (k / 4 * 4) + 4 * i + k % 4] = v; // 4 columns of the 16 rows at a time
                    sums[i] += 128 * v;
                }
                scales[i] = row ? w->s[(size_t)r * groups + g] : 0.0f;
            }
            memcpy(values + 16 * gs, sums, sizeof(sums));
            memcpy(values + 16 * gs + 64, scales, sizeof(scales));
        }
    }
}

// matmul_rope on packed panels: the threads share out pairs of panels (2 * PANEL rows of fp32 W,
// or 32 of Q8_0)
static void matmul_panels(Team team, float *out, const Matrix *w, const float *x, const QVector *xq, int n,
                          int d, int n_rows, int gs, const float *rope, const int *pos, int head_size) {
    const int span = gs ? 32 : 2 * PANEL, cols = gs ? Q8_COLS : PANEL_COLS;
    const size_t pair = panels_size(n, span, gs); // bytes of a pair of panels
    int b0, b1;
    share(team, (d + span - 1) / span, &b0, &b1);
    for (int b = b0; b < b1; b++) {
        const int r0 = b * span, nr = d - r0 < span ? d - r0 : span;
        const char *p0 = (const char *)w->panels + (size_t)b * pair, *p1 = p0 + pair / 2;
        for (int c0 = 0; c0 < n_rows; c0 += cols) {
            const int nc = n_rows - c0 < cols ? n_rows - c0 : cols;
            float res[PANEL_COLS][2 * PANEL > 32 ? 2 * PANEL : 32];
            const int stride = gs ? 32 : 2 * PANEL; // of res's rows, as the kernels write them
            if (gs) { // (only builds with KERNELS_Q8_PANELS pack Q8_0 W)
#ifdef KERNELS_Q8_PANELS
                QVector xc[Q8_COLS];
                for (int c = 0; c < nc; c++) xc[c] = (QVector){xq->q + (size_t)(c0 + c) * n, xq->s + (size_t)(c0 + c) * (n / gs)};
                panels_q8_avx512(res[0], (const int8_t *)p0, (const int8_t *)p1, xc, nc, n, gs);
#else
                (void)xq;
#endif
            } else {
                const float *xc[PANEL_COLS];
                for (int c = 0; c < nc; c++) xc[c] = x + (size_t)(c0 + c) * n;
                panels_f32(res[0], (const float *)p0, (const float *)p1, xc, nc, n);
            }
            for (int c = 0; c < nc; c++) {
                float *r = res[0] + (size_t)c * stride;
                if (rope) rope_rotate(r, r0, nr, rope + (size_t)pos[c0 + c] * head_size, head_size);
                float *o = out + (size_t)(c0 + c) * d + r0;
                for (int i = 0; i < nr; i++) o[i] = r[i];
            }
        }
    }
}

void matmul_rope(Team team, float *out, const Matrix *w, const float *x, const QVector *xq, int n,
                 int d, int n_rows, int group_size, const float *rope, const int *pos, int head_size) {
    if (w->panels) {
        matmul_panels(team, out, w, x, xq, n, d, n_rows, group_size, rope, pos, head_size);
        return;
    }
    const int gs = group_size, groups = gs ? n / gs : 0; // scales per row
    int chunk = 0, lane_group[16] = {0};
    RowsQ8 *rows_q8 = gs ? q8_kernel(gs, &chunk) : NULL;
    for (int l = 0; l < chunk / 4; l++) lane_group[l] = gs < chunk ? 4 * l / gs : 0;
    int b0, b1;
    share(team, (d + ROWS - 1) / ROWS, &b0, &b1);
    for (int b = b0; b < b1; b++) {
        const int r0 = b * ROWS;
        const int nr = d - r0 < ROWS ? d - r0 : ROWS;
        // a short last block repeats its last row rather than branching in the kernels
        size_t row[ROWS];
        for (int r = 0; r < ROWS; r++) row[r] = (size_t)(r0 + (r < nr ? r : nr - 1));
        const float *wf[ROWS];
        const int8_t *wq[ROWS];
        const float *ws[ROWS];
        for (int r = 0; r < ROWS; r++) {
            if (w->f) {
                wf[r] = w->f + row[r] * n;
            } else {
                wq[r] = w->q + row[r] * n;
                ws[r] = w->s + row[r] * groups;
            }
        }
        // the block's rows of W stay in L1 while every row of x goes past them
        for (int c = 0; c < n_rows; c++) {
            float res[ROWS];
            if (w->f) {
                rows_f32(res, wf, x + (size_t)c * n, n);
            } else {
                QVector xc = {xq->q + (size_t)c * n, xq->s + (size_t)c * groups};
                rows_q8(res, wq, ws, &xc, n, gs, lane_group);
            }
            // (ROWS is even and so are d and head_size when rope is given: the pairs are whole)
            if (rope) rope_rotate(res, r0, nr, rope + (size_t)pos[c] * head_size, head_size);
            for (int r = 0; r < nr; r++) out[(size_t)c * d + r0 + r] = res[r];
        }
    }
}

void matmul(Team team, float *out, const Matrix *w, const float *x, const QVector *xq, int n, int d,
            int n_rows, int group_size) {
    matmul_rope(team, out, w, x, xq, n, d, n_rows, group_size, NULL, NULL, 0);
}

// ----------------------------------------------------------------------------
// attention's products over the KV cache

#if defined(KERNELS_AVX2) || defined(KERNELS_NEON)
// the SIMD kernels take widths of whole vectors (and fp16 rows on x86 with F16C)
static int simd_rows(int head_size, KVType type) {
#if defined(KERNELS_AVX2)
    return head_size % 8 == 0 && (type == KV_F32 || KERNELS_F16_X86);
#else
    (void)type;
    return head_size % 4 == 0;
#endif
}
#endif

void dot_rows(float *out, const float *x, const void *rows, int n, int head_size, int stride,
              KVType type) {
#if defined(KERNELS_AVX2)
    if (simd_rows(head_size, type)) {
        dot_rows_avx2(out, x, rows, n, head_size, stride, type);
        return;
    }
#elif defined(KERNELS_NEON)
    if (simd_rows(head_size, type)) {
        dot_rows_neon(out, x, rows, n, head_size, stride, type);
        return;
    }
#endif
    dot_rows_scalar(out, x, rows, n, head_size, stride, type);
}

void add_weighted_rows(float *out, const float *a, Rows first, Rows then, int head_size) {
#if defined(KERNELS_AVX2)
    if (simd_rows(head_size, first.type) && simd_rows(head_size, then.type)) {
        add_weighted_rows_avx2(out, a, first, then, head_size);
        return;
    }
#elif defined(KERNELS_NEON)
    if (simd_rows(head_size, first.type) && simd_rows(head_size, then.type)) { // (one sum a value, in row order)
        add_weighted_rows_neon(out, a, first.rows, first.n, head_size, first.stride, first.type);
        add_weighted_rows_neon(out, a + first.n, then.rows, then.n, head_size, then.stride, then.type);
        return;
    }
#endif
    add_weighted_rows_scalar(out, a, first.rows, first.n, head_size, first.stride, first.type);
    add_weighted_rows_scalar(out, a + first.n, then.rows, then.n, head_size, then.stride, then.type);
}

size_t kv_size(KVType type) { return type == KV_F16 ? sizeof(uint16_t) : sizeof(float); }

void f32_to_f16(uint16_t *out, const float *x, int n) {
    for (int i = 0; i < n; i++) out[i] = f16_from(x[i]);
}

void f16_to_f32(float *out, const uint16_t *h, int n) {
    for (int i = 0; i < n; i++) out[i] = f16_value(h[i]);
}
