"""The arithmetic of merging every rank's rows into the whole job's (rank -1), without torch.

Each rank packs its statistics rows (:mod:`probes.engines.layout`'s
layout) into flat buffers, one slot per (layer, kind) of a table fixed at
attach and equal on every rank (:class:`Merger`); the collectives of
:mod:`probes.distributed.job` combine the buffers, and rank 0 unpacks the
combined ones into the job's rows:

- a SUM buffer (float64) of the additive columns (counts, power sums,
  near-zero/zero/NaN/Inf counts, the update's reference sum of squares,
  histogram sizes), plus dead-unit fractions, presence, and the ranks whose
  histogram counts fell outside this round's window;
- a MAX buffer (float64) of max, -min, the distance from initialisation and
  the occupied histogram magnitudes;
- the histogram counts (int32, SUM: half the bytes of float64; exact below
  2**31 per bin), left out above ``MAX_HIST_BYTES``: after the first round
  only each slot's window, the bins the job occupied in the previous round
  plus a margin (the same on every rank, from the MAX buffer); a slot whose
  counts left its window on some rank goes again whole (exact whatever moved).

What is exact and what is not: counts, sums, power sums, min, max, the
histogram and the update ratio (sqrt of summed update sumsq over summed
reference sumsq) are exact merges. ``dead_units`` is the mean of the ranks'
fractions (the job's exact figure, units dead on every rank, needs per-unit
masks the rows do not carry); ``init_dist`` is the largest rank's; the
spectral figures and evaluation passes are not merged (each rank's own
stream has them).
"""

from __future__ import annotations

import math

import numpy as np

from probes.protocol import histogram, wire
from probes.engines.layout import COL, NCOL

#: Additive columns of a row, summed over ranks (a rank without the row adds zeros).
SUM_COLS = ("count", "sum", "sumsq", "abssum", "near_zero", "zeros", "nan", "posinf", "neginf",
            "sum3", "sum4", "ref_sumsq", "lora_sumsq")
# then: dead-unit fractions and how many ranks had one, ranks with the row, histogram sizes, and
# ranks whose counts fell outside this round's window (their slot's counts go again, whole)
_DEAD, _DEAD_N, _PRESENT, _HIST_N, _LOST = range(len(SUM_COLS), len(SUM_COLS) + 5)
#: Columns of a slot in the SUM buffer (float64).
SUM_HEAD = len(SUM_COLS) + 5
#: Columns of a slot in the MAX buffer: max, -min, init_dist, and the largest and (negated) smallest
#: magnitude (bins away from the zero bin) its non-zero histogram bins hold.
MAX_WIDTH = 5
#: Bins added on each side of the job's occupied range to make the next round's window (2 octaves).
WINDOW_MARGIN = 8
#: The per-rank vector, all-gathered.
VECTOR = ("step", "grad_norm", "nonfinite", "step_time", "fwd_time", "loss", "backlog")
#: Largest histogram buffer (bytes, all bins of every slot: the first round's, and the bound of any
#: round's) that is sent; a bigger table merges statistics only.
MAX_HIST_BYTES = 32 << 20

_SUM_IDX = [COL[c] for c in SUM_COLS]


class Merger:
    """The slot table of one job and the packing and unpacking of its buffers (see the module
    docstring). Every rank holds one built from the same keys, so the windows agree."""

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        self.keys = keys
        self.slot = {k: i for i, k in enumerate(keys)}
        self.hist = len(keys) * histogram.NUM_BINS * 4 <= MAX_HIST_BYTES  # the same on every rank
        self._window(None)

    def pack(self, meta, rows, hists, hist_n) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """This rank's buffers for one step's rows: statistics (float64, SUM), extremes
        (float64, MAX) and histogram counts (int32, SUM; None when histograms are off)."""
        n = len(self.keys)
        sums = np.zeros((n, SUM_HEAD))
        maxes = np.full((n, MAX_WIDTH), -math.inf)
        counts = np.zeros((n, histogram.NUM_BINS), dtype=np.int32) if self.hist else None
        if meta:
            self._pack(meta, rows, hists, hist_n, sums, maxes, counts)
        return sums, maxes, counts


    def windowed(self, counts: np.ndarray, sums: np.ndarray) -> np.ndarray:
        """This rank's counts inside the windows (flat int32), marking in ``sums`` the slots
        whose counts fell outside (those go again whole: :meth:`merge_counts`)."""
        flat, lost = self.cut(counts)
        sums[:, _LOST] = lost
        return flat

    def _pack(self, meta, rows, hists, hist_n, sums, maxes, counts) -> None:
        """This rank's rows into the slots (rows of layers outside the table are left out)."""
        idx = [(i, self.slot[m]) for i, m in enumerate(meta) if m in self.slot]
        if not idx:
            return
        src = np.fromiter((i for i, _ in idx), dtype=np.int64)
        dst = np.fromiter((j for _, j in idx), dtype=np.int64)
        r = rows[src]
        add = r[:, _SUM_IDX]
        # the extra columns are NaN where they do not apply: zeros add nothing
        add[:, -2:] = np.nan_to_num(add[:, -2:], nan=0.0)
        sums[dst, : len(SUM_COLS)] = add
        dead = r[:, COL["dead_units"]]
        known = ~np.isnan(dead)
        sums[dst, _DEAD] = np.where(known, dead, 0.0)
        sums[dst, _DEAD_N] = known
        sums[dst, _PRESENT] = 1.0
        sums[dst, _HIST_N] = np.asarray(hist_n, dtype=np.float64)[src]
        if counts is not None:
            counts[dst] = hists[src]
            occupied = hists[src] != 0
            z = histogram.ZERO_BIN  # both signs folded: column m-1 is magnitude m (bins z+m and z-m)
            fold = occupied[:, z + 1:] | occupied[:, z - 1::-1]
            has = fold.any(1)
            maxes[dst, 3] = np.where(has, histogram.MAG_BINS - fold[:, ::-1].argmax(1), -math.inf)
            maxes[dst, 4] = np.where(has, -(fold.argmax(1) + 1), -math.inf)
        # NaN (a tensor holding one, or an empty one) is neutral here; the NaN count restores it
        mx, mn, init = r[:, COL["max"]], r[:, COL["min"]], r[:, COL["init_dist"]]
        maxes[dst, 0] = np.where(np.isnan(mx), -math.inf, mx)
        maxes[dst, 1] = np.where(np.isnan(mn), -math.inf, -mn)
        maxes[dst, 2] = np.where(np.isnan(init), -math.inf, init)

    # -- histogram windows ------------------------------------------------
    # A slot's counts occupy a few dozen of the 641 bins. After the first round (all bins), each
    # round sends per slot only the zero bin and, on both signs, the magnitudes the job occupied
    # in the previous round plus a margin: the same window on every rank (it comes from the MAX
    # all-reduce). A rank whose counts fall outside says so in the SUM buffer; those slots' counts
    # then go again, whole, in one more all-reduce that every rank issues (each knows the same
    # slots from the SUM): exact, whatever moved.

    def _window(self, maxes) -> None:
        """Set the next round's windows from a round's all-reduced MAX buffer (None: all bins)."""
        n, z, nb = len(self.keys), histogram.ZERO_BIN, histogram.NUM_BINS
        base = np.arange(n) * nb
        if maxes is None or not self.hist:
            starts, widths = base, np.full(n, nb if self.hist else 0)
        else:
            occupied = np.isfinite(maxes[:, 3])
            hi = np.minimum(np.nan_to_num(maxes[:, 3], neginf=0) + WINDOW_MARGIN, histogram.MAG_BINS)
            lo = np.maximum(np.nan_to_num(-maxes[:, 4], posinf=1) - WINDOW_MARGIN, 1)
            side = np.where(occupied, hi - lo + 1, 0).astype(np.int64)
            # per slot: negative magnitudes hi..lo, the zero bin, positive magnitudes lo..hi
            starts = np.stack([base + z - hi, base + z, base + z + lo], 1).reshape(-1).astype(np.int64)
            widths = np.stack([side, np.ones(n, dtype=np.int64), side], 1).reshape(-1)
        widths = np.asarray(widths, dtype=np.int64)
        total = int(widths.sum())
        offsets = np.concatenate([[0], np.cumsum(widths)[:-1]])
        #: flat indices (into [n, NUM_BINS]) of the bins sent, and the slot of each
        self._win_idx = np.repeat(starts - offsets, widths) + np.arange(total)
        self._win_slot = self._win_idx // nb

    def cut(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This rank's counts inside the windows (flat int32), and per slot 1 where some fell outside."""
        flat = counts.reshape(-1)[self._win_idx]
        inside = np.bincount(self._win_slot, weights=flat, minlength=len(self.keys))
        return flat, (counts.sum(1) != inside).astype(np.float64)

    def merge_counts(self, flat, sums, counts, whole) -> tuple[np.ndarray, int]:
        """The job's counts [n, NUM_BINS] from the all-reduced windows; slots some rank lost go
        again whole through ``whole(this rank's counts of those slots)`` (an all-reduce).
        Returns (counts, bins sent again)."""
        merged = np.zeros(len(self.keys) * histogram.NUM_BINS, dtype=np.int32)
        merged[self._win_idx] = flat
        merged = merged.reshape(len(self.keys), histogram.NUM_BINS)
        lost = np.nonzero(sums[:, _LOST] > 0)[0]
        if len(lost):
            merged[lost] = whole(np.ascontiguousarray(counts[lost]))
        return merged, int(len(lost) * histogram.NUM_BINS)

    def merged_rows(self, merged):
        """Rank 0: the job's rows back in reduce.py's layout: (meta, rows [m, NCOL], hists, hist_n)."""
        sums, maxes, counts = merged
        present = np.nonzero(sums[:, _PRESENT] > 0)[0]
        m = len(present)
        rows = np.full((m, NCOL), math.nan)
        s, mx = sums[present], maxes[present]
        rows[:, _SUM_IDX] = s[:, : len(SUM_COLS)]
        bad = (rows[:, COL["count"]] == 0) | (rows[:, COL["nan"]] > 0)  # as one tensor holding a NaN, or none
        rows[:, COL["max"]] = np.where(bad | np.isinf(mx[:, 0]) & (mx[:, 0] < 0), math.nan, mx[:, 0])
        rows[:, COL["min"]] = np.where(bad | np.isinf(mx[:, 1]) & (mx[:, 1] < 0), math.nan, -mx[:, 1])
        rows[:, COL["init_dist"]] = np.where(np.isneginf(mx[:, 2]), math.nan, mx[:, 2])
        with np.errstate(invalid="ignore", divide="ignore"):
            rows[:, COL["dead_units"]] = np.where(s[:, _DEAD_N] > 0, s[:, _DEAD] / s[:, _DEAD_N], math.nan)
        ref = rows[:, COL["ref_sumsq"]]
        rows[:, COL["ref_sumsq"]] = np.where(ref > 0, ref, math.nan)
        hists = (counts[present].astype(np.int64) if counts is not None
                 else np.zeros((m, histogram.NUM_BINS), dtype=np.int64))
        hist_n = s[:, _HIST_N].astype(np.int64).tolist() if counts is not None else [0] * m
        meta = [self.keys[i] for i in present]
        return meta, rows, hists, hist_n

    def rank_stats(self, gathered) -> wire.RankStats:
        """The all-gathered per-rank vector as the wire carries it."""
        col = {name: gathered[:, i].tolist() for i, name in enumerate(VECTOR)}
        return wire.RankStats(grad_norm=col["grad_norm"], nonfinite=col["nonfinite"], step_time=col["step_time"],
                              fwd_time=col["fwd_time"], loss=col["loss"])
