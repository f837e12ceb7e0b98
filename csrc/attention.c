// Causal self-attention, forward and backward, for the small head sizes of TinyStories models on
// a CPU. At head size 8 (the 260K preset) PyTorch's CPU flash attention spends most of its time
// around GEMMs with an inner dimension of 8; here every loop runs over the keys of one query row
// instead, with keys and values stored transposed (head_dim rows of T), so the compiler
// vectorises them whatever the head size. One (batch, head) pair per OpenMP task, no allocation
// beyond one scratch buffer per thread. The backward pass recomputes the probabilities from the
// log-sum-exp of the forward pass, as flash attention does.
#include "attention.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// exp(x) for x <= 0 (a softmax argument minus its maximum): Cephes' expf, written so that it
// vectorises (glibc's expf only does under -ffast-math). Relative error about 1e-7.
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = (float)(int32_t)(x * 1.44269504088896341f - 0.5f);  // round(x / ln 2), as x <= 0
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;           // x - n ln 2, in two parts
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};  // 2^n
    return p * scale.f;
}

static void transpose(const float *x, float *xt, int T, int D) {  // (T, D) -> (D, T)
    for (int t = 0; t < T; t++)
        for (int d = 0; d < D; d++) xt[d * T + t] = x[t * D + d];
}

// s[j] = scale * q . k_j for j < n, keys transposed: kt (D, T)
static void scores(const float *q, const float *kt, float *s, int n, int T, int D, float scale) {
    for (int j = 0; j < n; j++) s[j] = 0.0f;
    for (int d = 0; d < D; d++) {
        float qd = q[d] * scale;
        const float *kd = kt + (size_t)d * T;
#pragma omp simd
        for (int j = 0; j < n; j++) s[j] += qd * kd[j];
    }
}

static float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) sum += a[j] * b[j];
    return sum;
}

int attention_forward(const float *q, const float *k, const float *v, float *out, float *lse, int BH, int T, int D,
                      int n_threads) {
    const float scale = 1.0f / sqrtf((float)D);
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *buf = malloc(sizeof(float) * (size_t)T * (2 * D + 1));  // kt, vt, one row of scores
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
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
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int j = 0; j < n; j++) {
                    s[j] = exp_nonpositive(s[j] - max);
                    sum += s[j];
                }
                for (int d = 0; d < D; d++) out[off + (size_t)i * D + d] = dot(s, vt + (size_t)d * T, n) / sum;
                lse[(size_t)bh * T + i] = max + logf(sum);
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

int attention_backward(const float *q, const float *k, const float *v, const float *out, const float *lse,
                       const float *dout, float *dq, float *dk, float *dv, int BH, int T, int D, int n_threads) {
    const float scale = 1.0f / sqrtf((float)D);
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *buf = malloc(sizeof(float) * (size_t)T * (4 * D + 2));  // kt, vt, dkt, dvt, p, ds
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int bh = 0; bh < BH; bh++) {
            if (!buf) continue;
            size_t off = (size_t)bh * T * D, TD = (size_t)T * D;
            float *kt = buf, *vt = buf + TD, *dkt = buf + 2 * TD, *dvt = buf + 3 * TD, *p = buf + 4 * TD, *ds = p + T;
            transpose(k + off, kt, T, D);
            transpose(v + off, vt, T, D);
            memset(dkt, 0, sizeof(float) * 2 * TD);  // dkt and dvt
            for (int i = 0; i < T; i++) {
                int n = i + 1;
                const float *qi = q + off + (size_t)i * D, *doi = dout + off + (size_t)i * D;
                float row_lse = lse[(size_t)bh * T + i];
                scores(qi, kt, p, n, T, D, scale);
#pragma omp simd
                for (int j = 0; j < n; j++) p[j] = exp_nonpositive(p[j] - row_lse);
                scores(doi, vt, ds, n, T, D, 1.0f);  // ds[j] = dout_i . v_j for now
                float delta = dot(doi, out + off + (size_t)i * D, D);  // sum_j p_j (dout_i . v_j)
#pragma omp simd
                for (int j = 0; j < n; j++) ds[j] = p[j] * (ds[j] - delta) * scale;
                for (int d = 0; d < D; d++) {
                    float *dvd = dvt + (size_t)d * T, *dkd = dkt + (size_t)d * T;
                    float g = doi[d], qd = qi[d];
#pragma omp simd
                    for (int j = 0; j < n; j++) {
                        dvd[j] += p[j] * g;
                        dkd[j] += ds[j] * qd;
                    }
                    dq[off + (size_t)i * D + d] = dot(ds, kt + (size_t)d * T, n);
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
