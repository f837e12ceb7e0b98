// Causal self-attention, forward and backward, for the small head sizes of TinyStories models on
// a CPU. At head size 8 (the 260K preset) PyTorch's CPU flash attention spends most of its time
// around GEMMs with an inner dimension of 8; here every loop runs over the keys of one query row
// instead, with keys and values stored transposed (head_dim rows of T), so the compiler
// vectorises them whatever the head size. One (batch, head) pair per OpenMP task, no allocation
// beyond one scratch buffer per thread. The backward pass recomputes the probabilities from the
// log-sum-exp of the forward pass, as flash attention does.
#include "attention.h"
#include "../ops.h" // exp_fast

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// n rounded up to whole vectors of 16 floats; score rows have room for it
static inline int round_up(int n) { return (n + 15) & ~15; }

static void transpose(const float *x, float *xt, int T, int D) {  // (T, D) -> (D, T)
    for (int t = 0; t < T; t++)
        for (int d = 0; d < D; d++) xt[d * T + t] = x[t * D + d];
}

// s[j] = scale * q . k_j for j < n, keys transposed: kt (D, T)
static inline void scores_any(const float *q, const float *kt, float *s, int n, int T, int D, float scale) {
    for (int j = 0; j < n; j++) s[j] = 0.0f;
    for (int d = 0; d < D; d++) {
        float qd = q[d] * scale;
        const float *kd = kt + (size_t)d * T;
#pragma omp simd
        for (int j = 0; j < n; j++) s[j] += qd * kd[j];
    }
}

static void scores(const float *q, const float *kt, float *s, int n, int T, int D, float scale) {
    if (D == 8) {  // the 260K shape: a constant D unrolls, and each score's sum stays in a register
#pragma omp simd
        for (int j = 0; j < n; j++) {
            float acc = 0.0f;
            for (int d = 0; d < 8; d++) acc += q[d] * kt[(size_t)d * T + j];
            s[j] = acc * scale;
        }
    } else {
        scores_any(q, kt, s, n, T, D, scale);
    }
}

// s[j] = exp(s[j] - shift) for j < n, 0 from there up to the whole vector after n_total; returns the
// sum. A function of its own: inside the OpenMP-outlined loops GCC left this loop scalar.
static float exp_shifted(float *s, int n, int n_total, float shift) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < round_up(n_total); j++) {
        s[j] = j < n ? exp_fast(s[j] - shift) : 0.0f;
        sum += s[j];
    }
    return sum;
}

static float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) sum += a[j] * b[j];
    return sum;
}

// out[d] = scale * sum_j w[j] xt[d][j] for the D rows of xt (D, T): attention's weighted sum of
// values (forward) and of keys (dq). At D = 8 one pass over w with eight sums in registers.
static void weighted_sum(const float *w, const float *xt, float *out, int n, int T, int D, float scale) {
    if (D == 8) {
        const float *x0 = xt, *x1 = xt + T, *x2 = xt + 2 * T, *x3 = xt + 3 * T, *x4 = xt + 4 * T, *x5 = xt + 5 * T,
                    *x6 = xt + 6 * T, *x7 = xt + 7 * T;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, a4 = 0.0f, a5 = 0.0f, a6 = 0.0f, a7 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
        for (int j = 0; j < n; j++) {
            a0 += w[j] * x0[j], a1 += w[j] * x1[j], a2 += w[j] * x2[j], a3 += w[j] * x3[j];
            a4 += w[j] * x4[j], a5 += w[j] * x5[j], a6 += w[j] * x6[j], a7 += w[j] * x7[j];
        }
        out[0] = a0 * scale, out[1] = a1 * scale, out[2] = a2 * scale, out[3] = a3 * scale;
        out[4] = a4 * scale, out[5] = a5 * scale, out[6] = a6 * scale, out[7] = a7 * scale;
    } else {
        for (int d = 0; d < D; d++) out[d] = dot(w, xt + (size_t)d * T, n) * scale;
    }
}

// One thread's scratch floats; if malloc fails, the call reports it and the thread skips its work.
static float *scratch(size_t n, int *failed) {
    float *buf = malloc(sizeof(float) * n);
    if (!buf) {
#pragma omp atomic write
        *failed = 1;
    }
    return buf;
}

int attention_forward(const float *q, const float *k, const float *v, float *out, float *lse, int BH, int T, int D,
                      int n_threads) {
    const float scale = 1.0f / sqrtf((float)D);
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *buf = scratch((size_t)T * (2 * D + 1) + 16, &failed);  // kt, vt, one row of scores
#pragma omp for schedule(static)
        for (int bh = 0; bh < BH; bh++) {
            if (!buf) continue;
            size_t off = (size_t)bh * T * D;
            float *kt = buf, *vt = buf + (size_t)T * D, *s = buf + (size_t)2 * T * D;
            transpose(k + off, kt, T, D);
            transpose(v + off, vt, T, D);
            for (int i = 0; i < T; i++) {
                int n = i + 1;  // causal: query i sees keys 0..i
                scores(q + off + (size_t)i * D, kt, s, n, T, D, scale);
                float max = s[0];
#pragma omp simd reduction(max : max)
                for (int j = 1; j < n; j++) max = s[j] > max ? s[j] : max;
                float sum = exp_shifted(s, n, n, max);
                weighted_sum(s, vt, out + off + (size_t)i * D, n, T, D, 1.0f / sum);
                lse[(size_t)bh * T + i] = max + logf(sum);
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

// Rows of queries handled together in the backward pass, so that each read-modify-write of the key
// and value gradients serves ROWS of them (2x at head size 8).
#define ROWS 4

int attention_backward(const float *q, const float *k, const float *v, const float *out, const float *lse,
                       const float *dout, float *dq, float *dk, float *dv, int BH, int T, int D, int n_threads) {
    const float scale = 1.0f / sqrtf((float)D);
    const size_t TD = (size_t)T * D, row = (size_t)T + 16;  // a row of scores, with room for round_up
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        // kt, vt, dkt, dvt (D, T) each; ROWS rows of p and of ds; zeros standing in for missing rows
        float *buf = scratch(4 * TD + 2 * ROWS * row + D, &failed);
#pragma omp for schedule(static)
        for (int bh = 0; bh < BH; bh++) {
            if (!buf) continue;
            size_t off = (size_t)bh * TD;
            float *kt = buf, *vt = buf + TD, *dkt = buf + 2 * TD, *dvt = buf + 3 * TD;
            float *p = buf + 4 * TD, *ds = p + ROWS * row, *zeros = ds + ROWS * row;
            transpose(k + off, kt, T, D);
            transpose(v + off, vt, T, D);
            memset(dkt, 0, sizeof(float) * 2 * TD);  // dkt and dvt
            memset(zeros, 0, sizeof(float) * D);
            for (int i0 = 0; i0 < T; i0 += ROWS) {
                int n_max = i0 + ROWS < T ? i0 + ROWS : T;  // keys of the block's last row
                const float *qr[ROWS], *dor[ROWS];
                for (int r = 0; r < ROWS; r++) {
                    int i = i0 + r, n = i + 1;
                    float *pr = p + r * row, *dsr = ds + r * row;
                    if (i >= T) {  // past the end: a row of zeros changes no gradient
                        qr[r] = dor[r] = zeros;
                        memset(pr, 0, sizeof(float) * row);
                        memset(dsr, 0, sizeof(float) * row);
                        continue;
                    }
                    qr[r] = q + off + (size_t)i * D;
                    dor[r] = dout + off + (size_t)i * D;
                    scores(qr[r], kt, pr, n_max, T, D, scale);
                    exp_shifted(pr, n, n_max, lse[(size_t)bh * T + i]);  // 0 past the row's own keys
                    scores(dor[r], vt, dsr, n_max, T, D, 1.0f);  // dout_i . v_j for now
                    float delta = dot(dor[r], out + off + (size_t)i * D, D);  // sum_j p_j (dout_i . v_j)
#pragma omp simd
                    for (int j = 0; j < n_max; j++) dsr[j] = pr[j] * (dsr[j] - delta) * scale;
                    weighted_sum(dsr, kt, dq + off + (size_t)i * D, n_max, T, D, 1.0f);
                }
                for (int d = 0; d < D; d++) {
                    float *dvd = dvt + (size_t)d * T, *dkd = dkt + (size_t)d * T;
                    float g0 = dor[0][d], g1 = dor[1][d], g2 = dor[2][d], g3 = dor[3][d];
                    float q0 = qr[0][d], q1 = qr[1][d], q2 = qr[2][d], q3 = qr[3][d];
                    const float *p0 = p, *p1 = p + row, *p2 = p + 2 * row, *p3 = p + 3 * row;
                    const float *s0 = ds, *s1 = ds + row, *s2 = ds + 2 * row, *s3 = ds + 3 * row;
#pragma omp simd
                    for (int j = 0; j < n_max; j++) {
                        dvd[j] += p0[j] * g0 + p1[j] * g1 + p2[j] * g2 + p3[j] * g3;
                        dkd[j] += s0[j] * q0 + s1[j] * q1 + s2[j] * q2 + s3[j] * q3;
                    }
                }
            }
            for (int t = 0; t < T; t++)
                for (int d = 0; d < D; d++) {
                    dk[off + (size_t)t * D + d] = dkt[(size_t)d * T + t];
                    dv[off + (size_t)t * D + d] = dvt[(size_t)d * T + t];
                }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
