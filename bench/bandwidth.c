// Read bandwidth of this machine: OMP_NUM_THREADS threads sum a buffer of BYTES over and over
// for about SECONDS, each thread its own static share as the engine's matmuls do. A buffer that
// fits in the caches measures them, a larger one DRAM. bench/run_speed.py builds it with the
// engine's flags and reports each model's speed as a share of this roofline.
//     bandwidth BYTES [SECONDS]   ->   "<GB/s>"
#include <stdio.h>
#include <stdlib.h>

#include <omp.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bandwidth BYTES [SECONDS]\n");
        return 1;
    }
    const size_t n = (size_t)atof(argv[1]) / sizeof(float);
    const double seconds = argc > 2 ? atof(argv[2]) : 1.0;
    float *a = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
    if (!a) return 1;
    float total = 0.0f;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7); // first touch by the thread that reads it
    double best = 0.0, start = omp_get_wtime();
    while (omp_get_wtime() - start < seconds) {
        double t0 = omp_get_wtime();
        float sum = 0.0f;
#pragma omp parallel for simd schedule(static) reduction(+ : sum)
        for (size_t i = 0; i < n; i++) sum += a[i];
        double t = omp_get_wtime() - t0;
        total += sum; // keeps the loop alive
        if (n * sizeof(float) / t > best) best = n * sizeof(float) / t;
    }
    printf("%.2f\n", best / 1e9 + (total == -1.0f)); // best pass, in GB/s
    free(a);
    return 0;
}
