// AArch64 NEON kernels (Apple silicon, Graviton, Raspberry Pi 5); int8 dot products through
// vdotq_s32 where the target has the dot-product extension (__ARM_FEATURE_DOTPROD), else
// widening multiplies. See kernels.h.
#include "kernels.h"

#ifdef KERNELS_NEON
#include <arm_neon.h>

void rows_f32_neon(float *out, const float *const w[ROWS], const float *x, int n) {
    float32x4_t acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = vdupq_n_f32(0.0f);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        float32x4_t x0 = vld1q_f32(x + j), x1 = vld1q_f32(x + j + 4);
        for (int r = 0; r < ROWS; r++) {
            __builtin_prefetch(w[r] + j + PREFETCH * n);
            acc[r][0] = vfmaq_f32(acc[r][0], vld1q_f32(w[r] + j), x0);
            acc[r][1] = vfmaq_f32(acc[r][1], vld1q_f32(w[r] + j + 4), x1);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        float sum = vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1]));
        for (int k = j; k < n; k++) sum += w[r][k] * x[k];
        out[r] = sum;
    }
}

// acc + per 32-bit lane l, the sum of the products of bytes 4l..4l+3 of a and b
static inline int32x4_t dot4(int32x4_t acc, int8x16_t a, int8x16_t b) {
#ifdef __ARM_FEATURE_DOTPROD
    return vdotq_s32(acc, a, b);
#else
    // activations are in [-127, 127], so a pair of products fits in int16
    int16x8_t pairs = vpaddq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)), vmull_high_s8(a, b));
    return vpadalq_s16(acc, pairs);
#endif
}

// The scale of each int32 lane of a chunk of 16 values whose first group is s[0], gs = 4 or 8.
static inline float32x4_t lane_scales(const float *s, int gs) {
    if (gs == 4) return vld1q_f32(s);
    float32x4_t v = vcombine_f32(vld1_f32(s), vld1_f32(s));
    return vzip1q_f32(v, v); // s0 s0 s1 s1
}

void rows_q8_neon(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                  const QVector *xq, int n, int gs, const int *lane_group) {
    (void)lane_group; // lane_scales reads the layout from gs
    float32x4_t acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = vdupq_n_f32(0.0f);
    int j = 0;
    if (gs >= 16) {
        // a group is gs / 16 chunks: their int8 dot products add up in int32 lanes, converted and
        // scaled once a group (|sum| <= gs * 128 * 127 < 2^31)
        for (int g = 0; g < n / gs; g++) {
            int32x4_t dot[ROWS];
            for (int r = 0; r < ROWS; r++) dot[r] = vdupq_n_s32(0);
            for (; j < (g + 1) * gs; j += 16) {
                int8x16_t xv = vld1q_s8(xq->q + j);
                for (int r = 0; r < ROWS; r++) {
                    __builtin_prefetch(wq[r] + j + PREFETCH * n);
                    dot[r] = dot4(dot[r], xv, vld1q_s8(wq[r] + j));
                }
            }
            for (int r = 0; r < ROWS; r++) {
                acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(dot[r]), ws[r][g] * xq->s[g]);
            }
        }
    } else {
        // a chunk holds 16 / gs whole groups
        for (int g0 = 0; j + 16 <= n; j += 16, g0 += 16 / gs) {
            int8x16_t xv = vld1q_s8(xq->q + j);
            float32x4_t sx = lane_scales(xq->s + g0, gs);
            for (int r = 0; r < ROWS; r++) {
                __builtin_prefetch(wq[r] + j + PREFETCH * n);
                int32x4_t dot = dot4(vdupq_n_s32(0), xv, vld1q_s8(wq[r] + j));
                float32x4_t scale = vmulq_f32(lane_scales(ws[r] + g0, gs), sx);
                acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(dot), scale);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = vaddvq_f32(acc[r]);
    if (j < n) rows_q8_tail(out, wq, ws, xq, j, n, gs); // < 16 values left: whole groups
}

// values j..j+3 of rows of fp32 or fp16
static inline float32x4_t load_row(const void *rows, size_t at, KVType type) {
    if (type == KV_F16) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)rows + at)));
    return vld1q_f32((const float *)rows + at);
}

void dot_rows_neon(float *out, const float *x, const void *rows, int n_rows, int n, int stride, KVType type) {
    for (int t = 0; t < n_rows; t++) {
        float32x4_t acc = vdupq_n_f32(0.0f);
        for (int j = 0; j < n; j += 4) acc = vfmaq_f32(acc, vld1q_f32(x + j), load_row(rows, (size_t)t * stride + j, type));
        out[t] = vaddvq_f32(acc);
    }
}

void add_weighted_rows_neon(float *out, const float *a, const void *rows, int n_rows, int n, int stride,
                            KVType type) {
    for (int j = 0; j < n; j += 4) { // each 4 values of out in a register across the rows
        float32x4_t acc = vld1q_f32(out + j);
        for (int t = 0; t < n_rows; t++) acc = vfmaq_n_f32(acc, load_row(rows, (size_t)t * stride + j, type), a[t]);
        vst1q_f32(out + j, acc);
    }
}
#endif
