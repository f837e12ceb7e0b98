// Read bandwidth of this machine: OMP_NUM_THREADS threads sum a buffer of BYTES over and over
// for about SECONDS, each thread its own static share as the engine's matmuls do, read as four
// streams in step with software prefetch ahead (as the kernels read four rows at once). A buffer
// that fits in the caches measures them, a larger one DRAM. The best pass is the roofline that
// bench/run_speed.py divides each model's speed by. (A plain `sum += a[i]` loop reads 10-20% less
// from DRAM on the machines measured, so the engine could exceed it.)
//     bandwidth BYTES [SECONDS]   ->   "<GB/s>"
#include <stdio.h>
#include <stdlib.h>

#include <omp.h>

#define STREAMS 4
#define AHEAD 512 // floats: 2 KB ahead in each stream

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bandwidth BYTES [SECONDS]\n");
        return 1;
    }
    const size_t n = (size_t)atof(argv[1]) / sizeof(float);
    const double seconds = argc > 2 ? atof(argv[2]) : 1.0;
    float *a = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
    if (!a) return 1;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7); // first touch by the thread that reads it
    double best = 0.0, start = omp_get_wtime();
    float total = 0.0f;
    while (omp_get_wtime() - start < seconds) {
        double t0 = omp_get_wtime();
        float sum = 0.0f;
        size_t bytes = 0;
#pragma omp parallel reduction(+ : sum, bytes)
        {
            const int t = omp_get_thread_num(), threads = omp_get_num_threads();
            const size_t lo = n * t / threads, len = (n * (t + 1) / threads - lo) / STREAMS / 16 * 16;
            const float *s[STREAMS];
            for (int k = 0; k < STREAMS; k++) s[k] = a + lo + k * len;
            for (size_t i = 0; i < len; i += 16) {
                for (int k = 0; k < STREAMS; k++) __builtin_prefetch(s[k] + i + AHEAD);
#pragma omp simd reduction(+ : sum)
                for (int j = 0; j < 16; j++) sum += s[0][i + j] + s[1][i + j] + s[2][i + j] + s[3][i + j];
            }
            bytes += STREAMS * len * sizeof(float);
        }
        double t = omp_get_wtime() - t0;
        total += sum; // keeps the loop alive
        if (bytes / t > best) best = bytes / t;
    }
    printf("%.2f\n", best / 1e9 + (total == -1.0f)); // best pass, in GB/s
    free(a);
    return 0;
}
