// See ops.h. Plain loops: at the engine's sizes they are a few percent of a token's time, and
// the compiler vectorises them under -Ofast (make runfast, runomp).
#include "ops.h"

#include <math.h>

// the lanes' partial sums added in order
static float add_lanes(const float part[SUM_LANES]) {
    float sum = 0.0f;
    for (int k = 0; k < SUM_LANES; k++) sum += part[k];
    return sum;
}

// the sum of x (n,) in SUM_LANES partial sums
static float sum_lanes(const float *x, int n) {
    float part[SUM_LANES] = {0.0f};
    int i = 0;
    for (; i + SUM_LANES <= n; i += SUM_LANES) {
        for (int k = 0; k < SUM_LANES; k++) part[k] += x[i + k];
    }
    for (int k = 0; i + k < n; k++) part[k] += x[i + k];
    return add_lanes(part);
}

// x's bits as an integer that orders like x: negative floats' magnitudes count down (and back again)
static inline int32_t ordered(int32_t bits) { return bits < 0 ? bits ^ 0x7fffffff : bits; }

float max_of(const float *x, int n) {
    int32_t m = INT32_MIN;
    for (int i = 0; i < n; i++) {
        int32_t bits;
        memcpy(&bits, &x[i], sizeof(bits));
        m = ordered(bits) > m ? ordered(bits) : m;
    }
    m = ordered(m);
    float max;
    memcpy(&max, &m, sizeof(max));
    return max;
}

float exp_sum(float *out, const float *x, int n, float divisor, float shift) {
    for (int i = 0; i < n; i++) out[i] = x[i] / divisor - shift;
    for (int i = 0; i < n; i++) out[i] = exp_fast(out[i]); // (with the division above, it stays scalar)
    return sum_lanes(out, n);
}

void rmsnorm(float *o, const float *x, const float *weight, int size) {
    float part[SUM_LANES] = {0.0f};
    int j = 0;
    for (; j + SUM_LANES <= size; j += SUM_LANES) {
        for (int k = 0; k < SUM_LANES; k++) part[k] += x[j + k] * x[j + k];
    }
    for (int k = 0; j + k < size; k++) part[k] += x[j + k] * x[j + k];
    float ss = 1.0f / sqrtf(add_lanes(part) / size + 1e-5f);
    for (int j = 0; j < size; j++) o[j] = weight[j] * (ss * x[j]);
}

void softmax(float *x, int size) {
    const float sum = exp_sum(x, x, size, 1.0f, max_of(x, size)); // the maximum for numerical stability
    for (int i = 0; i < size; i++) x[i] /= sum;
}

void rope_table(float *rope, int pos, int head_size) {
    for (int i = 0; i < head_size; i += 2) {
        float freq = 1.0f / powf(10000.0f, i / (float)head_size);
        float val = pos * freq;
        rope[i] = cosf(val);
        rope[i + 1] = sinf(val);
    }
}

void rope_rotate(float *vec, int first, int n, const float *rope, int head_size) {
    for (int j = 0; j + 1 < n; j += 2) {
        const int i = (first + j) % head_size;
        float v0 = vec[j], v1 = vec[j + 1];
        vec[j] = v0 * rope[i] - v1 * rope[i + 1];
        vec[j + 1] = v0 * rope[i + 1] + v1 * rope[i];
    }
}

void swiglu(float *out, const float *h, const float *h2, int size) {
    for (int i = 0; i < size; i++) out[i] = h[i] / (1.0f + exp_fast(-h[i])) * h2[i];
}
