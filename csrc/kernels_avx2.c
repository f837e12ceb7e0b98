// AVX2+FMA kernels (x86-64-v3: Haswell and later, AMD Zen); int8 dot products through
// maddubs/madd, or AVX-VNNI's dpbusd where the target has it (Alder Lake and later). See kernels.h.
#include "kernels.h"

#ifdef KERNELS_AVX2
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
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
    for (int r = 0; r < ROWS; r++) out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

// Per 32-bit lane: the sum of 4 products of unsigned a and signed b bytes.
static inline __m256i dot4(__m256i a, __m256i b) {
#ifdef __AVXVNNI__
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b);
#else
    // pairs of |x| * w are at most 2 * 128 * 127: no int16 saturation
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

// The scale of each int32 lane of the chunk whose first group is s[0]: one broadcast when the
// chunk lies inside a group, else the chunk's 32 / gs scales spread over the lanes.
static inline __m256 lane_scales(const float *s, int gs, __m256i idx, __m256i loaded) {
    if (gs >= 32) return _mm256_broadcast_ss(s);
    return _mm256_permutevar8x32_ps(_mm256_maskload_ps(s, loaded), idx);
}

void rows_q8_avx2(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                  const QVector *xq, int n, int gs, const int *lane_group) {
    const __m256i idx = _mm256_loadu_si256((const __m256i *)lane_group);
    const __m256i loaded = first_lanes(gs < 32 ? 32 / gs : 1); // scales a chunk reads
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    int j = 0;
    for (; j + 32 <= n; j += 32) {
        const int g0 = j / gs;
        // maddubs and dpbusd want one unsigned operand: use |x| and move x's sign onto w
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq->q + j));
        __m256i xabs = _mm256_abs_epi8(xv);
        __m256 sx = lane_scales(xq->s + g0, gs, idx, loaded);
        for (int r = 0; r < ROWS; r++) {
            _mm_prefetch((const char *)(wq[r] + j) + PREFETCH * n, _MM_HINT_T0);
            __m256i wv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(wq[r] + j)), xv);
            __m256 sw = lane_scales(ws[r] + g0, gs, idx, loaded);
            __m256 dot = _mm256_cvtepi32_ps(dot4(xabs, wv));
            acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sw, sx), acc[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = hsum(acc[r]);
    rows_q8_tail(out, wq, ws, xq, j, n, gs); // < 32 values left: whole groups
}
#endif
