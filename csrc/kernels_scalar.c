// The portable kernels: plain C, the reference for the SIMD files and the fallback. See kernels.h.
#include "kernels.h"

#include <string.h>

void rows_f32_scalar(float *out, const float *const w[ROWS], const float *x, int n) {
    for (int r = 0; r < ROWS; r++) {
        float sum = 0.0f;
        for (int j = 0; j < n; j++) sum += w[r][j] * x[j];
        out[r] = sum;
    }
}

typedef float Panel __attribute__((vector_size(PANEL * sizeof(float)))); // PANEL rows' values

static inline Panel load_panel(const float *p) {
    Panel v;
    memcpy(&v, p, sizeof(v));
    return v;
}

// panels_f32 for a constant nc (once inlined): 2 * nc sums in registers
static inline __attribute__((always_inline)) void panels_block(float *out, const float *p0, const float *p1,
                                                               const float *const x[], int nc, int n) {
    Panel a0[PANEL_COLS], a1[PANEL_COLS];
    for (int c = 0; c < nc; c++) a0[c] = a1[c] = (Panel){0};
    for (int j = 0; j < n; j++) {
        Panel w0 = load_panel(p0 + (size_t)j * PANEL), w1 = load_panel(p1 + (size_t)j * PANEL);
#if defined(__x86_64__) && defined(__GNUC__)
        // in registers: below 5 columns GCC folds the loads into each FMA, twice the loads per FMA,
        // 1.4x the time a column
        __asm__("" : "+v"(w0), "+v"(w1));
#endif
        for (int c = 0; c < nc; c++) {
            a0[c] += w0 * x[c][j]; // (an FMA where the target has them)
            a1[c] += w1 * x[c][j];
        }
    }
    for (int c = 0; c < nc; c++) {
        memcpy(out + c * 2 * PANEL, &a0[c], sizeof(Panel));
        memcpy(out + c * 2 * PANEL + PANEL, &a1[c], sizeof(Panel));
    }
}

void panels_f32(float *out, const float *p0, const float *p1, const float *const x[], int nc, int n) {
    switch (nc) { // (constant column counts keep the sums in registers)
    case 6: panels_block(out, p0, p1, x, 6, n); break;
    case 5: panels_block(out, p0, p1, x, 5, n); break;
    case 4: panels_block(out, p0, p1, x, 4, n); break;
    case 3: panels_block(out, p0, p1, x, 3, n); break;
    case 2: panels_block(out, p0, p1, x, 2, n); break;
    default: panels_block(out, p0, p1, x, 1, n);
    }
}

void rows_q8_tail(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                  const QVector *xq, int j, int n, int gs) {
    for (int r = 0; r < ROWS; r++) {
        float sum = 0.0f;
        for (int g = j / gs; g < n / gs; g++) {
            int32_t dot = 0; // at most 65536 * 128 * 127 < 2^31 (gs <= dim <= 65536)
            for (int k = g * gs; k < (g + 1) * gs; k++) dot += (int32_t)xq->q[k] * wq[r][k];
            sum += (float)dot * ws[r][g] * xq->s[g];
        }
        out[r] += sum;
    }
}

void rows_q8_scalar(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                    const QVector *xq, int n, int gs, const int *lane_group) {
    (void)lane_group; // the SIMD kernels' signature
    for (int r = 0; r < ROWS; r++) out[r] = 0.0f;
    rows_q8_tail(out, wq, ws, xq, 0, n, gs);
}

// IEEE binary16 by hand, so that the portable build needs no _Float16 or __fp16 from its compiler

float f16_value(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000 | mantissa << 13; // inf, NaN
    } else if (exponent != 0) {
        bits = sign | (exponent + 112) << 23 | mantissa << 13; // rebias 15 -> 127
    } else {
        float v = mantissa * 0x1p-24f; // zero or subnormal: exact in fp32
        return sign ? -v : v;
    }
    float v;
    memcpy(&v, &bits, sizeof(v));
    return v;
}

uint16_t f16_from(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof(bits));
    const uint16_t sign = (bits >> 16) & 0x8000;
    const uint32_t magnitude = bits & 0x7fffffff;
    if (magnitude > 0x7f800000) return sign | 0x7e00;   // NaN (quiet)
    if (magnitude >= 0x477ff000) return sign | 0x7c00;  // 65520 and up round to inf
    if (magnitude >= 0x38800000) {                      // a normal half (2^-14 and up)
        // drop 13 mantissa bits, rounding to nearest even; a carry moves into the exponent
        uint32_t rounded = magnitude + 0xfff + ((magnitude >> 13) & 1);
        return sign | (uint16_t)((rounded >> 13) - (112 << 10));
    }
    // a subnormal half: the value in units of 2^-24, rounded to nearest even
    const int shift = 126 - (int)(magnitude >> 23); // 14 and up
    if (shift > 24) return sign;                    // below 2^-25: rounds to zero
    const uint32_t mantissa = (magnitude & 0x7fffff) | 0x800000, half = 1u << (shift - 1);
    const uint32_t units = mantissa >> shift, rest = mantissa & ((1u << shift) - 1);
    return sign | (uint16_t)(units + (rest > half || (rest == half && (units & 1))));
}

// row t's value j as fp32
static inline float row_value(const void *rows, size_t at, KVType type) {
    return type == KV_F16 ? f16_value(((const uint16_t *)rows)[at]) : ((const float *)rows)[at];
}

void dot_rows_scalar(float *out, const float *x, const void *rows, int n_rows, int n, int stride, KVType type) {
    for (int t = 0; t < n_rows; t++) {
        float sum = 0.0f;
        for (int j = 0; j < n; j++) sum += x[j] * row_value(rows, (size_t)t * stride + j, type);
        out[t] = sum;
    }
}

void add_weighted_rows_scalar(float *out, const float *a, const void *rows, int n_rows, int n, int stride,
                              KVType type) {
    for (int t = 0; t < n_rows; t++) {
        for (int j = 0; j < n; j++) out[j] += a[t] * row_value(rows, (size_t)t * stride + j, type);
    }
}
