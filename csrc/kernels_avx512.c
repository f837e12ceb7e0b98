// AVX-512 kernels (F and BW; VNNI's dpbusd for int8 when the target has it). See kernels.h.
#include "kernels.h"

#ifdef KERNELS_AVX512
#include <immintrin.h>

// Sums of 16-lane vectors, each by the same tree (the one of GCC's _mm512_reduce_add_ps): the two
// 256-bit halves, then the two 128-bit quarters of that, then lanes 0 + 2 and 1 + 3, then those
// two. The steps below take two vectors at once, so a tile's 16 sums cost a fifth of 16 reductions.
// shuffle(a, b, lo) + shuffle(a, b, hi): each step below adds two selections of the lanes of a and b
#define ADD_SHUFFLED(shuffle, a, b, lo, hi) _mm512_add_ps(shuffle(a, b, lo), shuffle(a, b, hi))
// [a0 + a2, a1 + a3, b0 + b2, b1 + b3] of the 128-bit quarters of a and b
static inline __m512 halves(__m512 a, __m512 b) {
    return ADD_SHUFFLED(_mm512_shuffle_f32x4, a, b, _MM_SHUFFLE(1, 0, 1, 0), _MM_SHUFFLE(3, 2, 3, 2));
}
// [a0 + a1, b0 + b1, c0 + c1, d0 + d1] of the outputs of halves(), a = [a0, a1, b0, b1], b = [c0, c1, d0, d1]
static inline __m512 quarters(__m512 a, __m512 b) {
    return ADD_SHUFFLED(_mm512_shuffle_f32x4, a, b, _MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1));
}
// in each 128-bit quarter holding one sum's 4 lanes in a and another's in b: [a0 + a2, a1 + a3, b0 + b2, b1 + b3]
static inline __m512 pairs(__m512 a, __m512 b) {
    return ADD_SHUFFLED(_mm512_shuffle_ps, a, b, _MM_SHUFFLE(1, 0, 1, 0), _MM_SHUFFLE(3, 2, 3, 2));
}
// in each quarter of pairs()'s outputs a = [a0, a1, b0, b1], b = [c0, c1, d0, d1]: [a0 + a1, b0 + b1, c0 + c1, d0 + d1]
static inline __m512 lanes(__m512 a, __m512 b) {
    return ADD_SHUFFLED(_mm512_shuffle_ps, a, b, _MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1));
}

// out[r] = the sum of v[r], r < ROWS
static inline void sum4(float *out, const __m512 v[ROWS]) {
    __m512 q = quarters(halves(v[0], v[1]), halves(v[2], v[3])); // quarter r: row r
    __m512 s = lanes(pairs(q, q), pairs(q, q));                   // lane 4r: row r
    _mm_storeu_ps(out, _mm512_castps512_ps128(
                           _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), s)));
}

// out[c * ROWS + r] = the sum of v[c][r]: sum4 of each column, by the same steps
static inline void sum16(float *out, const __m512 v[COLS][ROWS]) {
    __m512 q[COLS]; // quarter r: (c, r)
    for (int c = 0; c < COLS; c++) q[c] = quarters(halves(v[c][0], v[c][1]), halves(v[c][2], v[c][3]));
    __m512 s = lanes(pairs(q[0], q[1]), pairs(q[2], q[3])); // lane 4r + c: (c, r)
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(
                              _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), s));
}

_Static_assert(ROWS == 4 && COLS == 4, "sum4 and sum16 reduce 4 rows of 4 columns");

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
    sum4(out, acc);
}

// rows_f32_avx512 for COLS vectors: 16 sums in flight, 8 loads for 16 FMAs where the rows kernel
// takes 5 for 4
void tile_f32_avx512(float *out, const float *const w[ROWS], const float *const x[COLS], int n) {
    __m512 acc[COLS][ROWS], wv[ROWS];
    for (int c = 0; c < COLS; c++) {
        for (int r = 0; r < ROWS; r++) acc[c][r] = _mm512_setzero_ps();
    }
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        for (int r = 0; r < ROWS; r++) {
            _mm_prefetch((const char *)(w[r] + j + PREFETCH * n), _MM_HINT_T0);
            wv[r] = _mm512_loadu_ps(w[r] + j);
        }
        for (int c = 0; c < COLS; c++) {
            __m512 xv = _mm512_loadu_ps(x[c] + j);
            for (int r = 0; r < ROWS; r++) acc[c][r] = _mm512_fmadd_ps(wv[r], xv, acc[c][r]);
        }
    }
    if (j < n) {
        __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        for (int r = 0; r < ROWS; r++) wv[r] = _mm512_maskz_loadu_ps(m, w[r] + j);
        for (int c = 0; c < COLS; c++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x[c] + j);
            for (int r = 0; r < ROWS; r++) acc[c][r] = _mm512_fmadd_ps(wv[r], xv, acc[c][r]);
        }
    }
    sum16(out, acc);
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

// panels_f32_avx512 for a constant nc (once inlined): 2 * nc sums in registers
static inline __attribute__((always_inline)) void panels_block(float *out, const float *p0, const float *p1,
                                                               const float *const x[], int nc, int n) {
    __m512 a0[PANEL_COLS], a1[PANEL_COLS];
    for (int c = 0; c < nc; c++) a0[c] = a1[c] = _mm512_setzero_ps();
    for (int j = 0; j < n; j++) {
        const __m512 w0 = _mm512_loadu_ps(p0 + (size_t)j * PANEL), w1 = _mm512_loadu_ps(p1 + (size_t)j * PANEL);
        for (int c = 0; c < nc; c++) {
            const __m512 xv = _mm512_set1_ps(x[c][j]);
            a0[c] = _mm512_fmadd_ps(w0, xv, a0[c]);
            a1[c] = _mm512_fmadd_ps(w1, xv, a1[c]);
        }
    }
    for (int c = 0; c < nc; c++) {
        _mm512_storeu_ps(out + c * 2 * PANEL, a0[c]);
        _mm512_storeu_ps(out + c * 2 * PANEL + PANEL, a1[c]);
    }
}

void panels_f32_avx512(float *out, const float *p0, const float *p1, const float *const x[], int nc, int n) {
    switch (nc) { // (constant column counts keep the sums in registers)
    case 6: panels_block(out, p0, p1, x, 6, n); break;
    case 5: panels_block(out, p0, p1, x, 5, n); break;
    case 4: panels_block(out, p0, p1, x, 4, n); break;
    case 3: panels_block(out, p0, p1, x, 3, n); break;
    case 2: panels_block(out, p0, p1, x, 2, n); break;
    default: panels_block(out, p0, p1, x, 1, n);
    }
}

#endif
