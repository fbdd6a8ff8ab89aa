"""Trend sparklines: one value per sampled step, drawn as eighth blocks.

Shared by the layer table (gradient norm and update ratio per layer) and the
header (loss and learning rate). Pure functions over lists of floats: no
Textual, no numpy call per cell, so a paint of every visible row stays cheap.
"""

from __future__ import annotations

import math

#: Eighth blocks; index 0 is the lowest non-empty level (a trend point is never blank). No full
#: block: the peak stays below the cell's top, so the trends of neighbouring rows do not merge.
LEVELS = "▁▂▃▄▅▆▇"
#: Drawn where a step's value is NaN or infinite: the one thing a trend must not hide.
BAD = "✖"
#: Where a point has no value at all (no update ratio yet, a gap): a dot on the floor.
MISSING = "·"


def log_scale(values: list[float]) -> bool:
    """Whether ``values`` are best read on a log axis: all positive and spanning 10x or more."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return False
    return max(finite) / min(finite) >= 10


def trend_line(values: list[float], width: int, *, log: bool | None = None) -> str:
    """The last ``width`` values as a sparkline of exactly ``width`` cells, newest on the right.

    Heights run from the window's minimum to its maximum (on a log axis when
    ``log``, by default when the values span a decade or more); a flat line
    sits at mid height. NaN/inf points show :data:`BAD`, missing ones
    (``None``) :data:`MISSING`; fewer values than cells leave the left blank.
    """
    if width <= 0:
        return ""
    vals = list(values)[-width:]
    if log is None:
        log = log_scale([v for v in vals if v is not None])
    tx = [None if v is None else (math.log10(v) if log and math.isfinite(v) and v > 0 else
                                  (v if not log else math.nan)) for v in vals]
    finite = [v for v in tx if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    span = hi - lo
    out = []
    for raw, v in zip(vals, tx):
        if raw is None:
            out.append(MISSING)
        elif not math.isfinite(raw):
            out.append(BAD)
        elif v is None or not math.isfinite(v):
            out.append(MISSING)  # a value <= 0 on a log axis
        elif span <= 0:
            out.append(LEVELS[3])
        else:
            out.append(LEVELS[min(int((v - lo) / span * len(LEVELS)), len(LEVELS) - 1)])
    return "".join(out).rjust(width)


def direction(values: list[float]) -> str:
    """``↑``, ``↓`` or ``→``: the newest value against the median of the window before it."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 4:
        return ""
    *before, last = finite
    before = sorted(before)
    mid = before[len(before) // 2]
    if mid == 0:
        return "→" if last == 0 else ("↑" if last > 0 else "↓")
    change = (last - mid) / abs(mid)
    return "↑" if change > 0.05 else "↓" if change < -0.05 else "→"
