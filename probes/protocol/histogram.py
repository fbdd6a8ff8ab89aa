"""The fixed-edge, signed, power-of-two histogram that every stream shares.

Edges are fixed for the life of the protocol, so histograms add up across
steps, ranks and shards. A bin is read straight from a float32's bits: the
exponent picks the octave and the top ``MANTISSA_BITS`` of the mantissa pick
one of ``BINS_PER_OCTAVE`` linear sub-bins, so the probe needs no
``bucketize`` (see DESIGN.md: ~7x cheaper than searching edges).

Bin layout, in value order (``M = MAG_BINS``)::

    0 .. M-1      negative values, largest magnitude first
    M             the zero bin: |x| < 2**EXP_LO (zeros, subnormals, tiny)
    M+1 .. 2M     positive values, smallest magnitude first

Magnitudes at or above ``2**EXP_HI`` land in the outermost bins (the
exact min/max of each sample says how far out they went). This module is
numpy-only so the viewer can use it without torch.
"""

from __future__ import annotations

import numpy as np

MANTISSA_BITS = 2
BINS_PER_OCTAVE = 1 << MANTISSA_BITS
EXP_LO = -40  # 2**-40 ~ 9.1e-13: smaller magnitudes count as zero
EXP_HI = 40  # 2**40 ~ 1.1e12: larger magnitudes saturate the outer bins
MAG_BINS = (EXP_HI - EXP_LO) * BINS_PER_OCTAVE
NUM_BINS = 2 * MAG_BINS + 1
ZERO_BIN = MAG_BINS
SPEC = f"exp2-m{MANTISSA_BITS}-e{EXP_LO}:{EXP_HI}"


def _magnitude_edges() -> np.ndarray:
    """Lower edges of the positive magnitude bins, plus the top edge."""
    octaves = np.arange(EXP_LO, EXP_HI, dtype=np.float64)
    steps = 1.0 + np.arange(BINS_PER_OCTAVE) / BINS_PER_OCTAVE
    lower = (np.exp2(octaves)[:, None] * steps[None, :]).reshape(-1)
    return np.append(lower, 2.0**EXP_HI)


_MAG = _magnitude_edges()
#: All ``NUM_BINS + 1`` edges in increasing order.
EDGES = np.concatenate([-_MAG[::-1], _MAG])


def bin_index(values: np.ndarray) -> np.ndarray:
    """Bin index of each finite value (numpy reference of the probe's kernel).

    Non-finite values get ``NUM_BINS`` (a bin that is never reported).
    """
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    bits = x.view(np.int32).astype(np.int64)
    exp = ((bits >> 23) & 0xFF) - 127
    mant = (bits >> (23 - MANTISSA_BITS)) & (BINS_PER_OCTAVE - 1)
    mag = np.clip((exp - EXP_LO) * BINS_PER_OCTAVE + mant, -1, MAG_BINS - 1)
    idx = np.where(mag < 0, ZERO_BIN, np.where(bits < 0, ZERO_BIN - 1 - mag, ZERO_BIN + 1 + mag))
    return np.where(np.isfinite(x), idx, NUM_BINS)


def histogram(values: np.ndarray) -> np.ndarray:
    """Counts per bin (length ``NUM_BINS``) of the finite values."""
    return np.bincount(bin_index(values), minlength=NUM_BINS + 1)[:NUM_BINS]


def trim(counts: np.ndarray) -> tuple[int, np.ndarray]:
    """The first non-empty bin and the run of counts up to the last one."""
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return 0, counts[:0]
    return int(nz[0]), counts[nz[0] : nz[-1] + 1]


def expand(lo: int, counts) -> np.ndarray:
    """Inverse of :func:`trim`: a full ``NUM_BINS`` count vector."""
    full = np.zeros(NUM_BINS, dtype=np.int64)
    c = np.asarray(counts, dtype=np.int64)
    full[lo : lo + c.size] = c
    return full


def edges_for(lo: int, n: int) -> np.ndarray:
    """The ``n + 1`` edges of the trimmed run starting at bin ``lo``."""
    return EDGES[lo : lo + n + 1]


def centers() -> np.ndarray:
    """A representative value per bin (midpoint; 0 for the zero bin)."""
    c = (EDGES[:-1] + EDGES[1:]) / 2
    c[ZERO_BIN] = 0.0
    return c


def rebin_linear(lo: int, counts, vmin: float, vmax: float, width: int) -> np.ndarray:
    """Spread a trimmed histogram over ``width`` equal columns on [vmin, vmax].

    Each bin's count goes to the column that holds the bin's midpoint, clipped
    to the range, which is what a sparkline needs.
    """
    counts = np.asarray(counts, dtype=np.float64)
    out = np.zeros(width, dtype=np.float64)
    if counts.size == 0 or width <= 0:
        return out
    mids = centers()[lo : lo + counts.size]
    if not (np.isfinite(vmin) and np.isfinite(vmax)) or vmax <= vmin:
        out[width // 2] = counts.sum()
        return out
    col = ((mids - vmin) / (vmax - vmin) * width).astype(np.int64)
    np.add.at(out, np.clip(col, 0, width - 1), counts)
    return out


def quantiles(lo: int, counts, qs, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Quantiles from a trimmed histogram, interpolated linearly in a bin and
    clamped to ``[vmin, vmax]`` (the tensor's exact min and max) when given.

    The true quantile lies in the bin found and in ``[vmin, vmax]``, so the
    error is at most one bin width: 1/BINS_PER_OCTAVE of the value relative
    (25%), and 2**EXP_LO absolute near zero. Clamping only moves a value
    towards the true one: a constant tensor gets its value exactly.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return np.full(len(qs), np.nan)
    cum = np.concatenate([[0.0], np.cumsum(counts)]) / total
    edges = edges_for(lo, counts.size)
    out = np.interp(np.asarray(qs, dtype=np.float64), cum, edges)
    lo_v = vmin if vmin is not None and np.isfinite(vmin) else -np.inf
    hi_v = vmax if vmax is not None and np.isfinite(vmax) else np.inf
    if lo_v <= hi_v:
        out = np.clip(out, lo_v, hi_v)
    return out
