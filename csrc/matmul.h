// Matrix-vector products, the one place where fp32 and Q8_0 weights differ. Everything else
// in the forward pass is shared.
#ifndef MATMUL_H
#define MATMUL_H

#include <stdint.h>

#include "checkpoint.h"

// Activation vectors quantised on the fly for Q8_0 matrices: symmetric int8 per group of
// group_size values, x ~= q * s. A batch of rows of n values keeps row i at q + i * n and
// s + i * (n / group_size).
typedef struct {
    int8_t *q; // (rows, n)
    float *s;  // (rows, n / group_size)
} QVector;

void quantize_q8(QVector *xq, const float *x, int n, int group_size);

// The threads that share out a matmul's blocks of ROWS rows of W (and attention's heads): this
// thread is `id` of `n`, each taking one consecutive share as OpenMP's static schedule would, with
// no barrier at the end, so that one parallel region can run several independent matmuls. {0, 1}:
// the calling thread computes them all.
typedef struct {
    int id, n;
} Team;

// out (n_rows, d) = x (n_rows, n) @ W (d, n)^T, with xq the quantised x when W is Q8_0: row c of
// out is W @ row c of x, computed exactly as for that row alone (the same sums in the same order,
// whatever the other rows), so that a sequence's results do not depend on the batch it is in.
void matmul(Team team, float *out, const Matrix *w, const float *x, const QVector *xq, int n, int d,
            int n_rows, int group_size);
// matmul, then RoPE on each row of out as ops.h's rope_rotate does it, row c with the table row
// rope + pos[c] * head_size of a (seq_len, head_size) table, or none if rope is NULL: each thread
// rotates the pairs of rows of W it computed, so nothing waits between
void matmul_rope(Team team, float *out, const Matrix *w, const float *x, const QVector *xq, int n,
                 int d, int n_rows, int group_size, const float *rope, const int *pos, int head_size);

// W (d, n) packed for batched products, in panels_size bytes (0: this build does not pack such W).
// fp32: each PANEL rows side by side, column after column, zeros past row d. Q8_0 (group sizes that
// are multiples of 4, on builds with int8 dot products of 512 bits: AVX-512 VNNI): panels of 16 rows,
// a block per group of each: its values 4 columns of the 16 rows at a time, then 128 * the sum of
// each row's values in the group, then each row's scale. matmul uses a matrix's panels when it has
// them, whatever n_rows (transformer.h's transformer_pack fills them).
size_t panels_size(int n, int d, int group_size);
void pack_panels(void *panels, const Matrix *w, int n, int d, int group_size);

// The KV cache's element type: fp32, or IEEE fp16 (binary16, kept as uint16_t), which halves the
// cache's memory and the bytes attention reads, at fp16's rounding of the keys and values
// (llama.cpp's default cache type).
typedef enum { KV_F32, KV_F16 } KVType;
// bytes of an element of a KV cache of `type`
size_t kv_size(KVType type);

// Attention's two products over n rows of a head's keys or values (row t: position t, head_size
// values of `type`, `stride` values after row t - 1; fp16 rows are the cache's, with stride
// head_size), on the calling thread alone: attention shares out heads, not rows.
// out[t] = x . row t, for t < n
void dot_rows(float *out, const float *x, const void *rows, int n, int head_size, int stride,
              KVType type);
// Rows as add_weighted_rows takes them: n rows of `type`, row t at rows + t * stride values
typedef struct {
    const void *rows;
    int n, stride;
    KVType type;
} Rows;
// out += the sum over the rows of first then of then (row t of the two, one after the other) of
// a[t] * row t. One call for the two (a sequence's cached positions, then those of this forward),
// as the sum's order may not depend on where the one ends and the other begins: a row's result is
// the same whichever forward its positions came through.
void add_weighted_rows(float *out, const float *a, Rows first, Rows then, int head_size);
// fp32 -> fp16, rounding to nearest even (overflow gives inf, NaN stays NaN); and back, exactly
void f32_to_f16(uint16_t *out, const float *x, int n);
void f16_to_f32(float *out, const uint16_t *h, int n);

// The kernels this build uses: "avx512-vnni", "avx512", "avx2-vnni", "avx2", "neon-dotprod",
// "neon" or "portable" (kernels.h).
const char *matmul_kernels(void);

#endif
