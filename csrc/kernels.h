// The engine's inner loops, one file per instruction set, private to matmul.c and ops.c.
// Which SIMD file compiles to code is decided by the compiler's target macros (-march):
//   kernels_avx512.c  AVX-512 F+BW (x86-64-v4), int8 dot products with VNNI when present
//   kernels_avx2.c    AVX2+FMA (x86-64-v3), with AVX-VNNI when present
//   kernels_neon.c    AArch64 NEON, with the dot-product extension when present
// kernels_scalar.c always compiles: it is the reference the others are tested against
// (csrc/test_kernels.c), and the fallback for what a SIMD file does not cover.
// -DPORTABLE_KERNELS (make run, ARCH=portable) keeps every SIMD file empty.
#ifndef KERNELS_H
#define KERNELS_H

#include "matmul.h"

#if !defined(PORTABLE_KERNELS) && defined(__AVX512F__) && defined(__AVX512BW__)
#define KERNELS_AVX512 1
#endif
#if !defined(PORTABLE_KERNELS) && defined(__AVX2__) && defined(__FMA__)
#define KERNELS_AVX2 1 // AVX-512 builds too: their driver takes the AVX2 kernels where faster
#endif
#if !defined(PORTABLE_KERNELS) && defined(__aarch64__) && defined(__ARM_NEON)
#define KERNELS_NEON 1
#endif

#define ROWS 4 // output rows per call: each load of x serves ROWS rows of W

// out[r] = w[r] . x for r < ROWS, over n columns
void rows_f32_scalar(float *out, const float *const w[ROWS], const float *x, int n);
// out[r] = sum over groups g of (wq[r] . xq->q within g) * ws[r][g] * xq->s[g]; any group size
// (lane_group: unused, the signature of the SIMD kernels below)
void rows_q8_scalar(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                    const QVector *xq, int n, int gs, const int *lane_group);
// out[r] += the same sum over the groups of columns j..n-1 (j a multiple of gs): the SIMD
// kernels' tail
void rows_q8_tail(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                  const QVector *xq, int j, int n, int gs);

// The SIMD versions, for group sizes that divide their chunk (64, 32 and 16 int8 values) or are
// multiples of it: a chunk then holds whole groups or lies inside one. lane_group[l]: the group,
// relative to the chunk's first, of the 4 values of int32 lane l; zeros when gs >= the chunk.
#if defined(KERNELS_AVX512)
void rows_f32_avx512(float *out, const float *const w[ROWS], const float *x, int n);
void rows_q8_avx512(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                    const QVector *xq, int n, int gs, const int *lane_group);
#endif
#if defined(KERNELS_AVX2)
void rows_f32_avx2(float *out, const float *const w[ROWS], const float *x, int n);
void rows_q8_avx2(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                  const QVector *xq, int n, int gs, const int *lane_group);
#endif
#if defined(KERNELS_NEON)
void rows_f32_neon(float *out, const float *const w[ROWS], const float *x, int n);
void rows_q8_neon(float *out, const int8_t *const wq[ROWS], const float *const ws[ROWS],
                  const QVector *xq, int n, int gs, const int *lane_group);
#endif

// Batched fp32 products on W packed in panels (matmul.h's pack_panels): PANEL rows of W side by
// side, column after column, so that one vector load serves PANEL rows and one broadcast value of x
// serves them all, with no sums across lanes (the rows kernels spend a third of their time on those
// at the default model's widths). out[c * 2 * PANEL + i] = row i of the panels p0 and p1 (2 * PANEL
// rows) . x[c] for c < nc <= PANEL_COLS: each product one chain of FMAs in column order, whatever nc.
// One source for every instruction set, in GCC's vector types of PANEL floats (kernels_scalar.c).
#if defined(KERNELS_AVX512)
#define PANEL 16
#elif defined(KERNELS_AVX2)
#define PANEL 8
#else
#define PANEL 4 // NEON, and SSE2 or whatever the portable build's target has
#endif
#define PANEL_COLS 6
void panels_f32(float *out, const float *p0, const float *p1, const float *const x[], int nc, int n);
// The same for Q8_0 W in matmul.h's blocks of 16 rows, with VNNI's dpbusd (unsigned by signed bytes:
// x + 128 against W, less the blocks' 128 * sum of W): out[c * 32 + i] for rows i of p0 then p1, for
// c < nc <= Q8_COLS; each product's groups added in order, whatever nc.
#define Q8_COLS 4
#if defined(KERNELS_AVX512) && defined(__AVX512VNNI__)
#define KERNELS_Q8_PANELS 1
void panels_q8_avx512(float *out, const int8_t *p0, const int8_t *p1, const QVector xq[], int nc, int n, int gs);
#endif

// Attention's products over rows of fp32 or fp16 values (matmul.h's dot_rows and add_weighted_rows):
// scalar for any width n, SIMD for n a multiple of 8 (x86; fp16 rows need F16C's conversions) or 4
// (NEON). Row t starts `stride` values after row t - 1.
#if defined(KERNELS_AVX2) && defined(__F16C__)
#define KERNELS_F16_X86 1
#else
#define KERNELS_F16_X86 0
#endif
float f16_value(uint16_t h);
uint16_t f16_from(float x);
void dot_rows_scalar(float *out, const float *x, const void *rows, int n_rows, int n, int stride, KVType type);
void add_weighted_rows_scalar(float *out, const float *a, const void *rows, int n_rows, int n, int stride,
                              KVType type);
#if defined(KERNELS_AVX2)
void dot_rows_avx2(float *out, const float *x, const void *rows, int n_rows, int n, int stride, KVType type);
void add_weighted_rows_avx2(float *out, const float *a, Rows first, Rows then, int n);
#endif
#if defined(KERNELS_NEON)
void dot_rows_neon(float *out, const float *x, const void *rows, int n_rows, int n, int stride, KVType type);
void add_weighted_rows_neon(float *out, const float *a, const void *rows, int n_rows, int n, int stride,
                            KVType type);
#endif

// Software prefetch distance of the SIMD kernels, in rows (two blocks ahead): the hardware
// prefetcher alone leaves large matrices streaming from DRAM latency-bound (+70% for int8).
#ifndef PREFETCH
#define PREFETCH 8
#endif

#endif
