"""Statistics derived from a :class:`~probes.protocol.wire.Sample`'s sufficient statistics.

Numpy-only: used by the probe's rules, the viewer and the exporter alike.
Definitions follow DESIGN.md: std is the population standard deviation
(numpy's default ``ddof=0``), l2 is the Euclidean norm, near-zero counts
``|x| < eps``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from probes.protocol import histogram
from probes.protocol.wire import Sample


def _nan_on_error(fn):
    """Derived statistics of absurd sums (from an untrusted peer, or overflow
    in float64) are NaN, never an exception in the viewer."""

    @functools.wraps(fn)
    def safe(s: Sample) -> float:
        try:
            return fn(s)
        except (ArithmeticError, ValueError):
            return math.nan

    return safe


@_nan_on_error
def mean(s: Sample) -> float:
    """Arithmetic mean (NaN if the tensor held a NaN or both infinities)."""
    return s.sum / s.count if s.count else math.nan


@_nan_on_error
def std(s: Sample) -> float:
    """Population standard deviation."""
    if not s.count:
        return math.nan
    m = s.sum / s.count
    var = s.sumsq / s.count - m * m
    if math.isnan(var):
        return math.nan
    return math.sqrt(max(var, 0.0))


@_nan_on_error
def l2(s: Sample) -> float:
    """Euclidean norm."""
    return math.sqrt(s.sumsq) if s.sumsq >= 0 else math.nan


@_nan_on_error
def rms(s: Sample) -> float:
    """Root mean square."""
    return math.sqrt(s.sumsq / s.count) if s.count else math.nan


@_nan_on_error
def absmax(s: Sample) -> float:
    """Largest magnitude among the finite elements (inf counts apart)."""
    return max(abs(s.min), abs(s.max)) if s.count else math.nan


def fraction(n: int, s: Sample) -> float:
    """``n`` as a share of the sample's elements."""
    return n / s.count if s.count else math.nan


def _raw_moments(s: Sample) -> tuple[float, float, float, float]:
    """Mean, variance and the third and fourth raw moments (E[x^3], E[x^4])."""
    if not s.count:
        raise ZeroDivisionError("empty sample")
    n, m = s.count, s.sum / s.count
    var = s.sumsq / n - m * m
    if not var > 0:
        raise ZeroDivisionError("no spread")
    return m, var, s.sum3 / n, s.sum4 / n


@_nan_on_error
def skewness(s: Sample) -> float:
    """Population skewness E[(x-m)^3] / std^3 (NaN for a constant tensor)."""
    m, var, e3, _ = _raw_moments(s)
    return (e3 - 3 * m * var - m**3) / var**1.5


@_nan_on_error
def kurtosis(s: Sample) -> float:
    """Excess kurtosis E[(x-m)^4] / std^4 - 3 (0 for a normal distribution)."""
    m, var, e3, e4 = _raw_moments(s)
    e2 = var + m * m
    return (e4 - 4 * m * e3 + 6 * m * m * e2 - 3 * m**4) / var**2 - 3.0


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def quantiles(s: Sample) -> dict[str, float]:
    """p05/p25/median/p75/p95 from the histogram (within one bin, see probes.protocol.histogram),
    clamped to the sample's exact [min, max]."""
    values = histogram.quantiles(s.hist_lo, s.hist, QUANTILES, s.min, s.max)
    return dict(zip(("p05", "p25", "median", "p75", "p95"), (float(v) for v in values)))


def nonfinite(s: Sample) -> int:
    """NaN plus infinite elements."""
    return s.nan + s.posinf + s.neginf


def hist_edges(s: Sample) -> np.ndarray:
    """Edges of the sample's trimmed histogram run."""
    return histogram.edges_for(s.hist_lo, len(s.hist))


def export_dict(s: Sample, step: int, rank: int, phase: str = "train") -> dict:
    """The documented export JSONL object for one sample (``phase``: its Step's)."""
    return {
        "type": "sample",
        "step": step,
        "rank": rank,
        "phase": phase,
        "layer": s.layer,
        "kind": s.kind,
        "count": s.count,
        "mean": mean(s),
        "std": std(s),
        "min": s.min,
        "max": s.max,
        "absmax": absmax(s),
        "l1": s.abssum / s.count if s.count else math.nan,
        "l2": l2(s),
        "rms": rms(s),
        "skewness": skewness(s),
        "kurtosis": kurtosis(s),
        **quantiles(s),
        "near_zero": fraction(s.near_zero, s),
        "zeros": fraction(s.zeros, s),
        "nan": s.nan,
        "inf": s.posinf + s.neginf,
        "dead_units": s.dead_units,
        "ratio": s.ratio,
        "init_dist": s.init_dist,
        "lora_shift": s.lora_shift,
        "hist": {"edges": hist_edges(s).tolist(), "counts": s.hist.tolist(), "sampled": s.hist_n},
    }
