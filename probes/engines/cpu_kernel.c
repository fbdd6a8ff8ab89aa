/* One pass per tensor for the probe's statistics on the CPU (probes/engines/cpu_kernel.py).
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
 * Row layout (double), as probes/engines/layout.py's COLUMNS[:14]:
 *   count sum sumsq abssum min max near_zero zeros nan posinf neginf sum3 sum4 dead_units
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define XRAY_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define XRAY_CLONES
#endif

enum { COUNT, SUM, SUMSQ, ABSSUM, MIN, MAX, NEAR, ZEROS, NAN_, POSINF, NEGINF, SUM3, SUM4, DEAD, NROW };

/* Elements per block: float32 partial sums and int32 counts within a block, float64 across. */
#define BLOCK 1024
/* Blocks read ahead: a tensor is usually out of cache by the time the probe reads it (an
 * activation written early in the forward), and the arithmetic per float is enough that the
 * hardware prefetcher alone leaves the core waiting on memory. */
#define AHEAD 4
/* |x| range where powers of x - c, summed over a block in float32, neither overflow nor sink
 * into subnormals (as probes/engines/reduce.py's POW4_SAFE and POW4_TINY): outside it, float64. */
#define POW4_SAFE 1e4f
#define POW4_TINY 1e-7f
/* Histogram sub-counters (four), used in turn: consecutive samples often share a code, and one
 * counter would make each increment wait for the previous one's store. Samples smaller than
 * LANES_FROM are counted straight into their bins (clearing and folding the sub-counters
 * would cost more). */
#define LANES 4
#define LANES_FROM 8192

/* The five sums in float64, exactly as torch's float64 path; for the rare tensor that needs it. */
static void exact_sums(const float *x, int64_t n, double *row) {
    double s1 = 0, s2 = 0, s3 = 0, s4 = 0, sa = 0, nan = 0, posinf = 0, neginf = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        double d = v, d2 = d * d;
        s1 += d;
        s2 += d2;
        s3 += d2 * d;
        s4 += d2 * d2;
        sa += fabs(d);
        nan += v != v;
        posinf += v == INFINITY;
        neginf += v == -INFINITY;
    }
    row[SUM] = s1;
    row[SUMSQ] = s2;
    row[ABSSUM] = sa;
    row[SUM3] = s3;
    row[SUM4] = s4;
    row[NAN_] = nan;
    row[POSINF] = posinf;
    row[NEGINF] = neginf;
}

/* The row of x[0..n) and the histogram of the sample x[offset + j*stride], j < k, counted
 * while each block is in L1: by float code (the top 32 - shift bits) into `lanes` (LANES x
 * ncodes), or, when lanes is NULL, straight into hist[code_bins[code]]. With `colmax` (cols
 * floats, zeroed), also the largest |x| of each unit of the last dimension, `cols` wide.
 *
 * Within a block the powers of y = x - c, where c is the mean of the blocks before (of the
 * first block, for the first), are summed in float32 (16 lanes instead of 8), and turned into
 * sums of powers of x in float64 after each block. Shifting keeps the variance exact where it
 * matters: a tensor whose mean dwarfs its spread (a LayerNorm weight near 1) has small y, so
 * the float32 rounding is relative to the spread, not the mean (~1e-7 of the sum of |x - c|^p:
 * docs/benchmarks.md). Tensors that contain a NaN or an Inf, or whose largest |x| is outside
 * [POW4_TINY, POW4_SAFE], get a second, float64 pass (exact_sums). */
XRAY_CLONES
static void row_of(const float *x, int64_t n, float eps, double *row, int64_t offset, int64_t stride, int64_t k,
                   int shift, int64_t ncodes, uint32_t *lanes, const int32_t *code_bins, int64_t *hist,
                   int64_t cols, float *colmax) {
    double s1 = 0, s2 = 0, s3 = 0, s4 = 0, sa = 0;
    int64_t near = 0, zeros = 0, next = offset, last = k > 0 ? offset + (k - 1) * stride : -1;
    float mn = INFINITY, mx = -INFINITY;
    const uint32_t *bits = (const uint32_t *)x;
    for (int64_t j = 0; j < n; j += BLOCK) {
        int64_t end = j + BLOCK < n ? j + BLOCK : n;
        if (end + AHEAD * BLOCK <= n)
            for (int64_t q = 0; q < BLOCK; q += 64 / sizeof(float)) __builtin_prefetch(x + end + (AHEAD - 1) * BLOCK + q);
        float c;
        if (j == 0) { /* the first block's own mean (it is read into L1 for the pass below anyway) */
            float f = 0;
#pragma omp simd reduction(+ : f)
            for (int64_t i = 0; i < end; i++) f += x[i];
            c = f / (float)end;
        } else {
            c = (float)(s1 / (double)j);
        }
        if (!isfinite(c)) c = 0; /* the sums are redone in float64 below anyway */
        float p1 = 0, p2 = 0, p3 = 0, p4 = 0, pa = 0;
        int32_t cn = 0, cz = 0;
#pragma omp simd reduction(+ : p1, p2, p3, p4, pa, cn, cz) reduction(min : mn) reduction(max : mx)
        for (int64_t i = j; i < end; i++) {
            float v = x[i], y = v - c, y2 = y * y;
            p1 += y;
            p2 += y2;
            p3 += y2 * y;
            p4 += y2 * y2;
            pa += fabsf(v);
            cn += fabsf(v) < eps; /* false for NaN, as torch's abs() < eps */
            cz += v == 0.0f;
            mn = v < mn ? v : mn; /* a NaN never wins a comparison: handled below */
            mx = v > mx ? v : mx;
        }
        /* sums of x^p from sums of (x - c)^p, binomially, in float64 */
        double nb = (double)(end - j), d = c, d2 = d * d;
        s1 += p1 + nb * d;
        s2 += p2 + 2 * d * p1 + nb * d2;
        s3 += p3 + 3 * d * p2 + 3 * d2 * p1 + nb * d2 * d;
        s4 += p4 + 4 * d * p3 + 6 * d2 * p2 + 4 * d2 * d * p1 + nb * d2 * d2;
        sa += pa;
        near += cn;
        zeros += cz;
        if (colmax != NULL) /* a NaN tops nothing, as torch's (abs(x) > eps).any(0) */
            for (int64_t i = j, col = j % cols; i < end; col = 0) {
                int64_t run = end - i < cols - col ? end - i : cols - col;
                const float *seg = x + i;
                float *cm = colmax + col;
#pragma omp simd
                for (int64_t r = 0; r < run; r++) cm[r] = fabsf(seg[r]) > cm[r] ? fabsf(seg[r]) : cm[r];
                i += run;
            }
        if (lanes != NULL) {
            int64_t stop = end - 1 < last ? end - 1 : last; /* the last sample index in this block */
            uint32_t *l0 = lanes, *l1 = lanes + ncodes, *l2 = lanes + 2 * ncodes, *l3 = lanes + 3 * ncodes;
            for (; next + 3 * stride <= stop; next += 4 * stride) {
                l0[bits[next] >> shift]++;
                l1[bits[next + stride] >> shift]++;
                l2[bits[next + 2 * stride] >> shift]++;
                l3[bits[next + 3 * stride] >> shift]++;
            }
            for (; next <= stop; next += stride) l0[bits[next] >> shift]++;
        } else {
            for (; next < end && next <= last; next += stride) hist[code_bins[bits[next] >> shift]]++;
        }
    }
    row[COUNT] = (double)n;
    row[SUM] = s1;
    row[SUMSQ] = s2;
    row[ABSSUM] = sa;
    row[SUM3] = s3;
    row[SUM4] = s4;
    row[NAN_] = row[POSINF] = row[NEGINF] = 0;
    float amax = fmaxf(-mn, mx);
    if (!isfinite(s1 + s2 + s3 + s4 + sa) || amax > POW4_SAFE || (amax < POW4_TINY && amax > 0))
        exact_sums(x, n, row); /* also counts the NaNs and Infs */
    row[NEAR] = (double)near;
    row[ZEROS] = (double)zeros;
    /* torch's aminmax is NaN when the tensor holds a NaN, and so are its sums */
    row[MIN] = n == 0 || row[NAN_] > 0 ? NAN : mn;
    row[MAX] = n == 0 || row[NAN_] > 0 ? NAN : mx;
    row[DEAD] = NAN;
    if (colmax != NULL) { /* the share of units whose |x| never tops eps */
        int64_t dead = 0;
        for (int64_t c = 0; c < cols; c++) dead += !(colmax[c] > eps);
        row[DEAD] = (double)dead / (double)cols;
    }
}

/* The rows and histograms of `m` tensors. Tensor t's row goes to rows[slots[t]] (NROW
 * doubles) and its sample's counts to hists[slots[t]] (nbins counts, zeroed here), each
 * float code counted in the bin code_bins[code]; threads that share the tensors write into
 * one output. units[t] > 0 asks for tensor t's dead units over a last dimension that wide
 * (NaN in the row otherwise). Returns 0, or -1 when out of memory. */
int xray_reduce(int64_t m, const float *const *ptrs, const int64_t *numels, const int64_t *offsets,
                const int64_t *strides, const int64_t *ks, const int64_t *units, const int64_t *slots, float eps,
                int shift, const int32_t *code_bins, int64_t nbins, double *rows, int64_t *hists) {
    const int64_t ncodes = (int64_t)1 << (32 - shift);
    uint32_t *lanes = malloc(sizeof(uint32_t) * LANES * (size_t)ncodes);
    if (lanes == NULL) return -1;
    for (int64_t t = 0; t < m; t++) {
        int64_t *h = hists + slots[t] * nbins;
        memset(h, 0, sizeof(int64_t) * (size_t)nbins);
        int use_lanes = ks[t] >= LANES_FROM;
        if (use_lanes) memset(lanes, 0, sizeof(uint32_t) * LANES * (size_t)ncodes);
        float *colmax = NULL;
        if (units[t] > 0 && (colmax = calloc((size_t)units[t], sizeof(float))) == NULL) {
            free(lanes);
            return -1;
        }
        row_of(ptrs[t], numels[t], eps, rows + slots[t] * NROW, offsets[t], strides[t], ks[t], shift, ncodes,
               use_lanes ? lanes : NULL, code_bins, h, units[t], colmax);
        free(colmax);
        for (int64_t c = 0; use_lanes && c < ncodes; c++) {
            int64_t count = 0;
            for (int l = 0; l < LANES; l++) count += lanes[l * ncodes + c];
            h[code_bins[c]] += count;
        }
    }
    free(lanes);
    return 0;
}

/* out = x_0[idx_0] ++ x_1[idx_1] ++ ... for `m` float32 tensors; idx_t is NULL for all of x_t.
 * The probe's update subsets: one call instead of an index op per parameter. */
void xray_gather(int64_t m, const float *const *ptrs, const int64_t *const *idx, const int64_t *counts, float *out) {
    for (int64_t t = 0; t < m; t++) {
        const float *x = ptrs[t];
        const int64_t *ix = idx[t];
        if (ix == NULL)
            memcpy(out, x, sizeof(float) * (size_t)counts[t]);
        else
            for (int64_t j = 0; j < counts[t]; j++) out[j] = x[ix[j]];
        out += counts[t];
    }
}

/* The every-step tier (probes/capture/signals.py) reads `m` float32 tensors at runs of
 * consecutive elements: tensor t's runs are len[t] long and start at starts[t][0 .. runs[t])
 * (starts[t] NULL: one run from 0, the whole tensor): whole cache lines, which a cold tensor
 * gives for one fetch each. Before the optimizer steps: the weights at the runs, one after
 * another, into out. */
void xray_runs_gather(int64_t m, const float *const *w, const int64_t *const *starts, const int64_t *runs,
                      const int64_t *len, float *out) {
    for (int64_t t = 0; t < m; t++) {
        const int64_t n = len[t];
        for (int64_t r = 0; r < runs[t]; r++) {
            memcpy(out, w[t] + (starts[t] == NULL ? 0 : starts[t][r]), sizeof(float) * (size_t)n);
            out += n;
        }
    }
}

/* ... and after it, at the same runs, per tensor into the [4, m] doubles `sums`: sum(g^2 /
 * max(v, eps2)) (v: Adam's second moment as the step left it), sum(g^2), sum((w - w0)^2) and
 * sum(w0^2), w0 what xray_runs_gather kept. The g^2 / v terms in float32 (the tensors' own
 * precision; a term's rounding is 2^-24 relative), every sum in double, in loops the compiler
 * vectorises. */
void xray_signals(int64_t m, const float *const *w, const float *const *g, const float *const *v,
                  const int64_t *const *starts, const int64_t *runs, const int64_t *len, const float *w0,
                  double eps2, double *sums) {
    const float floor_ = (float)eps2;
    for (int64_t t = 0; t < m; t++) {
        const int64_t n = len[t];
        double sr = 0.0, sg = 0.0, sd = 0.0, sw = 0.0;
        for (int64_t r = 0; r < runs[t]; r++) {
            const int64_t at = starts[t] == NULL ? 0 : starts[t][r];
            const float *wt = w[t] + at, *gt = g[t] + at, *vt = v[t] + at;
#pragma omp simd reduction(+ : sr, sg, sd, sw)
            for (int64_t j = 0; j < n; j++) {
                const float gj = gt[j], g2 = gj * gj, second = vt[j];
                const double before = w0[j], d = (double)wt[j] - before;
                sr += g2 / (second > floor_ ? second : floor_);
                sg += g2;
                sd += d * d;
                sw += before * before;
            }
            w0 += n;
        }
        sums[t] = sr;
        sums[m + t] = sg;
        sums[2 * m + t] = sd;
        sums[3 * m + t] = sw;
    }
}

int xray_nrow(void) { return NROW; }
