// AVX-512 kernels (F and BW; VNNI's dpbusd for int8 when the target has it). See kernels.h.
#include "kernels.h"

#ifdef KERNELS_AVX512
#include <immintrin.h>
#include <string.h>

void rows_f32_avx512(float *out, const float *const w[ROWS], const float *x, int n) {
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

// acc + per 32-bit lane, the sum of 4 products of unsigned a and signed b bytes
static inline __m512i dot4(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, a, b);
#else
    // pairs of |x| * w are at most 2 * 128 * 127: no int16 saturation
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1)));
#endif
}

// dpbusd wants one unsigned operand: |x|, with x's sign moved onto w
static inline __m512i signed_w(const int8_t *w, __mmask64 m, __mmask64 xneg) {
    __m512i wv = _mm512_maskz_loadu_epi8(m, w);
    return _mm512_mask_sub_epi8(wv, xneg, _mm512_setzero_si512(), wv);
}

void rows_q8_avx512(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                    const QVector *xq, int n, int gs, const int *lane_group) {
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    if (gs >= 64) {
        // a group is gs / 64 chunks: their int8 dot products add up in int32 lanes, converted and
        // scaled once a group (|sum| <= gs * 128 * 127 < 2^31)
        for (int g = 0, j = 0; g < n / gs; g++) {
            __m512i dot[ROWS];
            for (int r = 0; r < ROWS; r++) dot[r] = _mm512_setzero_si512();
            for (; j < (g + 1) * gs; j += 64) {
                __m512i xv = _mm512_loadu_si512(xq->q + j);
                __m512i xabs = _mm512_abs_epi8(xv);
                __mmask64 xneg = _mm512_movepi8_mask(xv);
                for (int r = 0; r < ROWS; r++) {
                    _mm_prefetch((const char *)(wq[r] + j) + PREFETCH * n, _MM_HINT_T0);
                    dot[r] = dot4(dot[r], xabs, signed_w(wq[r] + j, ~0ULL, xneg));
                }
            }
            __m512 sx = _mm512_set1_ps(xq->s[g]);
            for (int r = 0; r < ROWS; r++) {
                __m512 scale = _mm512_mul_ps(_mm512_set1_ps(ws[r][g]), sx);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), scale, acc[r]);
            }
        }
    } else {
        // a chunk holds 64 / gs whole groups (the last chunk may be shorter, masked): lane l's 4
        // values are in group g0 + lane_group[l]
        const __m512i idx = _mm512_loadu_si512(lane_group);
        for (int j = 0, g0 = 0; j < n; j += 64, g0 += 64 / gs) {
            const int bytes = n - j < 64 ? n - j : 64;
            const __mmask64 m = bytes == 64 ? ~0ULL : (1ULL << bytes) - 1;
            const __mmask16 sm = (__mmask16)((1u << (bytes == 64 ? 64 / gs : bytes / gs)) - 1);
            __m512i xv = _mm512_maskz_loadu_epi8(m, xq->q + j);
            __m512i xabs = _mm512_abs_epi8(xv);
            __mmask64 xneg = _mm512_movepi8_mask(xv);
            __m512 sx = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(sm, xq->s + g0));
            for (int r = 0; r < ROWS; r++) {
                _mm_prefetch((const char *)(wq[r] + j) + PREFETCH * n, _MM_HINT_T0);
                __m512i dot = dot4(_mm512_setzero_si512(), xabs, signed_w(wq[r] + j, m, xneg));
                __m512 sw = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(sm, ws[r] + g0));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sw, sx), acc[r]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

#ifdef KERNELS_Q8_PANELS
// panels_q8_avx512 for a constant nc (once inlined)
static inline __attribute__((always_inline)) void q8_panels_block(float *out, const int8_t *p0, const int8_t *p1,
                                                                  const QVector xq[], int nc, int n, int gs) {
    const size_t block = 16 * (size_t)gs + 128; // a group of 16 rows: values, sums, scales
    __m512 acc0[Q8_COLS], acc1[Q8_COLS];
    for (int c = 0; c < nc; c++) acc0[c] = acc1[c] = _mm512_setzero_ps();
    for (int g = 0; g < n / gs; g++) {
        const int8_t *b0 = p0 + g * block, *b1 = p1 + g * block;
        __m512i d0[Q8_COLS], d1[Q8_COLS];
        for (int c = 0; c < nc; c++) d0[c] = d1[c] = _mm512_setzero_si512();
        for (int k = 0; k < gs; k += 4) {
            const __m512i w0 = _mm512_loadu_si512(b0 + 16 * k), w1 = _mm512_loadu_si512(b1 + 16 * k);
            for (int c = 0; c < nc; c++) {
                int32_t x4;
                memcpy(&x4, xq[c].q + g * gs + k, sizeof(x4));
                const __m512i xu = _mm512_set1_epi32(x4 ^ (int32_t)0x80808080); // x + 128, 4 bytes a lane
                d0[c] = _mm512_dpbusd_epi32(d0[c], xu, w0);
                d1[c] = _mm512_dpbusd_epi32(d1[c], xu, w1);
            }
        }
        const __m512i sum0 = _mm512_loadu_si512(b0 + 16 * gs), sum1 = _mm512_loadu_si512(b1 + 16 * gs);
        const __m512 ws0 = _mm512_loadu_ps(b0 + 16 * gs + 64), ws1 = _mm512_loadu_ps(b1 + 16 * gs + 64);
        for (int c = 0; c < nc; c++) {
            const __m512 xs = _mm512_set1_ps(xq[c].s[g]);
            acc0[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d0[c], sum0)), _mm512_mul_ps(ws0, xs), acc0[c]);
            acc1[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d1[c], sum1)), _mm512_mul_ps(ws1, xs), acc1[c]);
        }
    }
    for (int c = 0; c < nc; c++) {
        _mm512_storeu_ps(out + c * 32, acc0[c]);
        _mm512_storeu_ps(out + c * 32 + 16, acc1[c]);
    }
}

void panels_q8_avx512(float *out, const int8_t *p0, const int8_t *p1, const QVector xq[], int nc, int n, int gs) {
    switch (nc) { // (constant column counts keep the sums in registers)
    case 4: q8_panels_block(out, p0, p1, xq, 4, n, gs); break;
    case 3: q8_panels_block(out, p0, p1, xq, 3, n, gs); break;
    case 2: q8_panels_block(out, p0, p1, xq, 2, n, gs); break;
    default: q8_panels_block(out, p0, p1, xq, 1, n, gs);
    }
}
#endif
#endif
