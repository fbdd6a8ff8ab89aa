/* One pass per tensor for the probe's statistics on the CPU (probes/cpu_kernel.py).
 *
 * torch computes the same row in ~11 passes over memory (sum, norms, aminmax,
 * x*x, abs, compares, dot products), each a separate kernel; this reads each
 * float once and keeps every accumulator in registers. Plain C, no torch
 * headers, so it compiles in well under a second with any C compiler; the
 * loops are written for `#pragma omp simd` (-fopenmp-simd: vectorisation
 * only, no OpenMP runtime) and, on x86-64 with GCC, compiled for AVX-512
 * (x86-64-v4), AVX2 (v3) and the baseline (target_clones: the loader picks
 * what this CPU runs), so a cached library never holds instructions another
 * node of a cluster lacks.
 *
 * Row layout (double), as probes/reduce.py's COLUMNS[:13]:
 *   count sum sumsq abssum min max near_zero zeros nan posinf neginf sum3 sum4
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define XRAY_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define XRAY_CLONES
#endif

enum { COUNT, SUM, SUMSQ, ABSSUM, MIN, MAX, NEAR, ZEROS, NAN_, POSINF, NEGINF, SUM3, SUM4, NROW };

/* Elements per block: float32 partial sums and int32 counts within a block, float64 across. */
#define BLOCK 1024
/* |x| range where x^4, summed over a block in float32, neither overflows nor sinks into
 * subnormals (as probes/reduce.py's POW4_SAFE and POW4_TINY): outside it, float64. */
#define POW4_SAFE 1e4f
#define POW4_TINY 1e-7f

/* Sum, sum of squares and sum of |x| accumulate in float64 throughout: the variance is a
 * difference of the first two, which float32 partials would ruin for a tensor whose mean
 * dwarfs its spread (a LayerNorm weight near 1). x^3 and x^4 go through float32 partials per
 * block (16 lanes instead of 8; ~1e-6 relative, as torch's own float32 path for them), redone
 * in float64 when the tensor's largest |x| is outside [POW4_TINY, POW4_SAFE]. */
XRAY_CLONES
static void row_of(const float *x, int64_t n, float eps, double *row) {
    double s1 = 0, s2 = 0, s3 = 0, s4 = 0, sa = 0;
    int64_t near = 0, zeros = 0;
    float mn = INFINITY, mx = -INFINITY;
    for (int64_t j = 0; j < n; j += BLOCK) {
        int64_t end = j + BLOCK < n ? j + BLOCK : n;
        double b1 = 0, b2 = 0, ba = 0;
        float f3 = 0, f4 = 0;
        int32_t cn = 0, cz = 0;
#pragma omp simd reduction(+ : b1, b2, ba, f3, f4, cn, cz) reduction(min : mn) reduction(max : mx)
        for (int64_t i = j; i < end; i++) {
            float v = x[i], v2 = v * v;
            double d = v;
            b1 += d;
            b2 += d * d;
            f3 += v2 * v;
            f4 += v2 * v2;
            ba += fabs(d);
            cn += fabsf(v) < eps; /* false for NaN, as torch's abs() < eps */
            cz += v == 0.0f;
            mn = v < mn ? v : mn; /* a NaN never wins a comparison: handled below */
            mx = v > mx ? v : mx;
        }
        s1 += b1;
        s2 += b2;
        s3 += f3;
        s4 += f4;
        sa += ba;
        near += cn;
        zeros += cz;
    }
    double nan = 0, posinf = 0, neginf = 0;
    if (!isfinite(s1 + s2)) { /* a NaN or an Inf somewhere: count them (a second pass, rarely) */
        for (int64_t i = 0; i < n; i++) {
            float v = x[i];
            nan += v != v;
            posinf += v == INFINITY;
            neginf += v == -INFINITY;
        }
    } else if (n > 0 && (fmaxf(-mn, mx) > POW4_SAFE || fmaxf(-mn, mx) < POW4_TINY)) {
        s3 = s4 = 0; /* huge or tiny values: x^3 and x^4 in float64 (a second pass, rarely) */
        for (int64_t i = 0; i < n; i++) {
            double d = x[i], d2 = d * d;
            s3 += d2 * d;
            s4 += d2 * d2;
        }
    }
    row[COUNT] = (double)n;
    row[SUM] = s1;
    row[SUMSQ] = s2;
    row[ABSSUM] = sa;
    /* torch's aminmax is NaN when the tensor holds a NaN, and so are its sums */
    row[MIN] = n == 0 ? NAN : (nan > 0 ? NAN : mn);
    row[MAX] = n == 0 ? NAN : (nan > 0 ? NAN : mx);
    row[NEAR] = (double)near;
    row[ZEROS] = (double)zeros;
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

/* The rows and code counts of `m` tensors: tensor t's row goes to rows[slots[t]] (NROW doubles)
 * and its codes to codes[slots[t]] (1 << (32 - shift) counts, zeroed here), so threads that
 * share the tensors write into one output without copies. */
void xray_reduce(int64_t m, const float *const *ptrs, const int64_t *numels, const int64_t *offsets,
                 const int64_t *strides, const int64_t *ks, const int64_t *slots, float eps, int shift,
                 double *rows, int64_t *codes) {
    const int64_t ncodes = (int64_t)1 << (32 - shift);
    for (int64_t t = 0; t < m; t++) {
        row_of(ptrs[t], numels[t], eps, rows + slots[t] * NROW);
        int64_t *c = codes + slots[t] * ncodes;
        memset(c, 0, sizeof(int64_t) * (size_t)ncodes);
        codes_of(ptrs[t], offsets[t], strides[t], ks[t], shift, c);
    }
}

/* Units (the last dimension, `cols` wide) whose |x| tops eps in none of the `rows` rows: how
 * many. A NaN tops nothing, as torch's (abs(x) > eps).any(0); colmax is scratch of `cols` floats. */
XRAY_CLONES
int64_t xray_dead_units(const float *x, int64_t rows, int64_t cols, float eps, float *colmax) {
    for (int64_t c = 0; c < cols; c++) colmax[c] = 0.0f;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; c++) {
            float a = fabsf(row[c]);
            colmax[c] = a > colmax[c] ? a : colmax[c];
        }
    }
    int64_t dead = 0;
    for (int64_t c = 0; c < cols; c++) dead += !(colmax[c] > eps);
    return dead;
}

int xray_nrow(void) { return NROW; }
