// Matrix-vector products, the one place where fp32 and Q8_0 weights differ. Everything else
// in the forward pass is shared.
#ifndef MATMUL_H
#define MATMUL_H

#include <stdint.h>

#include "checkpoint.h"

// An activation vector quantised on the fly for Q8_0 matrices: symmetric int8 per group of
// group_size values, x ~= q * s.
typedef struct {
    int8_t *q; // (n,)
    float *s;  // (n / group_size,)
} QVector;

void quantize_q8(QVector *xq, const float *x, int n, int group_size);

// out (d,) = W (d, n) @ x (n,), with xq the quantised x when W is Q8_0. Shares the rows out
// among the threads of the enclosing OpenMP parallel region, without a barrier at the end, so
// that one region can run several independent matmuls; runs serially outside a region.
void matmul(float *out, const Matrix *w, const float *x, const QVector *xq, int n, int d,
            int group_size);
// matmul, then RoPE on out as ops.h's rope_rotate does it with the table rope (head_size,), or
// none if rope is NULL: each thread rotates the pairs of rows it computed, so nothing waits between
void matmul_rope(float *out, const Matrix *w, const float *x, const QVector *xq, int n, int d,
                 int group_size, const float *rope, int head_size);

// The KV cache's element type: fp32, or IEEE fp16 (binary16, kept as uint16_t), which halves the
// cache's memory and the bytes attention reads, at fp16's rounding of the keys and values
// (llama.cpp's default cache type).
typedef enum { KV_F32, KV_F16 } KVType;

// Attention's two products over n rows of a head's cache (row t: position t, head_size values of
// `type`), on the calling thread alone: attention shares out heads, not rows.
// out[t] = x . row t, for t < n
void dot_rows(float *out, const float *x, const void *rows, int n, int head_size, KVType type);
// out += the sum over t < n of a[t] * row t
void add_weighted_rows(float *out, const float *a, const void *rows, int n, int head_size,
                       KVType type);
// fp32 -> fp16, rounding to nearest even (overflow gives inf, NaN stays NaN); and back, exactly
void f32_to_f16(uint16_t *out, const float *x, int n);
void f16_to_f32(float *out, const uint16_t *h, int n);

// The kernels this build uses: "avx512-vnni", "avx512", "avx2-vnni", "avx2", "neon-dotprod",
// "neon" or "portable" (kernels.h).
const char *matmul_kernels(void);

#endif
