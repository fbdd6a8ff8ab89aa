"""The device engine's Triton kernels (the host side that launches them: :mod:`probes.engines.device`).

* ``_stats_kernel``: one program per chunk of ``CHUNK`` elements of one
  tensor. It writes the chunk's partial row (float64) into a workspace and
  adds the float codes of the histogram sample that falls in the chunk to the
  tensor's bin counters (``tl.histogram``, then one atomic add per non-empty
  bin). A batch of tensors is one launch; one tensor alone (an activation
  reduced in its hook) takes its description as arguments, so it costs one
  launch and no table upload. Windows of full blocks are read without a mask
  (``SPLIT``): a mask whose bound is computed in the kernel keeps every load
  scalar, unmasked they compile to one vector load per thread. A chunk's
  NaN or inf is found from its float32 sum and largest |x| (the larger of
  its max and -min), not from a flag and a running |x| max per element.
  The near-zero and zero counts are float32 lanes (exact below 2**24).
  Together: 17.5 instead of 33.5 SASS instructions per bf16 element in the
  loop on sm_90, 64 registers instead of 72 (``bench/roofline.py --sm90``).
* ``_units_kernel``: the dead units of an activation (units never above
  eps), tile by tile, one atomic max per unit and tile.
* ``_finalize_kernel``: one program per row: adds the chunks' partials,
  finishes min/max (NaN when a NaN was read, as torch's aminmax), the dead
  units' share and the extra columns, turns the bin counters into the row's
  histogram and clears the counters for the next step.
* ``_gather_kernel``: the update subsets of every weight (init, before and
  after the optimizer step) into one float32 buffer.

Every shape a kernel needs comes as a ``tl.constexpr`` argument from the host
side: a compiled kernel may read no global but a constexpr (POW4_SAFE and
POW4_TINY below). Triton runs CUDA tensors compiled, and CPU tensors in its
interpreter (the tests): the interpreter must be chosen before ``triton`` is
imported, so on a machine without CUDA this module sets
``TRITON_INTERPRET=1`` when it imports triton (only this engine, and only
when asked for, imports it).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: Triton's interpreter

import triton  # noqa: E402  (ImportError: the caller falls back to torch)
import triton.language as tl  # noqa: E402

INTERPRET = type(tl.sum).__name__ == "InterpretedFunction"
if not INTERPRET and not torch.cuda.is_available():
    raise ImportError("triton was imported before the device engine without TRITON_INTERPRET=1, and there is "
                      "no CUDA: set TRITON_INTERPRET=1 in the environment to run the device engine on the CPU")

POW4_SAFE = tl.constexpr(1e4)  # a constexpr: compiled kernels may read no other globals
POW4_TINY = tl.constexpr(1e-7)


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
    if m is None:  # a full block (``m`` a constexpr None): compiled without a mask
        v = tl.load(p)
    else:
        v = tl.load(p, mask=m, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _acc(v, m, c, eps, near_v, zero_v, mn_v, mx_v, s1v, s2v, s3v, s4v, sav, MASKED: tl.constexpr):
    """One block's elements ``v`` added to the per-lane accumulators. ``MASKED``: lanes where ``m``
    is false are past the chunk's end (and ``v`` is 0 there); unmasked, every lane counts, and the
    selects and the mask's compare are not even compiled in."""
    a = tl.abs(v)
    if MASKED:
        near_v += tl.where((a < eps) & m, 1.0, 0.0)
        zero_v += tl.where((v == 0.0) & m, 1.0, 0.0)
        mn_v = tl.minimum(mn_v, tl.where(m, v, float("inf")))
        mx_v = tl.maximum(mx_v, tl.where(m, v, float("-inf")))
        y = tl.where(m, v - c, 0.0)
    else:
        near_v += tl.where(a < eps, 1.0, 0.0)
        zero_v += tl.where(v == 0.0, 1.0, 0.0)
        mn_v = tl.minimum(mn_v, v)
        mx_v = tl.maximum(mx_v, v)
        y = v - c
    y2 = y * y
    s1v += y
    s2v += y2
    s3v += y2 * y
    s4v += y2 * y2
    sav += a
    return near_v, zero_v, mn_v, mx_v, s1v, s2v, s3v, s4v, sav


@triton.jit(do_not_specialize=["desc_at", "n_a", "d1_a", "d2_a", "s0_a", "s1_a", "s2_a", "contig_a", "off_a",
                               "step_a", "k_a", "part_a", "hist_a"])
def _stats_kernel(x_ptr, tab_ptr, part_ptr, hist_ptr, bins_ptr, desc_at,
                  n_a, d1_a, d2_a, s0_a, s1_a, s2_a, contig_a, off_a, step_a, k_a, part_a, hist_a, eps,
                  SINGLE: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                  FLUSH: tl.constexpr, SPLIT: tl.constexpr,
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
    # counts in float32: exact (a lane counts at most ITERS, a chunk at most CHUNK < 2**24 elements),
    # and a select and an add where an int32 count compiled to an add, a predicated move and a copy
    near_v = tl.zeros([BLOCK], tl.float32)
    zero_v = tl.zeros([BLOCK], tl.float32)
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
        wend = tl.minimum(w + FLUSH, nblk)
        if SPLIT and wend * BLOCK <= cnt:
            # every block of this window is full: loads without a mask (which would keep them
            # scalar: the mask's bound is computed, so the compiler cannot prove runs of lanes true)
            for b in range(w, wend):
                j = b * BLOCK + lane
                v = _load(x_ptr, delta, start, j, None, contig, d1, d2, s0, s1, s2, CONTIG)
                near_v, zero_v, mn_v, mx_v, s1v, s2v, s3v, s4v, sav = _acc(
                    v, None, c, eps, near_v, zero_v, mn_v, mx_v, s1v, s2v, s3v, s4v, sav,
                    MASKED=False)
        else:
            for b in range(w, wend):
                j = b * BLOCK + lane
                m = j < cnt
                v = _load(x_ptr, delta, start, j, m, contig, d1, d2, s0, s1, s2, CONTIG)  # 0 where masked
                near_v, zero_v, mn_v, mx_v, s1v, s2v, s3v, s4v, sav = _acc(
                    v, m, c, eps, near_v, zero_v, mn_v, mx_v, s1v, s2v, s3v, s4v, sav,
                    MASKED=True)
        p1 += tl.sum(s1v, 0).to(tl.float64)
        p2 += tl.sum(s2v, 0).to(tl.float64)
        p3 += tl.sum(s3v, 0).to(tl.float64)
        p4 += tl.sum(s4v, 0).to(tl.float64)
        pa += tl.sum(sav, 0).to(tl.float64)
    near = tl.sum(near_v, 0).to(tl.int64)
    zeros = tl.sum(zero_v, 0).to(tl.int64)
    lo = tl.min(mn_v, 0)
    hi = tl.max(mx_v, 0)
    amax = tl.maximum(hi, -lo)  # the largest |x| (a NaN's chunk is redone whatever this says)
    nans = zero
    pinf = zero
    ninf = zero
    # a NaN or an inf makes the float32 sum of x - c NaN or inf (c is finite, and finite values up to
    # POW4_SAFE cannot overflow it), so the sum, not a per-element flag, says the chunk held one
    if (amax > POW4_SAFE) | (tl.abs(p1) > 1.7976931348623157e308) | (p1 != p1) | ((amax < POW4_TINY) & (amax > 0)):
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
        mn = lo
        mx = hi
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
