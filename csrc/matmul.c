// Matrix-vector kernels: AVX-512 when compiled for it, portable C otherwise. Rows go in
// blocks of ROWS so that each load of x serves ROWS rows.
#include "matmul.h"

#include <math.h>
#include <stddef.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_AVX512 1
#endif

#define ROWS 4
// Software prefetch of the same columns PREFETCH rows (two blocks) ahead: the hardware
// prefetcher alone leaves large matrices streaming from DRAM latency-bound (+70% for int8).
#define PREFETCH 8

void quantize_q8(QVector *xq, const float *x, int n, int group_size) {
    for (int g = 0; g < n / group_size; g++) {
        const float *xg = x + (size_t)g * group_size;
        float wmax = 0.0f;
        for (int i = 0; i < group_size; i++) wmax = fmaxf(wmax, fabsf(xg[i]));
        float scale = wmax / 127.0f;
        float inv = scale > 0.0f ? 1.0f / scale : 0.0f; // an all-zero group stays zero
        xq->s[g] = scale;
        for (int i = 0; i < group_size; i++) {
            // lrintf rounds half to even, like numpy; NaN gives an unspecified value, not UB
            xq->q[(size_t)g * group_size + i] = (int8_t)lrintf(xg[i] * inv);
        }
    }
}

// ----------------------------------------------------------------------------
// fp32

#ifdef HAVE_AVX512
static void rows_f32(float *out, const float *const w[ROWS], const float *x, int n) {
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 xv = _mm512_loadu_ps(x + j);
        for (int r = 0; r < ROWS; r++) {
            _mm_prefetch((const char *)(w[r] + j + PREFETCH * n), _MM_HINT_T0);
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w[r] + j), xv, acc[r]);
        }
    }
    if (j < n) {
        __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + j);
        for (int r = 0; r < ROWS; r++) {
            acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w[r] + j), xv, acc[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#else
static void rows_f32(float *out, const float *const w[ROWS], const float *x, int n) {
    for (int r = 0; r < ROWS; r++) {
        float sum = 0.0f;
        for (int j = 0; j < n; j++) sum += w[r][j] * x[j];
        out[r] = sum;
    }
}
#endif

// ----------------------------------------------------------------------------
// Q8_0: int8 dot products within a group, then scaled by both groups' scales

static void rows_q8_scalar(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                           const QVector *xq, int n, int gs) {
    for (int r = 0; r < ROWS; r++) {
        float sum = 0.0f;
        for (int g = 0; g < n / gs; g++) {
            int32_t dot = 0; // at most 65536 * 127 * 127 < 2^31 (gs <= dim <= 65536)
            for (int k = g * gs; k < (g + 1) * gs; k++) dot += (int32_t)xq->q[k] * wq[r][k];
            sum += (float)dot * ws[r][g] * xq->s[g];
        }
        out[r] = sum;
    }
}

#ifdef HAVE_AVX512
// Per 32-bit lane: sum of 4 products of unsigned a and signed b bytes.
static inline __m512i dot4(__m512i a, __m512i b) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), a, b);
#else
    // pairs of |x| * w are at most 2 * 127 * 128: no int16 saturation
    return _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1));
#endif
}

// The group size divides 64 or is a multiple of it, so a 64-byte chunk holds whole groups
// (or lies inside one): lane l of a chunk (bytes 4l..4l+3) belongs to group g0 + idx[l].
static void rows_q8(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                    const QVector *xq, int n, int gs, __m512i idx) {
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 64) {
        int bytes = n - j < 64 ? n - j : 64;
        __mmask64 m = bytes == 64 ? ~0ULL : (1ULL << bytes) - 1;
        int g0 = j / gs;
        __mmask16 sm = (__mmask16)((1u << (gs < 64 ? bytes / gs : 1)) - 1);
        // dpbusd wants one unsigned operand: use |x| and move x's sign onto w
        __m512i xv = _mm512_maskz_loadu_epi8(m, xq->q + j);
        __m512i xabs = _mm512_abs_epi8(xv);
        __mmask64 xneg = _mm512_movepi8_mask(xv);
        __m512 sx = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(sm, xq->s + g0));
        for (int r = 0; r < ROWS; r++) {
            _mm_prefetch((const char *)(wq[r] + j) + PREFETCH * n, _MM_HINT_T0);
            __m512i wv = _mm512_maskz_loadu_epi8(m, wq[r] + j);
            wv = _mm512_mask_sub_epi8(wv, xneg, _mm512_setzero_si512(), wv);
            __m512 sw = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(sm, ws[r] + g0));
            __m512 dot = _mm512_cvtepi32_ps(dot4(xabs, wv));
            acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sw, sx), acc[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

// ----------------------------------------------------------------------------

void matmul(float *out, const Matrix *w, const float *x, const QVector *xq, int n, int d,
            int group_size) {
    const int gs = group_size;
#ifdef HAVE_AVX512
    const int simd_q8 = gs >= 4 && (64 % gs == 0 || gs % 64 == 0);
    int lane_group[16];
    for (int l = 0; l < 16; l++) lane_group[l] = gs < 64 && gs > 0 ? 4 * l / gs : 0;
    const __m512i idx = _mm512_loadu_si512(lane_group);
#endif
    const int blocks = (d + ROWS - 1) / ROWS;
#pragma omp for schedule(static) nowait
    for (int b = 0; b < blocks; b++) {
        const int r0 = b * ROWS;
        const int nr = d - r0 < ROWS ? d - r0 : ROWS;
        float res[ROWS];
        // a short last block repeats its last row rather than branching in the kernels
        size_t row[ROWS];
        for (int r = 0; r < ROWS; r++) row[r] = (size_t)(r0 + (r < nr ? r : nr - 1));
        if (w->f) {
            const float *wf[ROWS];
            for (int r = 0; r < ROWS; r++) wf[r] = w->f + row[r] * n;
            rows_f32(res, wf, x, n);
        } else {
            const int8_t *wq[ROWS];
            const float *ws[ROWS];
            for (int r = 0; r < ROWS; r++) {
                wq[r] = w->q + row[r] * n;
                ws[r] = w->s + row[r] * (n / gs);
            }
#ifdef HAVE_AVX512
            if (simd_q8) {
                rows_q8(res, wq, ws, xq, n, gs, idx);
            } else {
                rows_q8_scalar(res, wq, ws, xq, n, gs);
            }
#else
            rows_q8_scalar(res, wq, ws, xq, n, gs);
#endif
        }
        for (int r = 0; r < nr; r++) out[r0 + r] = res[r];
    }
}
