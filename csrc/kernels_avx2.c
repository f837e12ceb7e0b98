// AVX2+FMA kernels (x86-64-v3: Haswell and later, AMD Zen); int8 dot products through
// maddubs/madd, or AVX-VNNI's dpbusd where the target has it (Alder Lake and later). See kernels.h.
#include "kernels.h"

#ifdef KERNELS_AVX2
#include <immintrin.h>

_Static_assert(ROWS == 4, "hsum4 reduces four rows at once");

// out[r] = the sum of the 8 lanes of a[r], for the 4 rows together
static inline void hsum4(float *out, const __m256 a[ROWS]) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
}

// lanes 0..k-1 set, for masked loads of the last k < 8 values
static inline __m256i first_lanes(int k) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

void rows_f32_avx2(float *out, const float *const w[ROWS], const float *x, int n) {
    // two sums per row: eight FMA chains in flight hide the FMA latency
    __m256 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
        for (int r = 0; r < ROWS; r++) {
            _mm_prefetch((const char *)(w[r] + j + PREFETCH * n), _MM_HINT_T0);
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + j), x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + j + 8), x1, acc[r][1]);
        }
    }
    for (; j < n; j += 8) {
        __m256i m = first_lanes(n - j);
        __m256 xv = _mm256_maskload_ps(x + j, m);
        for (int r = 0; r < ROWS; r++) {
            acc[r][0] = _mm256_fmadd_ps(_mm256_maskload_ps(w[r] + j, m), xv, acc[r][0]);
        }
    }
    __m256 sum[ROWS];
    for (int r = 0; r < ROWS; r++) sum[r] = _mm256_add_ps(acc[r][0], acc[r][1]);
    hsum4(out, sum);
}

// acc + per 32-bit lane, the sum of 4 products of unsigned a and signed b bytes
static inline __m256i dot4(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, a, b);
#else
    // pairs of |x| * w are at most 2 * 128 * 127: no int16 saturation
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

void rows_q8_avx2(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                  const QVector *xq, int n, int gs, const int *lane_group) {
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    int j = 0;
    if (gs == 32) {
        // four groups at a time: their int32 dot vectors reduce to one with two levels of hadd
        // (lane l of each half sums group l % 4), then one conversion and one FMA with the four
        // groups' scales: a third fewer multiply-port operations than a conversion a group
        for (int g = 0; j + 128 <= n; j += 128, g += 4) {
            __m256i xv[4], xabs[4];
            for (int k = 0; k < 4; k++) {
                xv[k] = _mm256_loadu_si256((const __m256i *)(xq->q + j + 32 * k));
                xabs[k] = _mm256_abs_epi8(xv[k]);
            }
            __m256 sx = _mm256_broadcast_ps((const __m128 *)(xq->s + g));
            for (int r = 0; r < ROWS; r++) {
                const int8_t *w = wq[r] + j;
                _mm_prefetch((const char *)w + PREFETCH * n, _MM_HINT_T0);
                _mm_prefetch((const char *)w + 64 + PREFETCH * n, _MM_HINT_T0);
                __m256i dot[4];
                for (int k = 0; k < 4; k++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 32 * k));
                    dot[k] = dot4(_mm256_setzero_si256(), xabs[k], _mm256_sign_epi8(wv, xv[k]));
                }
                __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(dot[0], dot[1]), _mm256_hadd_epi32(dot[2], dot[3]));
                __m256 scale = _mm256_mul_ps(_mm256_broadcast_ps((const __m128 *)(ws[r] + g)), sx);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r]);
            }
        }
    }
    if (gs >= 32) { // (after the loop above, for gs == 32: the last 0 to 3 groups)
        // a group is gs / 32 chunks: their int8 dot products add up in int32 lanes, converted and
        // scaled once a group (|sum| <= gs * 128 * 127 < 2^31)
        for (int g = j / gs; g < n / gs; g++) {
            __m256i dot[ROWS];
            for (int r = 0; r < ROWS; r++) dot[r] = _mm256_setzero_si256();
            for (; j < (g + 1) * gs; j += 32) {
                // maddubs and dpbusd want one unsigned operand: use |x| and move x's sign onto w
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq->q + j));
                __m256i xabs = _mm256_abs_epi8(xv);
                for (int r = 0; r < ROWS; r++) {
                    _mm_prefetch((const char *)(wq[r] + j) + PREFETCH * n, _MM_HINT_T0);
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(wq[r] + j));
                    dot[r] = dot4(dot[r], xabs, _mm256_sign_epi8(wv, xv));
                }
            }
            __m256 sx = _mm256_broadcast_ss(xq->s + g);
            for (int r = 0; r < ROWS; r++) {
                __m256 scale = _mm256_mul_ps(_mm256_broadcast_ss(ws[r] + g), sx);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), scale, acc[r]);
            }
        }
    } else {
        // a chunk holds 32 / gs whole groups: lane l's 4 values are in group g0 + lane_group[l]
        const __m256i idx = _mm256_loadu_si256((const __m256i *)lane_group);
        const __m256i loaded = first_lanes(32 / gs); // the chunk's scales
        for (int g0 = 0; j + 32 <= n; j += 32, g0 += 32 / gs) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq->q + j));
            __m256i xabs = _mm256_abs_epi8(xv);
            __m256 sx = _mm256_permutevar8x32_ps(_mm256_maskload_ps(xq->s + g0, loaded), idx);
            for (int r = 0; r < ROWS; r++) {
                _mm_prefetch((const char *)(wq[r] + j) + PREFETCH * n, _MM_HINT_T0);
                __m256i wv = _mm256_loadu_si256((const __m256i *)(wq[r] + j));
                __m256i dot = dot4(_mm256_setzero_si256(), xabs, _mm256_sign_epi8(wv, xv));
                __m256 sw = _mm256_permutevar8x32_ps(_mm256_maskload_ps(ws[r] + g0, loaded), idx);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sw, sx), acc[r]);
            }
        }
    }
    hsum4(out, acc);
    if (j < n) rows_q8_tail(out, wq, ws, xq, j, n, gs); // < 32 values left: whole groups
}

// values j..j+7 of rows of fp32 or fp16
static inline __m256 load_row(const void *rows, size_t at, KVType type) {
#ifdef __F16C__
    if (type == KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)rows + at)));
#endif
    (void)type; // (without F16C, matmul.c sends fp16 rows to the portable kernel)
    return _mm256_loadu_ps((const float *)rows + at);
}

void dot_rows_avx2(float *out, const float *x, const void *rows, int n_rows, int n, int stride, KVType type) {
    // four rows at a time, reduced together by hsum4; a short last block repeats its last row
    for (int t0 = 0; t0 < n_rows; t0 += ROWS) {
        size_t row[ROWS];
        __m256 acc[ROWS];
        for (int r = 0; r < ROWS; r++) {
            row[r] = (size_t)(t0 + r < n_rows ? t0 + r : n_rows - 1) * stride;
            acc[r] = _mm256_setzero_ps();
        }
        for (int j = 0; j < n; j += 8) {
            __m256 xv = _mm256_loadu_ps(x + j);
            for (int r = 0; r < ROWS; r++) acc[r] = _mm256_fmadd_ps(xv, load_row(rows, row[r] + j, type), acc[r]);
        }
        float sums[ROWS];
        hsum4(sums, acc);
        for (int r = 0; r < ROWS && t0 + r < n_rows; r++) out[t0 + r] = sums[r];
    }
}

// values j..j+7 of row t of first then then
static inline __m256 row_of(Rows first, Rows then, int t, size_t j) {
    return t < first.n ? load_row(first.rows, (size_t)t * first.stride + j, first.type)
                       : load_row(then.rows, (size_t)(t - first.n) * then.stride + j, then.type);
}

// acc[c * u + i] += a[i] * values j0 + 8c.. of row t + i of r, for i < u, c < k
static inline __attribute__((always_inline)) void add_group(__m256 *acc, const float *a, Rows r, int t, size_t j0,
                                                            int k, int u) {
    for (int i = 0; i < u; i++) {
        const __m256 at = _mm256_set1_ps(a[i]);
        for (int c = 0; c < k; c++) {
            const __m256 value = load_row(r.rows, (size_t)(t + i) * r.stride + j0 + 8 * c, r.type);
            acc[c * u + i] = _mm256_fmadd_ps(at, value, acc[c * u + i]);
        }
    }
}

// out[0..8k) += the weighted sum of the rows' values j0..j0+8k, k (a constant once inlined) <= 4 vectors
// of them. Each vector of values takes u = 4 / k sums in registers, sum i over the rows t with
// t mod u = i (the last n mod u rows: sum 0), added together at the end: 4 chains of FMAs in flight, where one
// chain waited on each FMA's latency (4 cycles a row at the 8 and 16 values of the 260K and default
// models' heads; the 260K model's batched scoring and sampling about 8% faster on an AVX2-only Zen 3,
// the medians of six alternating runs).
static inline __attribute__((always_inline)) void add_weighted_block(float *out, const float *a, Rows first,
                                                                     Rows then, size_t j0, int k) {
    const int u = 4 / k, n_rows = first.n + then.n;
    __m256 acc[4];
    for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();
    int t = 0;
    for (; t + u <= n_rows; t += u) { // a group of u rows in first, in then, or across the two
        if (t + u <= first.n) {
            add_group(acc, a + t, first, t, j0, k, u);
        } else if (t >= first.n) {
            add_group(acc, a + t, then, t - first.n, j0, k, u);
        } else {
            for (int i = 0; i < u; i++) {
                const __m256 at = _mm256_set1_ps(a[t + i]);
                for (int c = 0; c < k; c++) {
                    acc[c * u + i] = _mm256_fmadd_ps(at, row_of(first, then, t + i, j0 + 8 * c), acc[c * u + i]);
                }
            }
        }
    }
    for (; t < n_rows; t++) {
        const __m256 at = _mm256_set1_ps(a[t]);
        for (int c = 0; c < k; c++) acc[c * u] = _mm256_fmadd_ps(at, row_of(first, then, t, j0 + 8 * c), acc[c * u]);
    }
    for (int c = 0; c < k; c++) {
        __m256 sum = acc[c * u];
        for (int i = 1; i < u; i++) sum = _mm256_add_ps(sum, acc[c * u + i]);
        _mm256_storeu_ps(out + 8 * c, _mm256_add_ps(_mm256_loadu_ps(out + 8 * c), sum));
    }
}

void add_weighted_rows_avx2(float *out, const float *a, Rows first, Rows then, int n) {
    int j = 0;
    for (; j + 32 <= n; j += 32) add_weighted_block(out + j, a, first, then, j, 4);
    for (; j + 16 <= n; j += 16) add_weighted_block(out + j, a, first, then, j, 2);
    for (; j < n; j += 8) add_weighted_block(out + j, a, first, then, j, 1);
}

#endif
