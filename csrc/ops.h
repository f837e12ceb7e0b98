// The element-wise and normalising steps of the forward pass and the sampler, in one place.
#ifndef OPS_H
#define OPS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

// e^x within 2 ulp (Cephes' expf: x = n ln 2 + r with |r| <= ln 2 / 2, a polynomial for e^r, then
// 2^n through the exponent bits); 0 below -87, inf above 88, NaN for NaN. Plain arithmetic with no
// call into libm, so that the loops of it below vectorise without -ffast-math (make lib), where
// glibc's expf ran one value at a time and took a fifth of a batched decoding step.
static inline float exp_fast(float x) {
    const float clamped = x > -87.0f ? (x < 88.0f ? x : 88.0f) : -87.0f; // NaN too: a number
    const float n = nearbyintf(clamped * 1.44269504088896341f);
    // (in double, rather than Cephes' ln 2 in two float parts, which -ffast-math would fold into one)
    const float r = (float)((double)clamped - (double)n * 0.6931471805599453);
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23; // 2^n, n in [-126, 127]
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    const float y = p * scale;
    return x != x ? x : x > 88.0f ? INFINITY : x < -87.0f ? 0.0f : y;
}

// o = weight * x / sqrt(mean(x^2) + 1e-5); o may be x
void rmsnorm(float *o, const float *x, const float *weight, int size);
// x = exp(x) / sum(exp(x)), in place: attention's softmax and the sampler's
void softmax(float *x, int size);
// cos and sin of each pair (i, i+1) of a head at position pos, into rope (head_size,): the same
// for every head and layer, so computed once per token
void rope_table(float *rope, int pos, int head_size);
// RoPE: rotates the pairs (i, i+1) of vec (n,) by the angles of rope_table, where vec holds the
// values first..first+n-1 (first even) of a vector of heads of head_size
void rope_rotate(float *vec, int first, int n, const float *rope, int head_size);
// SwiGLU's gate: out = silu(h) * h2 = h * sigmoid(h) * h2
void swiglu(float *out, const float *h, const float *h2, int size);

#endif
