"""The device engine: a sampled step's statistics in a few Triton launches, no host reads.

On a GPU the cost of the probe is the number of launches and any host sync,
not the bytes (DESIGN.md, "The GPU engine"). Here each launch reads many
tensors in place through a table of their addresses (as apex's
multi_tensor_apply does): no concatenated copy, no copy of a non-contiguous
tensor (up to three strided dimensions after merging), any of float32,
bfloat16, float16 and float64 (read as float32, like the other engines).

* ``_stats_kernel``: one program per chunk of ``CHUNK`` elements of one
  tensor. It writes the chunk's partial row (float64) into a workspace and
  adds the float codes of the histogram sample that falls in the chunk to the
  tensor's bin counters (``tl.histogram``, then one atomic add per non-empty
  bin). A batch of tensors is one launch; one tensor alone (an activation
  reduced in its hook) takes its description as arguments, so it costs one
  launch and no table upload.
* ``_units_kernel``: the dead units of an activation (units never above
  eps), tile by tile, one atomic max per unit and tile.
* ``_finalize_kernel``: one program per row: adds the chunks' partials,
  finishes min/max (NaN when a NaN was read, as torch's aminmax), the dead
  units' share and the extra columns, turns the bin counters into the row's
  histogram and clears the counters for the next step.
* ``_gather_kernel``: the update subsets of every weight (init, before and
  after the optimizer step) into one float32 buffer.

The sums follow the CPU kernel's precision: within a block of ``BLOCK``
elements the powers of ``y = x - c`` (``c`` the block's own mean) are summed
in float32 (a tree sum), and turned into sums of powers of x in float64;
blocks holding a NaN or an Inf, or whose largest |x| is outside
[POW4_TINY, POW4_SAFE], are summed in float64. Error bound, per block b and
power p: ``(p + log2(BLOCK) + 3) * 2**-24 * sum_i (|c_b| + |x_i - c_b|)**p``
(tests/test_device_engine.py checks against it).

Everything a step reduces goes into one workspace per device (reused, grown
only when a step needs more), the rows into one buffer, which
:mod:`probes.engines.reduce` copies to pinned host memory without blocking.

Triton runs CUDA tensors compiled, and CPU tensors in its interpreter (the
tests): the interpreter must be chosen before ``triton`` is imported, so on
a machine without CUDA this module sets ``TRITON_INTERPRET=1`` when it
imports triton (only this engine, and only when asked for, imports it).
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import torch

from probes.protocol import histogram
from probes.engines.reduce import _on, upload

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: Triton's interpreter

import triton  # noqa: E402  (ImportError: the caller falls back to torch)
import triton.language as tl  # noqa: E402

INTERPRET = type(tl.sum).__name__ == "InterpretedFunction"
if not INTERPRET and not torch.cuda.is_available():
    raise ImportError("triton was imported before the device engine without TRITON_INTERPRET=1, and there is "
                      "no CUDA: set TRITON_INTERPRET=1 in the environment to run the device engine on the CPU")

#: Partial columns per chunk: s1 s2 s3 s4 sabs min max near zeros nan posinf neginf.
NP = 12
#: Width of a tensor's bin counters (NUM_BINS bins, the non-finite bin, an unused lane).
HW = 1024
_DUMMY = HW - 1
NUM_BINS = histogram.NUM_BINS
#: Row-table columns: part start, chunks, counter row, units offset, units, count, 4 extra-column bit patterns.
RW = 10
#: Descriptor-table columns of a tensor in a batched launch.
TW = 13
#: Summation block: float32 within, float64 across. The interpreter runs numpy per op: larger blocks.
BLOCK = 1 << 16 if INTERPRET else 512
ITERS = 1 if INTERPRET else 64
#: Blocks whose float32 per-lane sums are added before they are folded into float64.
FLUSH = 1 if INTERPRET else 16
CHUNK = BLOCK * ITERS
HBLOCK = 1 << 16 if INTERPRET else 1024
POW4_SAFE = tl.constexpr(1e4)  # a constexpr: compiled kernels may read no other globals
POW4_TINY = tl.constexpr(1e-7)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_NAN_BITS = int(np.array(math.nan, dtype=np.float64).view(np.int64))

#: Kernel launches so far (each a device op); tests count them.
launches = 0


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Every launch goes through here (the op-counting test wraps it)."""
    global launches
    launches += 1
    kernel[grid](*args, **kwargs)


@triton.jit
def _load(x_ptr, delta, start, j, m, contig, d1, d2, s0, s1, s2, CONTIG: tl.constexpr):
    """Elements ``start + j`` of a tensor of up to three strided dimensions, as float32 (0 where masked).

    ``CONTIG``: every tensor of the launch is contiguous, so the 64-bit index arithmetic of strided
    reads is not even compiled in (it costs more instructions than the statistics themselves)."""
    if CONTIG:
        p = x_ptr + (delta + start) + j
    elif contig != 0:
        p = x_ptr + (delta + start) + j
    else:
        idx = start + j.to(tl.int64)
        r = idx // d2
        p = x_ptr + delta + (r // d1) * s0 + (r % d1) * s1 + (idx % d2) * s2
    return tl.load(p, mask=m, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["desc_at", "n_a", "d1_a", "d2_a", "s0_a", "s1_a", "s2_a", "contig_a", "off_a",
                               "step_a", "k_a", "part_a", "hist_a"])
def _stats_kernel(x_ptr, tab_ptr, part_ptr, hist_ptr, bins_ptr, desc_at,
                  n_a, d1_a, d2_a, s0_a, s1_a, s2_a, contig_a, off_a, step_a, k_a, part_a, hist_a, eps,
                  SINGLE: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                  FLUSH: tl.constexpr,
                  HBLOCK: tl.constexpr,
                  SHIFT: tl.constexpr, NCODES: tl.constexpr, HW: tl.constexpr, NP: tl.constexpr,
                  TW: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    zero = pid * 0
    if SINGLE:
        delta = zero
        chunk = pid
        n = n_a + zero
        d1 = d1_a + zero
        d2 = d2_a + zero
        s0 = s0_a + zero
        s1 = s1_a + zero
        s2 = s2_a + zero
        contig = contig_a + zero
        off = off_a + zero
        step = step_a + zero
        k = k_a + zero
        pslot = part_a + zero + chunk
        hrow = hist_a + zero
    else:
        t = tl.load(tab_ptr + 2 * pid)
        chunk = tl.load(tab_ptr + 2 * pid + 1)
        d = tab_ptr + desc_at + t * TW
        delta = tl.load(d)
        n = tl.load(d + 1)
        d1 = tl.load(d + 2)
        d2 = tl.load(d + 3)
        s0 = tl.load(d + 4)
        s1 = tl.load(d + 5)
        s2 = tl.load(d + 6)
        contig = tl.load(d + 7)
        off = tl.load(d + 8)
        step = tl.load(d + 9)
        k = tl.load(d + 10)
        pslot = tl.load(d + 11) + chunk
        hrow = tl.load(d + 12)
    start = chunk * (BLOCK * ITERS)
    cnt = (tl.minimum(start + BLOCK * ITERS, n) - start).to(tl.int32)  # this chunk's elements
    end = start + cnt
    lane = tl.arange(0, BLOCK)
    # The shift c: the mean of the chunk's first block (its finite elements). Powers of x - c keep
    # float32's precision where the values sit far from 0 (a LayerNorm weight near 1).
    m0 = lane < cnt
    v0 = _load(x_ptr, delta, start, lane, m0, contig, d1, d2, s0, s1, s2, CONTIG)
    f0 = m0 & (tl.abs(v0) <= 3.4028234663852886e38)  # finite (a NaN compares false)
    c = tl.sum(tl.where(f0, v0, 0.0), 0) / tl.maximum(tl.sum(f0.to(tl.int32), 0), 1).to(tl.float32)
    # Per-lane accumulators, reduced once per FLUSH blocks (sums) or once per chunk (the rest): a
    # block-wide reduction costs barriers, so the loop does none.
    near_v = tl.zeros([BLOCK], tl.int32)
    zero_v = tl.zeros([BLOCK], tl.int32)
    bad_v = tl.zeros([BLOCK], tl.int32)  # NaN, +-inf or |x| > POW4_SAFE: this chunk takes float64
    amax_v = tl.zeros([BLOCK], tl.float32)
    mn_v = tl.full([BLOCK], float("inf"), tl.float32)
    mx_v = tl.full([BLOCK], float("-inf"), tl.float32)
    p1 = tl.zeros([], tl.float64)
    p2 = tl.zeros([], tl.float64)
    p3 = tl.zeros([], tl.float64)
    p4 = tl.zeros([], tl.float64)
    pa = tl.zeros([], tl.float64)
    nblk = tl.cdiv(cnt, BLOCK)
    for w in range(0, nblk, FLUSH):
        s1v = tl.zeros([BLOCK], tl.float32)
        s2v = tl.zeros([BLOCK], tl.float32)
        s3v = tl.zeros([BLOCK], tl.float32)
        s4v = tl.zeros([BLOCK], tl.float32)
        sav = tl.zeros([BLOCK], tl.float32)
        for b in range(w, tl.minimum(w + FLUSH, nblk)):
            j = b * BLOCK + lane
            m = j < cnt
            v = _load(x_ptr, delta, start, j, m, contig, d1, d2, s0, s1, s2, CONTIG)  # 0 where masked
            a = tl.abs(v)
            near_v += ((a < eps) & m).to(tl.int32)
            zero_v += ((v == 0.0) & m).to(tl.int32)
            bad_v += ((a > POW4_SAFE) | (v != v)).to(tl.int32)
            amax_v = tl.maximum(amax_v, a)
            mn_v = tl.minimum(mn_v, tl.where(m, v, float("inf")))
            mx_v = tl.maximum(mx_v, tl.where(m, v, float("-inf")))
            y = tl.where(m, v - c, 0.0)
            y2 = y * y
            s1v += y
            s2v += y2
            s3v += y2 * y
            s4v += y2 * y2
            sav += a
        p1 += tl.sum(s1v, 0).to(tl.float64)
        p2 += tl.sum(s2v, 0).to(tl.float64)
        p3 += tl.sum(s3v, 0).to(tl.float64)
        p4 += tl.sum(s4v, 0).to(tl.float64)
        pa += tl.sum(sav, 0).to(tl.float64)
    near = tl.sum(near_v, 0).to(tl.int64)
    zeros = tl.sum(zero_v, 0).to(tl.int64)
    amax = tl.max(amax_v, 0)
    nans = zero
    pinf = zero
    ninf = zero
    if (tl.sum(bad_v, 0) > 0) | ((amax < POW4_TINY) & (amax > 0)):
        # rare: a non-finite value, or powers that float32 would overflow or flush: the chunk
        # again, in float64, with NaN-aware min/max and the non-finite counts
        q1 = tl.zeros([], tl.float64)
        q2 = tl.zeros([], tl.float64)
        q3 = tl.zeros([], tl.float64)
        q4 = tl.zeros([], tl.float64)
        qa = tl.zeros([], tl.float64)
        mn = tl.full([], float("inf"), tl.float32)
        mx = tl.full([], float("-inf"), tl.float32)
        for b in range(0, nblk):
            j = b * BLOCK + lane
            m = j < cnt
            v = _load(x_ptr, delta, start, j, m, contig, d1, d2, s0, s1, s2, CONTIG)
            a = tl.abs(v)
            big = a > 3.4028234663852886e38  # +-inf
            nans += tl.sum((v != v).to(tl.int64), 0)
            pinf += tl.sum((big & (v > 0)).to(tl.int64), 0)
            ninf += tl.sum((big & (v < 0)).to(tl.int64), 0)
            ok = m & (v == v)
            mn = tl.minimum(mn, tl.min(tl.where(ok, v, float("inf")), 0))
            mx = tl.maximum(mx, tl.max(tl.where(ok, v, float("-inf")), 0))
            dd = v.to(tl.float64)
            dd2 = dd * dd
            q1 += tl.sum(dd, 0)
            q2 += tl.sum(dd2, 0)
            q3 += tl.sum(dd2 * dd, 0)
            q4 += tl.sum(dd2 * dd2, 0)
            qa += tl.sum(tl.abs(dd), 0)
    else:
        # sums of powers of x - c turned into sums of powers of x (exact algebra, in float64)
        cd = c.to(tl.float64)
        nd = cnt.to(tl.float64)
        cd2 = cd * cd
        q1 = p1 + nd * cd
        q2 = p2 + 2 * cd * p1 + nd * cd2
        q3 = p3 + 3 * cd * p2 + 3 * cd2 * p1 + nd * cd2 * cd
        q4 = p4 + 4 * cd * p3 + 6 * cd2 * p2 + 4 * cd2 * cd * p1 + nd * cd2 * cd2
        qa = pa
        mn = tl.min(mn_v, 0)
        mx = tl.max(mx_v, 0)
    out = part_ptr + pslot * NP
    tl.store(out, q1)
    tl.store(out + 1, q2)
    tl.store(out + 2, q3)
    tl.store(out + 3, q4)
    tl.store(out + 4, qa)
    tl.store(out + 5, mn.to(tl.float64))
    tl.store(out + 6, mx.to(tl.float64))
    tl.store(out + 7, near.to(tl.float64))
    tl.store(out + 8, zeros.to(tl.float64))
    tl.store(out + 9, nans.to(tl.float64))
    tl.store(out + 10, pinf.to(tl.float64))
    tl.store(out + 11, ninf.to(tl.float64))
    # the histogram sample x[off + j*step], j < k, that falls in this chunk
    lo = start - off
    j_lo = tl.where(lo > 0, (tl.maximum(lo, 0) + step - 1) // step, 0)
    hi = end - off
    j_hi = tl.minimum(tl.where(hi > 0, (tl.maximum(hi, 0) + step - 1) // step, 0), k)
    lanes = tl.arange(0, HW)
    for jb in range(j_lo, j_hi, HBLOCK):
        j = jb + tl.arange(0, HBLOCK).to(tl.int64)
        mj = j < j_hi
        pos = off + j * step
        if CONTIG:
            addr = pos
        elif contig != 0:
            addr = pos
        else:
            r = pos // d2
            addr = (r // d1) * s0 + (r % d1) * s1 + (pos % d2) * s2
        v = tl.load(x_ptr + delta + addr, mask=mj, other=0.0).to(tl.float32)
        code = (v.to(tl.int32, bitcast=True) >> SHIFT) & (NCODES - 1)
        b = tl.load(bins_ptr + code, mask=mj, other=HW - 1)
        b = tl.where(mj, b, HW - 1)
        h = tl.histogram(b, HW)
        tl.atomic_add(hist_ptr + hrow * HW + lanes, h, mask=h > 0)


@triton.jit(do_not_specialize=["n", "d1", "d2", "s0", "s1", "s2", "contig", "cols", "rows", "uoff"])
def _units_kernel(x_ptr, alive_ptr, n, d1, d2, s0, s1, s2, contig, cols, rows, uoff, eps,
                  RB: tl.constexpr, CB: tl.constexpr, RITERS: tl.constexpr, CONTIG: tl.constexpr):
    pr = tl.program_id(0).to(tl.int64)
    pc = tl.program_id(1).to(tl.int64)
    c = pc * CB + tl.arange(0, CB).to(tl.int64)
    mc = c < cols
    seen = tl.zeros([RB, CB], tl.int32)  # reduced over rows once, after the loop
    for it in range(RITERS):
        r = pr * (RB * RITERS) + it * RB + tl.arange(0, RB).to(tl.int64)
        m = (r < rows)[:, None] & mc[None, :]
        idx = r[:, None] * cols + c[None, :]
        if CONTIG:
            addr = idx
        elif contig != 0:
            addr = idx
        else:
            q = idx // d2
            addr = (q // d1) * s0 + (q % d1) * s1 + (idx % d2) * s2
        v = tl.load(x_ptr + addr, mask=m, other=0.0).to(tl.float32)
        seen = tl.maximum(seen, ((tl.abs(v) > eps) & m).to(tl.int32))  # a NaN tops nothing
    acc = tl.max(seen, 0)
    tl.atomic_max(alive_ptr + uoff + c, acc, mask=mc & (acc > 0))


@triton.jit
def _finalize_kernel(rtab_ptr, part_ptr, hist_ptr, alive_ptr, out_ptr, NP: tl.constexpr, HW: tl.constexpr,
                     NBINS: tl.constexpr, NOUT: tl.constexpr, RW: tl.constexpr, CB: tl.constexpr,
                     UB: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    rt = rtab_ptr + r * RW
    p0 = tl.load(rt)
    nch = tl.load(rt + 1)
    hrow = tl.load(rt + 2)
    uoff = tl.load(rt + 3)
    cols = tl.load(rt + 4)
    n = tl.load(rt + 5)
    lane = tl.arange(0, 16)
    col = lane < NP
    acc = tl.zeros([16], tl.float64)  # sums of the partial columns (min and max: below)
    lo = tl.full([16], float("inf"), tl.float64)
    hi = tl.full([16], float("-inf"), tl.float64)
    for c0 in range(0, nch, CB):
        ci = c0 + tl.arange(0, CB).to(tl.int64)
        m = (ci < nch)[:, None] & col[None, :]
        blk = tl.load(part_ptr + (p0 + ci)[:, None] * NP + lane[None, :], mask=m, other=0.0)
        acc += tl.sum(blk, 0)
        lo = tl.minimum(lo, tl.min(tl.where(m, blk, float("inf")), 0))
        hi = tl.maximum(hi, tl.max(tl.where(m, blk, float("-inf")), 0))
    q1 = tl.sum(tl.where(lane == 0, acc, 0.0), 0)
    q2 = tl.sum(tl.where(lane == 1, acc, 0.0), 0)
    q3 = tl.sum(tl.where(lane == 2, acc, 0.0), 0)
    q4 = tl.sum(tl.where(lane == 3, acc, 0.0), 0)
    qa = tl.sum(tl.where(lane == 4, acc, 0.0), 0)
    mn = tl.min(tl.where(lane == 5, lo, float("inf")), 0)
    mx = tl.max(tl.where(lane == 6, hi, float("-inf")), 0)
    near = tl.sum(tl.where(lane == 7, acc, 0.0), 0)
    zeros = tl.sum(tl.where(lane == 8, acc, 0.0), 0)
    nans = tl.sum(tl.where(lane == 9, acc, 0.0), 0)
    pinf = tl.sum(tl.where(lane == 10, acc, 0.0), 0)
    ninf = tl.sum(tl.where(lane == 11, acc, 0.0), 0)
    nan = float("nan")
    o = out_ptr + r * NOUT
    tl.store(o, n.to(tl.float64))
    tl.store(o + 1, q1)
    tl.store(o + 2, q2)
    tl.store(o + 3, qa)
    tl.store(o + 4, tl.where((n == 0) | (nans > 0), nan, mn))
    tl.store(o + 5, tl.where((n == 0) | (nans > 0), nan, mx))
    tl.store(o + 6, near)
    tl.store(o + 7, zeros)
    tl.store(o + 8, nans)
    tl.store(o + 9, pinf)
    tl.store(o + 10, ninf)
    tl.store(o + 11, q3)
    tl.store(o + 12, q4)
    dead = tl.load(rt + 6).to(tl.float64, bitcast=True)
    if cols > 0:  # the share of units whose |x| never topped eps; the counters are cleared
        cnt = tl.zeros([], tl.float64)
        for u0 in range(0, cols, UB):
            u = u0 + tl.arange(0, UB).to(tl.int64)
            mu = u < cols
            alive = tl.load(alive_ptr + uoff + u, mask=mu, other=1)
            cnt += tl.sum(((alive == 0) & mu).to(tl.float64), 0)
            tl.store(alive_ptr + uoff + u, tl.zeros([UB], tl.int32), mask=mu)
        dead = cnt / cols.to(tl.float64)
    tl.store(o + 13, dead)
    tl.store(o + 14, tl.load(rt + 7).to(tl.float64, bitcast=True))
    tl.store(o + 15, tl.load(rt + 8).to(tl.float64, bitcast=True))
    tl.store(o + 16, tl.load(rt + 9).to(tl.float64, bitcast=True))
    lanes = tl.arange(0, HW)
    h = tl.load(hist_ptr + hrow * HW + lanes)
    tl.store(o + (NOUT - NBINS) + lanes, h.to(tl.float64), mask=lanes < NBINS)
    tl.store(hist_ptr + hrow * HW + lanes, tl.zeros([HW], tl.int32))


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, tab_ptr, out_ptr, GB: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    delta = tl.load(tab_ptr + s * 5)
    idelta = tl.load(tab_ptr + s * 5 + 1)
    count = tl.load(tab_ptr + s * 5 + 2)
    at = tl.load(tab_ptr + s * 5 + 3)
    has_idx = tl.load(tab_ptr + s * 5 + 4)
    for j0 in range(0, count, GB):
        j = j0 + tl.arange(0, GB).to(tl.int64)
        m = j < count
        if has_idx != 0:
            src = tl.load(idx_ptr + idelta + j, mask=m, other=0)
        else:
            src = j
        v = tl.load(x_ptr + delta + src, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + at + j, v, mask=m)


# -- host side -------------------------------------------------------------------------------


def shape_of(x: torch.Tensor) -> tuple[int, int, int, int, int, int, bool] | None:
    """``(d1, d2, s0, s1, s2, contiguous)`` of ``x`` seen as at most three strided dimensions, or
    None when it needs more (the caller then reads a contiguous copy)."""
    dims = [(s, st) for s, st in zip(x.shape, x.stride()) if s != 1]
    merged: list[list[int]] = []
    for s, st in dims:  # merge a dimension into the previous one when they are contiguous together
        if merged and merged[-1][1] == st * s:
            merged[-1] = [merged[-1][0] * s, st]
        else:
            merged.append([s, st])
    if not merged:
        return 1, 1, 0, 0, 1, True
    if len(merged) == 1 and merged[0][1] == 1:
        return 1, merged[0][0], 0, 0, 1, True
    if len(merged) > 3:
        return None
    while len(merged) < 3:
        merged.insert(0, [1, 0])
    (_, s0), (d1, s1), (d2, s2) = merged
    return d1, d2, s0, s1, s2, False


def _float_bits(v: float | None) -> int:
    return _NAN_BITS if v is None else int(np.array(v, dtype=np.float64).view(np.int64))


class _Arena:
    """A growing device buffer of ``width``-wide slots, handed out in order within a step."""

    def __init__(self, device: torch.device, dtype: torch.dtype, width: int, zeroed: bool) -> None:
        self.device, self.dtype, self.width, self.zeroed = device, dtype, width, zeroed
        self.buf = torch.empty(0, width, dtype=dtype, device=device)
        self.used = 0

    def take(self, n: int) -> int:
        """``n`` slots; their first index. Grows (with a copy of the used part) only when full."""
        if self.used + n > len(self.buf):
            size = max(2 * len(self.buf), self.used + n, 64)
            new = (torch.zeros if self.zeroed else torch.empty)(size, self.width, dtype=self.dtype, device=self.device)
            if self.used:
                new[: self.used].copy_(self.buf[: self.used])
            self.buf = new
        at, self.used = self.used, self.used + n
        return at


class Workspace:
    """One device's scratch for a step: chunk partials, bin counters, unit flags (kept between steps)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.part = _Arena(device, torch.float64, NP, zeroed=False)
        self.hist = _Arena(device, torch.int32, HW, zeroed=True)  # cleared by _finalize_kernel
        self.alive = _Arena(device, torch.int32, 1, zeroed=True)  # cleared by _finalize_kernel
        from probes.engines.reduce import CODE_BINS, CODE_SHIFT, NUM_CODES

        self.code_bins = upload(CODE_BINS, device, torch.int32)
        self.shift, self.ncodes = CODE_SHIFT, NUM_CODES

    def reset(self) -> None:
        self.part.used = self.hist.used = self.alive.used = 0


_free: dict[torch.device, list[Workspace]] = {}
_free_lock = threading.Lock()


def _acquire(device: torch.device) -> Workspace:
    with _free_lock:
        pool = _free.setdefault(device, [])
        ws = pool.pop() if pool else None
    if ws is None:
        ws = Workspace(device)
    ws.reset()
    return ws


def _release(ws: Workspace) -> None:
    with _free_lock:
        _free.setdefault(ws.device, []).append(ws)


class Item:
    """One tensor (or a piece of a flat buffer) to reduce: ``x`` from element ``offset``, ``n`` long."""

    __slots__ = ("x", "offset", "n", "plan", "units", "extras", "row")

    def __init__(self, x: torch.Tensor, plan: tuple[int, int, int], units: int = 0,
                 extras: dict[int, float] | None = None, offset: int = 0, n: int | None = None) -> None:
        self.x, self.plan, self.units, self.extras = x, plan, units, extras or {}
        self.offset, self.n = offset, x.numel() if n is None else n
        self.row = -1


def supported(x: torch.Tensor) -> bool:
    """Whether the engine reads ``x`` as it is (dtype)."""
    return x.dtype in DTYPES


class Rows:
    """The rows one Batch reduces on one device: launches as tensors come, one finalize at the end."""

    def __init__(self, device: torch.device, eps: float) -> None:
        self.device, self.eps = device, float(eps)
        self.ws = _acquire(device)
        self.table: list[list[int]] = []  # row-table entries (RW int64 each)
        self.tensor_extras: list[tuple[int, int, torch.Tensor]] = []  # (row, col, 0-d tensor)
        self.vector_extras: list[tuple[int, int, torch.Tensor]] = []  # (first row, col, vector)
        self._keep: list[torch.Tensor] = []  # copies read by launches still in flight
        self.dirty = False  # a launch failed: the workspace may hold stray counts

    def __len__(self) -> int:
        return len(self.table)

    def add(self, items: list[Item]) -> int:
        """Launch the reductions of ``items``; returns the index of the first one's row."""
        first = len(self.table)
        by_dtype: dict[torch.dtype, list[tuple[int, Item, tuple]]] = {}
        ws = self.ws
        for i, it in enumerate(items):
            x = it.x  # read in place: no detach (an op), no autograd op is ever run on it
            shape = shape_of(x) if it.offset == 0 and it.n == x.numel() else (1, it.n, 0, 0, 1, True)
            if shape is None:  # more than three strided dimensions: a contiguous copy
                x = x.contiguous()
                self._keep.append(x)
                shape = (1, it.n, 0, 0, 1, True)
            it.x, it.row = x, len(self.table)
            nchunks = -(-it.n // CHUNK)
            pstart = ws.part.take(nchunks)
            hrow = ws.hist.take(1)
            uoff = ws.alive.take(it.units) if it.units else 0
            extras = [_float_bits(it.extras.get(c)) for c in range(4)]
            self.table.append([pstart, nchunks, hrow, uoff, it.units, it.n, *extras])
            by_dtype.setdefault(x.dtype, []).append((i, it, shape))
        try:
            for group in by_dtype.values():
                self._launch_stats(group)
            for _, it, shape in (g for group in by_dtype.values() for g in group):
                if it.units and it.n:
                    self._launch_units(it, shape)
        except BaseException:
            # these rows are not finalized; launches that ran may have counted into the workspace's
            # counters, so it is not used again
            del self.table[first:]
            self.dirty = True
            raise
        return first

    def _launch_stats(self, group: list[tuple[int, Item, tuple]]) -> None:
        ws = self.ws
        consts = dict(BLOCK=BLOCK, ITERS=ITERS, FLUSH=FLUSH, HBLOCK=HBLOCK, SHIFT=ws.shift, NCODES=ws.ncodes, HW=HW, NP=NP, TW=TW)
        group = [g for g in group if g[1].n]
        if not group:
            return
        if len(group) == 1:
            i, it, (d1, d2, s0, s1, s2, contig) = group[0]
            row = self.table[it.row]
            off, step, k = it.plan
            x = it.x if it.offset == 0 else it.x.reshape(-1)[it.offset:]  # a view: no copy
            _launch(_stats_kernel, (row[1],), x, ws.code_bins, ws.part.buf, ws.hist.buf, ws.code_bins, 0,
                    it.n, d1, d2, s0, s1, s2, int(contig), off, step, k, row[0], row[2], self.eps, SINGLE=True,
                    CONTIG=bool(contig), **consts)
            return
        anchor = min(group, key=lambda g: g[1].x.data_ptr() + g[1].offset * g[1].x.element_size())[1]
        esize = anchor.x.element_size()
        a0 = anchor.x.data_ptr() + anchor.offset * esize
        descs, chunk_t, chunk_c = [], [], []
        for t, (_, it, (d1, d2, s0, s1, s2, contig)) in enumerate(group):
            diff = it.x.data_ptr() + it.offset * esize - a0
            if diff % esize:
                raise RuntimeError("a tensor's address is not a multiple of its element size")
            row = self.table[it.row]
            off, step, k = it.plan
            descs.append([diff // esize, it.n, d1, d2, s0, s1, s2, int(contig), off, step, k, row[0], row[2]])
            chunk_t.append(np.full(row[1], t, dtype=np.int64))
            chunk_c.append(np.arange(row[1], dtype=np.int64))
        chunks = np.stack([np.concatenate(chunk_t), np.concatenate(chunk_c)], 1).reshape(-1)
        host = np.concatenate([chunks, np.asarray(descs, dtype=np.int64).reshape(-1)])
        tab = upload(host, self.device)
        self._keep.append(tab)
        x = anchor.x if anchor.offset == 0 else anchor.x.reshape(-1)[anchor.offset:]
        _launch(_stats_kernel, (len(chunks) // 2,), x, tab, ws.part.buf, ws.hist.buf, ws.code_bins, len(chunks),
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, self.eps, SINGLE=False,
                CONTIG=all(shape[5] for _, _, shape in group), **consts)

    def _launch_units(self, it: Item, shape) -> None:
        d1, d2, s0, s1, s2, contig = shape
        cols = int(it.x.shape[-1])
        rows = it.n // cols
        rb, cb, ri = (256, 256, 4) if INTERPRET else (32, 128, 16)
        grid = (-(-rows // (rb * ri)), -(-cols // cb))
        uoff = self.table[it.row][3]
        _launch(_units_kernel, grid, it.x, self.ws.alive.buf, it.n, d1, d2, s0, s1, s2, int(contig), cols, rows,
                uoff, self.eps, RB=rb, CB=cb, RITERS=ri, CONTIG=bool(contig))

    def finalize(self) -> torch.Tensor:
        """All rows ``[n, NCOL + NUM_BINS]`` (float64, on the device): one launch, and the extra columns
        given as tensors written in a few ops. The workspace goes back to the pool."""
        from probes.engines.reduce import NCOL

        try:
            ws = self.ws
            out = torch.empty(len(self.table), NCOL + NUM_BINS, dtype=torch.float64, device=self.device)
            if self.table:
                rtab = upload(np.asarray(self.table, dtype=np.int64), self.device)
                _launch(_finalize_kernel, (len(self.table),), rtab, ws.part.buf, ws.hist.buf, ws.alive.buf, out,
                        NP=NP, HW=HW, NBINS=NUM_BINS, NOUT=NCOL + NUM_BINS, RW=RW, CB=1024 if INTERPRET else 256,
                        UB=1024)
            # 0-d tensors: one stack; (vector, index) elements: one gather per vector (the LoRA shifts)
            singles = [(r, c, v) for r, c, v in self.tensor_extras if not isinstance(v, tuple)]
            by_vector: dict[int, list] = {}
            for r, c, (vec, i) in (e for e in self.tensor_extras if isinstance(e[2], tuple)):
                by_vector.setdefault(id(vec), []).append((r, c, vec, i))
            if singles:
                rows, cols, vals = zip(*singles)
                index = upload(np.asarray([rows, cols], dtype=np.int64), self.device)
                out.index_put_((index[0], index[1]), torch.stack([_on(v, self.device) for v in vals]))
            for picks in by_vector.values():
                rows, cols, vecs, idx = zip(*picks)
                index = upload(np.asarray([rows, cols, idx], dtype=np.int64), self.device)
                out.index_put_((index[0], index[1]), vecs[0].to(torch.float64)[index[2]])
            for row, col, vec in self.vector_extras:
                out[row : row + len(vec), col] = vec
            return out
        except BaseException:
            self.dirty = True
            raise
        finally:
            self._keep.clear()
            if not self.dirty:
                _release(self.ws)
            self.ws = None  # type: ignore[assignment]


def gather(flats: list[torch.Tensor], indices: list[torch.Tensor | None]) -> torch.Tensor | None:
    """``torch.cat([f if i is None else f[i] ...])`` as float32 in one launch; None where the
    engine cannot (mixed dtypes or devices, non-contiguous weights: the caller uses torch)."""
    if not flats:
        return None
    device, dtype = flats[0].device, flats[0].dtype
    if any(f.device != device or f.dtype != dtype or not f.is_contiguous() or dtype not in DTYPES for f in flats):
        return None
    idx = [i for i in indices if i is not None]
    if any(i.dtype != torch.int64 or i.device != device for i in idx):
        return None
    counts = [f.numel() if i is None else i.numel() for f, i in zip(flats, indices)]
    out = torch.empty(sum(counts), dtype=torch.float32, device=device)
    if not out.numel():
        return out
    anchor = min(flats, key=lambda f: f.data_ptr())
    ianchor = min(idx, key=lambda i: i.data_ptr()) if idx else anchor.new_zeros(0, dtype=torch.int64)
    es = anchor.element_size()
    rows, at = [], 0
    for f, i, c in zip(flats, indices, counts):
        idelta = (i.data_ptr() - ianchor.data_ptr()) // 8 if i is not None else 0
        rows.append([(f.data_ptr() - anchor.data_ptr()) // es, idelta, c, at, int(i is not None)])
        at += c
    tab = upload(np.asarray(rows, dtype=np.int64), device)
    _launch(_gather_kernel, (len(rows),), anchor, ianchor, tab, out, GB=1 << 14 if INTERPRET else 1024)
    return out
