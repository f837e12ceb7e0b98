// The element-wise and normalising steps of the forward pass and the sampler, in one place.
#ifndef OPS_H
#define OPS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

// e^x within 2 ulp for x in [-87, 88], e^-87 below and e^88 above (~1e-38 and ~1e38: nothing
// overflows or leaves the normal floats), a meaningless finite value for NaN. Cephes' expf: x = n ln 2
// + r with |r| <= ln 2 / 2, a polynomial for e^r, then 2^n through the exponent bits. Plain integer
// and float arithmetic with no call into libm and no float compare to select on, so that a loop of it
// vectorises without -ffast-math (make lib; glibc's expf runs a value at a time and took a fifth of a
// batched decoding step) on every instruction set: GCC if-converts none of a float compare's selects,
// or nearbyintf's call on AVX2 and NEON, and under -ffast-math may fold the two parts of ln 2 into
// one (up to 40 ulp at x = -87).
static inline float exp_fast(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    const int32_t i = (int32_t)u > 0x42B00000 ? 0x42B00000 : (int32_t)u; // 88.0f: positive floats grow with their bits
    u = (uint32_t)i > 0xC2AE0000u ? 0xC2AE0000u : (uint32_t)i;            // -87.0f: negative ones too, as unsigned
    float clamped;
    memcpy(&clamped, &u, sizeof(clamped));
    // n = round(x / ln 2), by a truncating conversion
    const float v = clamped * 1.44269504088896341f;
    const int32_t n = (int32_t)(v + (v < 0.0f ? -0.5f : 0.5f));
    const float r = clamped - (float)n * 0.693359375f + (float)n * 2.12194440e-4f; // ln 2 in two parts
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (n + 127) << 23; // 2^n, n in [-126, 127]
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

// The sums below add lane by lane into SUM_LANES partial sums, then those in order: a running sum
// is one chain of dependent adds (4 cycles each) that the compiler may not reorder without
// -ffast-math (make lib); this order vectorises, and is the same on every instruction set.
#define SUM_LANES 16

// the largest of x (n,), n >= 1, on the floats' bits ordered as integers: a reduction the compiler
// vectorises without -ffast-math, where a float compare keeps a loop scalar (a NaN is larger than any
// number here)
float max_of(const float *x, int n);
// out[i] = exp_fast(x[i] / divisor - shift) for i < n (out may be x); returns the sum of them
float exp_sum(float *out, const float *x, int n, float divisor, float shift);
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
