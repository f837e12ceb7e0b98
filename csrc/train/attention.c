// Causal self-attention, forward and backward, for the small head sizes of TinyStories models on
// a CPU. At head sizes 8 and 16 (the 260K preset and the default model) PyTorch's CPU flash
// attention spends most of its time around GEMMs with an inner dimension of 8 or 16. Here the query
// rows go in blocks of ROWS and every product is a loop of whole vectors with its sums in registers:
// the scores of a block over the keys (keys stored transposed, head_dim rows of T, each vector of
// keys loaded once for the ROWS queries), and the weighted sums of value or key rows (a row of the
// head's values is one or a few vectors). One OpenMP task per (batch, head) pair and sequence, with
// the sequences that continue it; no allocation beyond one scratch buffer per thread. The backward
// pass recomputes the probabilities from the log-sum-exp of the forward pass, as flash attention does.
#include "attention.h"
#include "../ops.h" // exp_fast

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// Query rows handled together: each key or value loaded serves ROWS of them
#define ROWS 8

// The native vector of the target: GCC's and Clang's vector extension, lowered to its instructions
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4 // NEON, SSE2, or the portable build's target
#endif
typedef float vec __attribute__((vector_size(4 * LANES)));

static inline vec load(const float *x) {
    vec v;
    memcpy(&v, x, sizeof(v));
    return v;
}

// n rounded up to whole vectors of 16 floats; score rows, and the rows of transposed keys and
// values, have room for it
static inline int round_up(int n) { return (n + 15) & ~15; }

// (T, D) -> (D, row), with zeros from T up to row
static void transpose(const float *x, float *xt, int T, int D, int row) {
    for (int d = 0; d < D; d++) memset(xt + (size_t)d * row + T, 0, sizeof(float) * (row - T));
    for (int t = 0; t < T; t++)
        for (int d = 0; d < D; d++) xt[(size_t)d * row + t] = x[t * D + d];
}

// s[r * row + j] = scale * x_r . yt[:, j] for the ROWS rows x_r = x + r * D and keys j < n (and on up
// to the vector's end), with yt (D, row) transposed keys (or values): one pass over yt, a vector of
// keys at a time, ROWS sums of each in registers
static void scores(const float *x, const float *yt, float *s, int row, int n, int D, float scale) {
    for (int j = 0; j < n; j += LANES) {
        vec acc[ROWS] = {0};
        for (int d = 0; d < D; d++) {
            const vec y = load(yt + (size_t)d * row + j);
            for (int r = 0; r < ROWS; r++) acc[r] += x[r * D + d] * y;
        }
        for (int r = 0; r < ROWS; r++) {
            acc[r] *= scale;
            memcpy(s + (size_t)r * row + j, &acc[r], sizeof(vec));
        }
    }
}

// The weighted sums of rows (T, D) row-major, over d in vectors, at head sizes 4, 8, 16, 32 and 64:
// a row of D values is PARTS vectors of up to LANES floats, and GROUP of the ROWS rows go through at
// a time, so that their GROUP * PARTS sums stay in registers (8 of them: AVX2 has 16).
//   weighted: out_r = scale_r * sum_{j < n} w[r * row + j] * y_j, for the ROWS rows: attention's
//             output from the values, and dq from the keys
//   outer:    g_j += sum_r w[r * row + j] * x_r, for j < n: the key and value gradients
// Any other head size goes value by value (weighted and outer below).
#define HEAD_SIZE_KERNELS(D)                                                                                           \
    enum { WIDTH_##D = D < LANES ? D : LANES, PARTS_##D = D / WIDTH_##D };                                          \
    enum { GROUP_##D = PARTS_##D < 8 ? 8 / PARTS_##D : 1 };                                                         \
    typedef float part##D __attribute__((vector_size(4 * WIDTH_##D)));                                               \
    static void weighted_##D(const float *w, const float *y, float *out, int row, int n, const float *scale) {      \
        for (int r0 = 0; r0 < ROWS; r0 += GROUP_##D) {                                                                \
            part##D acc[GROUP_##D][PARTS_##D], yj;                                                                    \
            memset(acc, 0, sizeof(acc));                                                                              \
            for (int j = 0; j < n; j++) {                                                                             \
                for (int p = 0; p < PARTS_##D; p++) {                                                                 \
                    memcpy(&yj, y + (size_t)j * D + p * WIDTH_##D, sizeof(yj));                                       \
                    for (int g = 0; g < GROUP_##D; g++) acc[g][p] += w[(r0 + g) * row + j] * yj;                      \
                }                                                                                                     \
            }                                                                                                         \
            for (int g = 0; g < GROUP_##D; g++) {                                                                     \
                for (int p = 0; p < PARTS_##D; p++) {                                                                 \
                    acc[g][p] *= scale[r0 + g];                                                                       \
                    memcpy(out + (r0 + g) * D + p * WIDTH_##D, &acc[g][p], sizeof(yj));                               \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
    }                                                                                                                 \
    static void outer_##D(const float *w, const float *x, float *g, int row, int n) {                                \
        for (int r0 = 0; r0 < ROWS; r0 += GROUP_##D) {                                                                \
            part##D xr[GROUP_##D][PARTS_##D], gj;                                                                     \
            memcpy(xr, x + r0 * D, sizeof(xr));                                                                       \
            for (int j = 0; j < n; j++) {                                                                             \
                for (int p = 0; p < PARTS_##D; p++) {                                                                 \
                    memcpy(&gj, g + (size_t)j * D + p * WIDTH_##D, sizeof(gj));                                       \
                    for (int r = 0; r < GROUP_##D; r++) gj += w[(r0 + r) * row + j] * xr[r][p];                       \
                    memcpy(g + (size_t)j * D + p * WIDTH_##D, &gj, sizeof(gj));                                       \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
    }
HEAD_SIZE_KERNELS(4)
HEAD_SIZE_KERNELS(8)
HEAD_SIZE_KERNELS(16)
HEAD_SIZE_KERNELS(32)
HEAD_SIZE_KERNELS(64)

static void weighted(const float *w, const float *y, float *out, int row, int n, int D, const float *scale) {
    switch (D) {
    case 4: weighted_4(w, y, out, row, n, scale); return;
    case 8: weighted_8(w, y, out, row, n, scale); return;
    case 16: weighted_16(w, y, out, row, n, scale); return;
    case 32: weighted_32(w, y, out, row, n, scale); return;
    case 64: weighted_64(w, y, out, row, n, scale); return;
    }
    for (int r = 0; r < ROWS; r++) {
        for (int d = 0; d < D; d++) {
            float sum = 0.0f;
            for (int j = 0; j < n; j++) sum += w[r * row + j] * y[(size_t)j * D + d];
            out[r * D + d] = sum * scale[r];
        }
    }
}

static void outer(const float *w, const float *x, float *g, int row, int n, int D) {
    switch (D) {
    case 4: outer_4(w, x, g, row, n); return;
    case 8: outer_8(w, x, g, row, n); return;
    case 16: outer_16(w, x, g, row, n); return;
    case 32: outer_32(w, x, g, row, n); return;
    case 64: outer_64(w, x, g, row, n); return;
    }
    for (int j = 0; j < n; j++)
        for (int r = 0; r < ROWS; r++)
            for (int d = 0; d < D; d++) g[(size_t)j * D + d] += w[r * row + j] * x[r * D + d];
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

static float max_of_row(const float *s, int n) {
    float max = s[0];
#pragma omp simd reduction(max : max)
    for (int j = 1; j < n; j++) max = s[j] > max ? s[j] : max;
    return max;
}

static float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) sum += a[j] * b[j];
    return sum;
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

// Rows i0..i0+ROWS-1 of x (T, D) into block (ROWS, D), zeros for the rows past T; returns the rows
// that exist
static int load_block(float *block, const float *x, int i0, int T, int D) {
    const int rows = T - i0 < ROWS ? T - i0 : ROWS;
    memcpy(block, x + (size_t)i0 * D, sizeof(float) * rows * D);
    memset(block + (size_t)rows * D, 0, sizeof(float) * (ROWS - rows) * D);
    return rows;
}

// A sequence of the pack and what it attends to: its own rows [t0, t0 + n) of T and, before them,
// the P rows from p0 of the sequence it continues (P = 0: none)
typedef struct {
    int t0, n, p0, P;
} Sequence;

static Sequence sequence(const int *bounds, const int *parents, int s, int T) {
    Sequence q = {bounds ? bounds[s] : 0, bounds ? bounds[s + 1] - bounds[s] : T, 0, 0};
    const int parent = parents ? parents[s] : -1;
    if (parent >= 0) q.p0 = bounds[parent], q.P = bounds[parent + 1] - bounds[parent];
    return q;
}

// whether sequence s belongs to the task of sequence root: root itself, or one that continues it
static int in_task(const int *parents, int root, int s) {
    return s == root || (parents && parents[s] == root);
}

// The P rows from p0 then the n rows from t0 of x (T, D), one after the other into out (P + n, D)
static void context(float *out, const float *x, Sequence q, int D) {
    memcpy(out, x + (size_t)q.p0 * D, sizeof(float) * q.P * D);
    memcpy(out + (size_t)q.P * D, x + (size_t)q.t0 * D, sizeof(float) * q.n * D);
}

// One sequence of one head (q, k, v, out at its head's rows, lse at its head's T): its rows'
// attention over the context (kc, vc: (P + n, D)), row i over context rows 0..P+i
static void forward_sequence(const float *q, const float *k, const float *v, float *out, float *lse, Sequence seq,
                             int D, float *buf) {
    const float scale = 1.0f / sqrtf((float)D);
    const size_t row = (size_t)round_up(seq.P + seq.n); // the rows of kt and s: the context, not the whole pack
    float *kt = buf, *s = kt + (size_t)D * row, *qb = s + ROWS * row, *ob = qb + ROWS * D, *vc = ob + ROWS * D;
    context(vc, k, seq, D);
    transpose(vc, kt, seq.P + seq.n, D, row);
    context(vc, v, seq, D);
    for (int i0 = 0; i0 < seq.n; i0 += ROWS) {
        const int rows = load_block(qb, q + (size_t)seq.t0 * D, i0, seq.n, D);
        const int n_max = seq.P + i0 + rows; // keys of the block's last row
        scores(qb, kt, s, row, n_max, D, scale);
        float inv_sum[ROWS] = {0.0f};
        for (int r = 0; r < rows; r++) {
            const int keys = seq.P + i0 + r + 1; // causal
            float *sr = s + r * row, max = max_of_row(sr, keys);
            const float sum = exp_shifted(sr, keys, n_max, max);
            inv_sum[r] = 1.0f / sum;
            lse[seq.t0 + i0 + r] = max + logf(sum);
        }
        weighted(s, vc, ob, row, n_max, D, inv_sum);
        memcpy(out + (size_t)(seq.t0 + i0) * D, ob, sizeof(float) * rows * D);
    }
}

int attention_forward(const float *q, const float *k, const float *v, float *out, float *lse, int BH, int T, int D,
                      const int *bounds, const int *parents, int n_seqs, int n_threads) {
    const size_t row = (size_t)round_up(T);
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        // kt (D, row); ROWS rows of scores; blocks (ROWS, D) of queries and outputs; the values (row, D)
        float *buf = scratch((size_t)2 * D * row + ROWS * row + 2 * ROWS * D, &failed);
#pragma omp for schedule(dynamic)
        for (int task = 0; task < BH * n_seqs; task++) { // a head's sequence and those that continue it
            const int bh = task / n_seqs, root = task % n_seqs;
            if (!buf || (parents && parents[root] >= 0)) continue;
            const size_t at = (size_t)bh * T;
            for (int s = root; s < n_seqs; s++) {
                if (!in_task(parents, root, s)) continue;
                forward_sequence(q + at * D, k + at * D, v + at * D, out + at * D, lse + at,
                                 sequence(bounds, parents, s, T), D, buf);
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

// The backward pass of forward_sequence: dq of its rows; the gradients of its context's keys and
// values into its own rows of dk, dv, and added into its parent's rows (which its task wrote first)
static void backward_sequence(const float *q, const float *k, const float *v, const float *out, const float *lse,
                              const float *dout, float *dq, float *dk, float *dv, Sequence seq, int D, float *buf) {
    const float scale = 1.0f / sqrtf((float)D);
    const int n_ctx = seq.P + seq.n;
    const size_t row = (size_t)round_up(n_ctx);
    float *kt = buf, *vt = kt + (size_t)D * row, *p = vt + (size_t)D * row, *ds = p + ROWS * row;
    float *qb = ds + ROWS * row, *gb = qb + ROWS * D, *dqb = gb + ROWS * D;
    float *kc = dqb + ROWS * D, *dkc = kc + row * D, *dvc = dkc + row * D;
    context(kc, v, seq, D);
    transpose(kc, vt, n_ctx, D, row);
    context(kc, k, seq, D);
    transpose(kc, kt, n_ctx, D, row);
    memset(dkc, 0, sizeof(float) * n_ctx * D);
    memset(dvc, 0, sizeof(float) * n_ctx * D);
    const float ones[ROWS] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
    for (int i0 = 0; i0 < seq.n; i0 += ROWS) {
        const int rows = load_block(qb, q + (size_t)seq.t0 * D, i0, seq.n, D);
        load_block(gb, dout + (size_t)seq.t0 * D, i0, seq.n, D);
        const int n_max = seq.P + i0 + rows;
        scores(qb, kt, p, row, n_max, D, scale);
        scores(gb, vt, ds, row, n_max, D, 1.0f); // dout_i . v_j for now
        for (int r = 0; r < rows; r++) { // (the rows past n: zero queries and dout, so p = ds = 0)
            float *pr = p + r * row, *dsr = ds + r * row;
            const size_t i = (size_t)seq.t0 + i0 + r;
            exp_shifted(pr, seq.P + i0 + r + 1, n_max, lse[i]); // 0 past the row's own keys
            const float delta = dot(gb + r * D, out + i * D, D); // sum_j p_j (dout_i . v_j)
#pragma omp simd
            for (int j = 0; j < n_max; j++) dsr[j] = pr[j] * (dsr[j] - delta) * scale;
        }
        weighted(ds, kc, dqb, row, n_max, D, ones);
        memcpy(dq + (size_t)(seq.t0 + i0) * D, dqb, sizeof(float) * rows * D);
        outer(p, gb, dvc, row, n_max, D);
        outer(ds, qb, dkc, row, n_max, D);
    }
    memcpy(dk + (size_t)seq.t0 * D, dkc + (size_t)seq.P * D, sizeof(float) * seq.n * D);
    memcpy(dv + (size_t)seq.t0 * D, dvc + (size_t)seq.P * D, sizeof(float) * seq.n * D);
    for (size_t j = 0; j < (size_t)seq.P * D; j++) {
        dk[(size_t)seq.p0 * D + j] += dkc[j];
        dv[(size_t)seq.p0 * D + j] += dvc[j];
    }
}

int attention_backward(const float *q, const float *k, const float *v, const float *out, const float *lse,
                       const float *dout, float *dq, float *dk, float *dv, int BH, int T, int D, const int *bounds,
                       const int *parents, int n_seqs, int n_threads) {
    const size_t row = (size_t)round_up(T);
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        // kt, vt (D, row); ROWS rows of p and of ds; blocks (ROWS, D) of q, dout and dq; the context's
        // keys, and the gradients of its keys and values (row, D)
        float *buf = scratch((size_t)5 * D * row + 2 * ROWS * row + 3 * ROWS * D, &failed);
#pragma omp for schedule(dynamic)
        for (int task = 0; task < BH * n_seqs; task++) { // as attention_forward's: no two write one row
            const int bh = task / n_seqs, root = task % n_seqs;
            if (!buf || (parents && parents[root] >= 0)) continue;
            const size_t at = (size_t)bh * T * D;
            for (int s = root; s < n_seqs; s++) {
                if (!in_task(parents, root, s)) continue;
                backward_sequence(q + at, k + at, v + at, out + at, lse + (size_t)bh * T, dout + at, dq + at, dk + at,
                                  dv + at, sequence(bounds, parents, s, T), D, buf);
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
