// The matmul kernels this build selected (kernels.h, by -march) against a float64 reference on
// random data, through matmul.c's driver: fp32 at every width up to 70 and the model widths, Q8_0
// at every group size the engine accepts (the SIMD ones and those that fall back to portable C),
// with tails of columns and of rows; batches of vectors (through the rows kernels, and W packed in
// panels), each vector's result also bit for bit the one it gets alone; quantize_q8
// against its definition; exp_fast against exp, max_of against a loop; attention's products over
// fp32 and fp16 rows, and the fp16 conversions (every half there and back); and model.py's training
// attention (csrc/train/attention.c), forward and backward. Prints the kernels' name and "N passed,
// M failed"; exit status 1 on a failure. (make out/test_kernels ARCH=...;
// tests/test_kernels.py runs it for every path the CPU can execute, and under qemu-aarch64.)
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "matmul.h"
#include "ops.h"
#include "train/attention.h"

static int passed = 0, failed = 0;
static unsigned long long rng = 42;

static float uniform(void) { // in [-1, 1)
    rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27;
    return (float)((rng * 0x2545F4914F6CDD1Dull) >> 40) / (float)(1 << 23) - 1.0f;
}

// |got - want| within a few float roundings of each of the n terms whose magnitudes sum to mag
static void check(const char *what, int n, int d, int gs, const float *got, const double *want,
                  const double *mag) {
    for (int i = 0; i < d; i++) {
        if (!(fabs(got[i] - want[i]) <= 4e-7 * (n + 8) * mag[i] + 1e-30)) {
            failed++;
            printf("FAIL %s n=%d d=%d gs=%d row %d: got %.9g, want %.9g\n", what, n, d, gs, i,
                   got[i], want[i]);
            return;
        }
    }
    passed++;
}

// W (d, n) @ x (b, n)^T into out (b, d), the region's threads sharing out the rows of W
static void product(float *out, const Matrix *w, const float *x, const QVector *xq, int n, int d, int b, int gs) {
#pragma omp parallel
    matmul((Team){omp_get_thread_num(), omp_get_num_threads()}, out, w, x, xq, n, d, b, gs);
}

// each of the b vectors of a batch gets the very bits it gets alone
static void check_alone(const char *what, const Matrix *w, const float *x, const QVector *xq, int n, int d,
                        int b, int gs, const float *out) {
    float *alone = malloc(sizeof(float) * d);
    int same = 1;
    for (int c = 0; c < b; c++) {
        QVector row = gs ? (QVector){xq->q + (size_t)c * n, xq->s + (size_t)c * (n / gs)} : (QVector){0};
        product(alone, w, x ? x + (size_t)c * n : NULL, &row, n, d, 1, gs);
        same &= memcmp(alone, out + (size_t)c * d, sizeof(float) * d) == 0;
    }
    if (same) {
        passed++;
    } else {
        failed++;
        printf("FAIL %s batch of %d: a vector's result differs from its result alone (n=%d d=%d gs=%d)\n",
               what, b, n, d, gs);
    }
    free(alone);
}

// W (d, n) by a batch of b vectors, through the rows kernels, or packed in panels
static void test_f32(int n, int d, int b, int packed) {
    float *w = malloc(sizeof(float) * n * d), *x = malloc(sizeof(float) * n * b), *out = malloc(sizeof(float) * d * b);
    double *want = calloc(d * b, sizeof(double)), *mag = calloc(d * b, sizeof(double));
    for (int i = 0; i < n * d; i++) w[i] = uniform();
    for (int j = 0; j < n * b; j++) x[j] = uniform();
    for (int c = 0; c < b; c++) {
        for (int i = 0; i < d; i++) {
            for (int j = 0; j < n; j++) {
                want[c * d + i] += (double)w[i * n + j] * x[c * n + j];
                mag[c * d + i] += fabs((double)w[i * n + j] * x[c * n + j]);
            }
        }
    }
    Matrix m = {w, NULL, NULL, NULL};
    void *panels = packed ? malloc(panels_size(n, d, 0)) : NULL;
    if (packed) pack_panels(panels, &m, n, d, 0);
    m.panels = panels;
    product(out, &m, x, NULL, n, d, b, 0);
    check(packed ? "fp32 panels" : b > 1 ? "fp32 batch" : "fp32", n, d * b, 0, out, want, mag);
    if (b > 1) check_alone(packed ? "fp32 panels" : "fp32", &m, x, NULL, n, d, b, 0, out);
    free(w), free(x), free(out), free(want), free(mag), free(panels);
}

// (packed: on builds that pack Q8_0 W of this group size, and a test that passes trivially elsewhere)
static void test_q8(int n, int d, int gs, int b, int packed) {
    int8_t *wq = malloc(n * d), *xq = malloc(n * b);
    float *ws = malloc(sizeof(float) * d * (n / gs)), *xs = malloc(sizeof(float) * (n / gs) * b);
    float *out = malloc(sizeof(float) * d * b);
    double *want = calloc(d * b, sizeof(double)), *mag = calloc(d * b, sizeof(double));
    // the full int8 range the kernels must handle: weights -127..127 (a file may hold -128 too),
    // activations -127..127 as quantize_q8 makes them
    for (int i = 0; i < n * d; i++) wq[i] = (int8_t)lrintf(uniform() * 127.0f);
    for (int j = 0; j < n * b; j++) xq[j] = (int8_t)lrintf(uniform() * 127.0f);
    wq[0] = 127, wq[n - 1] = -128; // (the sign trick of the SIMD kernels needs x >= 0 against -128)
    for (int c = 0; c < b; c++) xq[c * n] = -127, xq[c * n + n - 1] = 127;
    for (int i = 0; i < d * (n / gs); i++) ws[i] = 0.01f * (1.5f + uniform());
    for (int g = 0; g < n / gs * b; g++) xs[g] = 0.02f * (1.5f + uniform());
    for (int c = 0; c < b; c++) {
        for (int i = 0; i < d; i++) {
            for (int g = 0; g < n / gs; g++) {
                long long dot = 0, absdot = 0; // the kernels may split a group's sum across lanes
                for (int k = g * gs; k < (g + 1) * gs; k++) {
                    dot += (long long)wq[i * n + k] * xq[c * n + k];
                    absdot += llabs((long long)wq[i * n + k] * xq[c * n + k]);
                }
                double scale = (double)ws[i * (n / gs) + g] * xs[c * (n / gs) + g];
                want[c * d + i] += dot * scale;
                mag[c * d + i] += absdot * scale;
            }
        }
    }
    Matrix m = {NULL, wq, ws, NULL};
    void *panels = packed && panels_size(n, d, gs) ? malloc(panels_size(n, d, gs)) : NULL;
    if (panels) pack_panels(panels, &m, n, d, gs);
    m.panels = panels;
    QVector x = {xq, xs};
    product(out, &m, NULL, &x, n, d, b, gs);
    check(panels ? "q8 panels" : b > 1 ? "q8 batch" : "q8", n, d * b, gs, out, want, mag);
    if (b > 1) check_alone(panels ? "q8 panels" : "q8", &m, NULL, &x, n, d, b, gs, out);
    free(wq), free(xq), free(ws), free(xs), free(out), free(want), free(mag), free(panels);
}

static void test_quantize(int n, int gs) {
    float *x = malloc(sizeof(float) * n);
    int8_t *q = malloc(n);
    float *s = malloc(sizeof(float) * (n / gs));
    for (int j = 0; j < n; j++) x[j] = 3.0f * uniform();
    for (int j = 0; j < gs; j++) x[j] = 0.0f; // an all-zero group
    QVector xq = {q, s};
    quantize_q8(&xq, x, n, gs);
    int ok = 1;
    for (int g = 0; g < n / gs; g++) {
        float wmax = 0.0f;
        for (int k = g * gs; k < (g + 1) * gs; k++) wmax = fmaxf(wmax, fabsf(x[k]));
        ok &= s[g] == wmax / 127.0f;
        for (int k = g * gs; k < (g + 1) * gs; k++) {
            // q * s is x to within half a quantum, and |q| <= 127
            ok &= abs(q[k]) <= 127 && fabsf(q[k] * s[g] - x[k]) <= 0.5f * s[g] * (1 + 1e-5f);
        }
    }
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL quantize_q8 n=%d gs=%d\n", n, gs);
    }
    free(x), free(q), free(s);
}

// dot_rows and add_weighted_rows over n_rows rows of head_size values of `type`, `stride` apart (the
// cache's fp16 rows are contiguous; fp32 rows also come a forward's kv_dim apart)
static void test_rows(int head_size, int n_rows, KVType type, int stride) {
    uint16_t *halves = malloc(sizeof(uint16_t) * stride * n_rows);
    float *floats = malloc(sizeof(float) * stride * n_rows), *values = malloc(sizeof(float) * stride * n_rows);
    float *x = malloc(sizeof(float) * head_size), *a = malloc(sizeof(float) * n_rows);
    float *dots = malloc(sizeof(float) * n_rows), *sums = malloc(sizeof(float) * head_size);
    float *sums_start = malloc(sizeof(float) * head_size), *split_sums = malloc(sizeof(float) * head_size);
    double *want_dots = calloc(n_rows, sizeof(double)), *mag_dots = calloc(n_rows, sizeof(double));
    double *want_sums = calloc(head_size, sizeof(double)), *mag_sums = calloc(head_size, sizeof(double));
    for (int i = 0; i < stride * n_rows; i++) { // values as the rows hold them
        floats[i] = 4.0f * uniform();
        f32_to_f16(&halves[i], &floats[i], 1);
        if (type == KV_F16) f16_to_f32(&values[i], &halves[i], 1);
        else values[i] = floats[i];
    }
    for (int i = 0; i < head_size; i++) {
        x[i] = uniform(), sums[i] = sums_start[i] = want_sums[i] = uniform();
        mag_sums[i] = fabs(want_sums[i]); // add_weighted_rows adds to what is there
    }
    for (int t = 0; t < n_rows; t++) a[t] = uniform();
    for (int t = 0; t < n_rows; t++) {
        for (int i = 0; i < head_size; i++) {
            const double r = values[t * stride + i];
            want_dots[t] += x[i] * r, mag_dots[t] += fabs(x[i] * r);
            want_sums[i] += a[t] * r, mag_sums[i] += fabs(a[t] * r);
        }
    }
    const void *rows = type == KV_F16 ? (const void *)halves : (const void *)floats;
    dot_rows(dots, x, rows, n_rows, head_size, stride, type);
    add_weighted_rows(sums, a, (Rows){rows, 0, stride, type}, (Rows){rows, n_rows, stride, type}, head_size);
    // the same rows in two parts, split anywhere: the same sums, bit for bit
    int differ = 0;
    for (int split = 1; split <= n_rows; split++) {
        const size_t bytes = (size_t)split * stride * kv_size(type);
        memcpy(split_sums, sums_start, sizeof(float) * head_size);
        add_weighted_rows(split_sums, a, (Rows){rows, split, stride, type},
                          (Rows){(const char *)rows + bytes, n_rows - split, stride, type}, head_size);
        differ += memcmp(split_sums, sums, sizeof(float) * head_size) != 0;
    }
    check(type == KV_F16 ? "f16 dot_rows" : "f32 dot_rows", head_size, n_rows, 0, dots, want_dots, mag_dots);
    check(type == KV_F16 ? "f16 add_weighted_rows" : "f32 add_weighted_rows", n_rows, head_size, 0, sums, want_sums,
          mag_sums);
    if (differ) printf("FAIL add_weighted_rows head_size=%d n_rows=%d: %d splits differ\n", head_size, n_rows, differ);
    differ ? failed++ : passed++;
    free(halves), free(floats), free(values), free(x), free(a), free(dots), free(sums), free(sums_start), free(split_sums);
    free(want_dots), free(mag_dots), free(want_sums), free(mag_sums);
}

// exp_fast within 2 ulp of e^x from -87 to 88, every 1/64 and at random points; e^-87 and e^88 beyond
static void test_exp(void) {
    int bad = 0;
    for (int i = 0; i <= 175 * 64 + 1000; i++) {
        const float x = i <= 175 * 64 ? -87.0f + i / 64.0f : -87.0f + 175.0f * (uniform() + 1.0f) / 2.0f;
        const double want = exp((double)x), got = exp_fast(x);
        bad += !(fabs(got - want) <= 2.0 * 0x1p-23 * want);
    }
    const float low = exp_fast(-87.0f), high = exp_fast(88.0f);
    bad += exp_fast(-88.0f) != low || exp_fast(-INFINITY) != low || exp_fast(89.0f) != high || exp_fast(INFINITY) != high;
    if (bad) printf("FAIL exp_fast: %d values\n", bad);
    bad ? failed++ : passed++;
}

// max_of against a plain loop: all negative, mixed signs, -0 and +0, -inf, one value
static void test_max_of(void) {
    int bad = 0;
    float x[100];
    for (int k = 0; k < 40; k++) {
        const int n = 1 + k * 7 % 100;
        for (int i = 0; i < n; i++) x[i] = (k % 2 ? -10.0f : 3.0f) * uniform() - (k % 2 ? 20.0f : 0.0f);
        if (k == 5) x[n - 1] = -INFINITY;
        float want = x[0];
        for (int i = 1; i < n; i++) want = x[i] > want ? x[i] : want;
        bad += max_of(x, n) != want;
    }
    x[0] = -0.0f, x[1] = 0.0f, x[2] = -1.0f;
    bad += max_of(x, 3) != 0.0f || signbit(max_of(x, 3)) || max_of(x + 2, 1) != -1.0f;
    if (bad) printf("FAIL max_of: %d cases\n", bad);
    bad ? failed++ : passed++;
}

// every half but NaN survives fp16 -> fp32 -> fp16 unchanged; NaN stays NaN
static void test_f16_round_trip(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        uint16_t half = (uint16_t)h, back;
        float v;
        f16_to_f32(&v, &half, 1);
        f32_to_f16(&back, &v, 1);
        int nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        bad += nan ? !(v != v && (back & 0x7c00) == 0x7c00 && (back & 0x3ff)) : back != half;
    }
    if (bad) printf("FAIL fp16 round trip: %d halves\n", bad);
    bad ? failed++ : passed++;
}

// got (n,) within tol * (1 + |want|) of want
static void check_close(const char *what, int BH, int T, int D, const float *got, const double *want, size_t n,
                        double tol) {
    for (size_t i = 0; i < n; i++) {
        if (!(fabs(got[i] - want[i]) <= tol * (1.0 + fabs(want[i])))) {
            failed++;
            printf("FAIL attention %s BH=%d T=%d D=%d at %zu: got %.9g, want %.9g\n", what, BH, T, D, i, got[i],
                   want[i]);
            return;
        }
    }
    passed++;
}

// the sequence of the pack that row i is in (attention.h's bounds)
static int sequence_of(const int *bounds, int n_seqs, int i) {
    int s = 0;
    while (bounds && s + 1 < n_seqs && bounds[s + 1] <= i) s++;
    return s;
}

// whether row i attends to row j: causal within its sequence, and every row of the one it continues
static int attends(const int *bounds, const int *parents, int n_seqs, int i, int j) {
    const int si = sequence_of(bounds, n_seqs, i), sj = sequence_of(bounds, n_seqs, j);
    return (si == sj && j <= i) || (parents && parents[si] == sj);
}

// csrc/train/attention.c's causal attention, forward and backward, against float64 at BH (batch,
// head) pairs of T positions and head size D: the output, the log-sum-exp, and dq, dk, dv; bounds
// (n_seqs + 1 offsets) and parents pack several sequences along T, or NULL for one
static void test_attention(int BH, int T, int D, const int *bounds, const int *parents, int n_seqs) {
    const size_t n = (size_t)BH * T * D;
    float *x = malloc(sizeof(float) * 8 * n), *lse = malloc(sizeof(float) * BH * T);
    float *q = x, *k = x + n, *v = x + 2 * n, *dout = x + 3 * n, *out = x + 4 * n;
    float *dq = x + 5 * n, *dk = x + 6 * n, *dv = x + 7 * n;
    double *want = calloc(4 * n + BH * T, sizeof(double)), *p = malloc(sizeof(double) * 2 * T), *dp = p + T;
    double *w_out = want, *w_dq = want + n, *w_dk = want + 2 * n, *w_dv = want + 3 * n, *w_lse = want + 4 * n;
    for (size_t i = 0; i < 4 * n; i++) x[i] = 2.0f * uniform();
    const double scale = 1.0 / sqrt(D);
    for (int bh = 0; bh < BH; bh++) {
        const float *qh = q + (size_t)bh * T * D, *kh = k + (size_t)bh * T * D, *vh = v + (size_t)bh * T * D;
        const float *gh = dout + (size_t)bh * T * D;
        const size_t o = (size_t)bh * T * D;
        for (int i = 0; i < T; i++) {
            double max = -INFINITY, sum = 0.0, delta = 0.0;
            for (int j = 0; j < T; j++) {
                p[j] = dp[j] = 0.0;
                if (!attends(bounds, parents, n_seqs, i, j)) continue;
                for (int d = 0; d < D; d++) {
                    p[j] += scale * qh[i * D + d] * kh[j * D + d];
                    dp[j] += gh[i * D + d] * vh[j * D + d];
                }
                max = p[j] > max ? p[j] : max;
            }
            for (int j = 0; j < T; j++) sum += p[j] = attends(bounds, parents, n_seqs, i, j) ? exp(p[j] - max) : 0.0;
            w_lse[bh * T + i] = max + log(sum);
            for (int j = 0; j < T; j++) p[j] /= sum, delta += p[j] * dp[j];
            for (int j = 0; j < T; j++) {
                const double ds = p[j] * (dp[j] - delta) * scale;
                for (int d = 0; d < D; d++) {
                    w_out[o + i * D + d] += p[j] * vh[j * D + d];
                    w_dv[o + j * D + d] += p[j] * gh[i * D + d];
                    w_dq[o + i * D + d] += ds * kh[j * D + d];
                    w_dk[o + j * D + d] += ds * qh[i * D + d];
                }
            }
        }
    }
    if (attention_forward(q, k, v, out, lse, BH, T, D, bounds, parents, n_seqs, 2) ||
        attention_backward(q, k, v, out, lse, dout, dq, dk, dv, BH, T, D, bounds, parents, n_seqs, 2)) {
        failed++;
        printf("FAIL attention BH=%d T=%d D=%d: out of memory\n", BH, T, D);
    } else {
        check_close("out", BH, T, D, out, w_out, n, 1e-5);
        check_close("lse", BH, T, D, lse, w_lse, (size_t)BH * T, 1e-5);
        check_close("dq", BH, T, D, dq, w_dq, n, 1e-5);
        check_close("dk", BH, T, D, dk, w_dk, n, 1e-5);
        check_close("dv", BH, T, D, dv, w_dv, n, 1e-5);
    }
    free(x), free(lse), free(want), free(p);
}

int main(void) {
    printf("kernels: %s\n", matmul_kernels());
    const int widths[] = {64, 96, 172, 288, 512, 768, 1376};
    const int rows[] = {1, 3, 4, 5, 9, 34};
    for (int n = 1; n <= 70; n++) test_f32(n, 7, 1, 0);
    for (size_t i = 0; i < sizeof(widths) / sizeof(widths[0]); i++) {
        for (size_t r = 0; r < sizeof(rows) / sizeof(rows[0]); r++) test_f32(widths[i], rows[r], 1, 0);
    }
    // SIMD group sizes (4 to 128), and 2, 12, 48, 96, which fall back to portable C
    const int group_sizes[] = {2, 4, 8, 12, 16, 32, 48, 64, 96, 128};
    for (size_t g = 0; g < sizeof(group_sizes) / sizeof(group_sizes[0]); g++) {
        int gs = group_sizes[g];
        for (int k = 1; k <= 13; k++) { // tails of every length short of the widest chunk (64)
            for (size_t r = 0; r < sizeof(rows) / sizeof(rows[0]); r++) test_q8(gs * k, rows[r], gs, 1, 0);
        }
        test_quantize(gs * 12, gs);
    }
    for (size_t i = 0; i < sizeof(widths) / sizeof(widths[0]); i++) test_q8(widths[i], 9, 4, 1, 0);
    test_q8(172, 5, 4, 1, 0), test_q8(288, 6, 32, 1, 0), test_q8(768, 6, 32, 1, 0), test_q8(1376, 5, 32, 1, 0), test_q8(2048, 5, 64, 1, 0);
    // batches: whole calls of PANEL_COLS vectors and the odd ones after, at odd widths and odd rows of W
    const int batches[] = {1, 2, 4, 5, 7, 9, 13}; // 13: two calls of PANEL_COLS and one more
    for (size_t k = 0; k < sizeof(batches) / sizeof(batches[0]); k++) {
        const int b = batches[k];
        for (int packed = 0; packed <= 1; packed++) {
            for (int n = 1; n <= 40; n += 3) test_f32(n, 7, b, packed);
            test_f32(128, 9, b, packed), test_f32(288, 5, b, packed), test_f32(352, 3, b, packed);
            test_f32(64, 40, b, packed), test_f32(96, 64, b, packed); // panels past one pair
        }
        for (size_t g = 0; g < sizeof(group_sizes) / sizeof(group_sizes[0]); g++) {
            const int gs = group_sizes[g];
            for (int packed = 0; packed <= 1; packed++) {
                for (int m = 1; m <= 5; m++) test_q8(gs * m, 5, gs, b, packed);
                test_q8(gs * 12, 9, gs, b, packed), test_q8(gs * 4, 40, gs, b, packed); // 40: past one pair of panels
            }
        }
        for (int packed = 0; packed <= 1; packed++) {
            test_q8(128, 6, 32, b, packed), test_q8(352, 5, 32, b, packed), test_q8(288, 7, 32, b, packed);
            test_q8(768, 3, 32, b, packed);
        }
    }
    // SIMD widths (multiples of 8 on x86, 4 on ARM) and others, which take the portable loop
    const int head_sizes[] = {4, 6, 8, 12, 16, 48, 64, 72, 128};
    for (size_t h = 0; h < sizeof(head_sizes) / sizeof(head_sizes[0]); h++) {
        for (size_t r = 0; r < sizeof(rows) / sizeof(rows[0]); r++) {
            test_rows(head_sizes[h], rows[r], KV_F16, head_sizes[h]);
            test_rows(head_sizes[h], rows[r], KV_F32, head_sizes[h]);
            test_rows(head_sizes[h], rows[r], KV_F32, 3 * head_sizes[h]);
        }
    }
    // attention.c at its vector head sizes (4 to 64) and others, with T past and short of its blocks of 8 rows
    const int attention_heads[] = {4, 8, 12, 16, 32, 64}, lengths[] = {1, 7, 8, 9, 37};
    for (size_t h = 0; h < sizeof(attention_heads) / sizeof(attention_heads[0]); h++) {
        for (size_t t = 0; t < sizeof(lengths) / sizeof(lengths[0]); t++) {
            test_attention(3, lengths[t], attention_heads[h], NULL, NULL, 1);
        }
        // sequences packed along T (one of them empty), each blind to the others, then two prompts,
        // the first continued by two responses (one of them empty), the second by one
        const int bounds[] = {0, 5, 6, 6, 20, 37}, parents[] = {-1, 0, 0, -1, 3};
        test_attention(3, 37, attention_heads[h], bounds, NULL, 5);
        test_attention(3, 37, attention_heads[h], bounds, parents, 5);
    }
    test_f16_round_trip();
    test_exp();
    test_max_of();
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
