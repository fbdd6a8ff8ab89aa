"""The device engine: a sampled step's statistics in a few Triton launches, no host reads.

On a GPU the cost of the probe is the number of launches and any host sync,
not the bytes (DESIGN.md, "The GPU engine"). Here each launch reads many
tensors in place through a table of their addresses (as apex's
multi_tensor_apply does): no concatenated copy, no copy of a non-contiguous
tensor (up to three strided dimensions after merging), any of float32,
bfloat16, float16 and float64 (read as float32, like the other engines).

The kernels (:mod:`probes.engines.device_kernels`) are launched from here:
``_stats_kernel`` per batch of tensors (or per activation), ``_units_kernel``
for dead units, one ``_finalize_kernel`` per step and device, and
``_gather_kernel`` for the update subsets.

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

Importing this module imports triton (see :mod:`probes.engines.device_kernels`).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from probes.protocol import histogram
from probes.engines.layout import CODE_BINS, CODE_SHIFT, NCOL, NUM_CODES
from probes.engines.transfer import _on, upload
from probes.engines.device_kernels import (INTERPRET, _finalize_kernel, _gather_kernel, _stats_kernel,
                                           _units_kernel)

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
#: Windows of FLUSH full blocks are read without a mask (vector loads); False masks every block, as the
#: kernel did before (bench/roofline.py's ``tail=0`` variant times the two side by side on a GPU).
SPLIT = True
HBLOCK = 1 << 16 if INTERPRET else 1024
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_NAN_BITS = int(np.array(math.nan, dtype=np.float64).view(np.int64))

#: Kernel launches so far (each a device op); tests count them.
launches = 0


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Every launch goes through here (the op-counting test wraps it)."""
    global launches
    launches += 1
    kernel[grid](*args, **kwargs)


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
        consts = dict(BLOCK=BLOCK, ITERS=ITERS, FLUSH=FLUSH, SPLIT=SPLIT, HBLOCK=HBLOCK, SHIFT=ws.shift,
                      NCODES=ws.ncodes, HW=HW, NP=NP, TW=TW)
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
