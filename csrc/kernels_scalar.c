// The portable kernels: plain C, the reference for the SIMD files and the fallback. See kernels.h.
#include "kernels.h"

void rows_f32_scalar(float *out, const float *const w[ROWS], const float *x, int n) {
    for (int r = 0; r < ROWS; r++) {
        float sum = 0.0f;
        for (int j = 0; j < n; j++) sum += w[r][j] * x[j];
        out[r] = sum;
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
