/* One pass per tensor for the probe's statistics on the CPU (probes/cpu_kernel.py).
 *
 * torch computes the same row in ~11 passes over memory (sum, norms, aminmax,
 * x*x, abs, compares, dot products), each a separate kernel; this reads each
 * float once and keeps every accumulator in registers. Plain C, no torch
 * headers, so it compiles in well under a second with any C compiler; the
 * loops are written for `#pragma omp simd` (-fopenmp-simd: vectorisation
 * only, no OpenMP runtime) and compiled once for AVX2+FMA and once generic on
 * x86-64 (target_clones: the loader picks the one this CPU runs), so a
 * cached library never holds instructions another node of a cluster lacks.
 *
 * Row layout (double), as probes/reduce.py's COLUMNS[:13]:
 *   count sum sumsq abssum min max near_zero zeros nan posinf neginf sum3 sum4
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define XRAY_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define XRAY_CLONES
#endif

enum { COUNT, SUM, SUMSQ, ABSSUM, MIN, MAX, NEAR, ZEROS, NAN_, POSINF, NEGINF, SUM3, SUM4, NROW };

/* Sums in float64 over blocks of float32 partial sums would be faster, but
 * float64 throughout keeps the row as exact as torch's float64 path. */
XRAY_CLONES
static void row_of(const float *x, int64_t n, float eps, double *row) {
    double s1 = 0, s2 = 0, s3 = 0, s4 = 0, sa = 0, near = 0, zeros = 0;
    float mn = INFINITY, mx = -INFINITY;
#pragma omp simd reduction(+ : s1, s2, s3, s4, sa, near, zeros) reduction(min : mn) reduction(max : mx)
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        double d = v, d2 = d * d;
        s1 += d;
        s2 += d2;
        s3 += d2 * d;
        s4 += d2 * d2;
        sa += fabs(d);
        near += fabsf(v) < eps ? 1.0 : 0.0; /* false for NaN, as torch's abs() < eps */
        zeros += v == 0.0f ? 1.0 : 0.0;
        mn = v < mn ? v : mn; /* a NaN never wins a comparison: handled below */
        mx = v > mx ? v : mx;
    }
    double nan = 0, posinf = 0, neginf = 0;
    if (!isfinite(s1 + s2)) { /* a NaN or an Inf somewhere: count them (a second pass, rarely) */
        for (int64_t i = 0; i < n; i++) {
            float v = x[i];
            nan += v != v;
            posinf += v == INFINITY;
            neginf += v == -INFINITY;
        }
    }
    row[COUNT] = (double)n;
    row[SUM] = s1;
    row[SUMSQ] = s2;
    row[ABSSUM] = sa;
    /* torch's aminmax is NaN when the tensor holds a NaN, and so are its sums */
    row[MIN] = n == 0 ? NAN : (nan > 0 ? NAN : mn);
    row[MAX] = n == 0 ? NAN : (nan > 0 ? NAN : mx);
    row[NEAR] = near;
    row[ZEROS] = zeros;
    row[NAN_] = nan;
    row[POSINF] = posinf;
    row[NEGINF] = neginf;
    row[SUM3] = s3;
    row[SUM4] = s4;
}

/* Count the float codes (the top 32 - shift bits) of x[offset + j*stride], j < k. */
static void codes_of(const float *x, int64_t offset, int64_t stride, int64_t k, int shift, int64_t *codes) {
    const uint32_t *bits = (const uint32_t *)x;
    for (int64_t j = 0; j < k; j++) codes[bits[offset + j * stride] >> shift]++;
}

/* The rows and code counts of `m` tensors: rows is [m][NROW], codes [m][1 << (32 - shift)] (zeroed here). */
void xray_reduce(int64_t m, const float *const *ptrs, const int64_t *numels, const int64_t *offsets,
                 const int64_t *strides, const int64_t *ks, float eps, int shift, double *rows, int64_t *codes) {
    const int64_t ncodes = (int64_t)1 << (32 - shift);
    for (int64_t t = 0; t < m; t++) {
        row_of(ptrs[t], numels[t], eps, rows + t * NROW);
        int64_t *c = codes + t * ncodes;
        memset(c, 0, sizeof(int64_t) * (size_t)ncodes);
        codes_of(ptrs[t], offsets[t], strides[t], ks[t], shift, c);
    }
}

int xray_nrow(void) { return NROW; }
