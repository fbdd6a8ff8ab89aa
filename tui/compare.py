"""Two recordings side by side (`xray-tui replay A.xray --vs B.xray`): torch-free.

The question seeds ask is "how did the weights shift between these two runs
(or checkpoints)". :mod:`probes.inspect.compare` answers it offline from the weights
themselves, but it needs torch; the viewer never imports torch, so this
module answers it from what two recordings hold: per layer the norms and
update ratios of each run at the same step, their relative difference (as
probes.inspect.compare's relative change, on norms), and how far apart the two
weight histograms are (the share of elements that would have to move bins
to turn one into the other, the total variation distance).
"""

from __future__ import annotations

import math

import numpy as np

from probes.protocol import stats, wire
from tui.state import RunState

#: Samples per stream the second run keeps (the same budget as any view).
COMPARE_DEPTH = 4096


def load_state(path: str) -> RunState:
    """A :class:`RunState` with the whole recording at ``path`` read in (within its memory budget)."""
    state = RunState(depth=COMPARE_DEPTH, track_steps=True)
    for batch, _pending in wire.iter_file(path):
        for msg in batch:
            state.ingest(msg)
    return state


def rel_change(a: float | None, b: float | None) -> float | None:
    """``(b - a) / |a|``: B against A (None when either is missing, NaN when not finite)."""
    if a is None or b is None:
        return None
    if not (math.isfinite(a) and math.isfinite(b)) or a == 0:
        return math.nan if a != b else 0.0
    return (b - a) / abs(a)


def hist_distance(a: wire.Sample | None, b: wire.Sample | None) -> float | None:
    """Total variation distance of two samples' histograms on the shared fixed bins, 0..1.

    0: the same distribution (whatever the sample sizes); 1: no bin in
    common. The fixed log bins make this a shape-and-scale comparison.
    """
    if a is None or b is None or not a.hist.size or not b.hist.size:
        return None
    lo = min(a.hist_lo, b.hist_lo)
    hi = max(a.hist_lo + a.hist.size, b.hist_lo + b.hist.size)
    pa, pb = np.zeros(hi - lo), np.zeros(hi - lo)
    pa[a.hist_lo - lo : a.hist_lo - lo + a.hist.size] = a.hist
    pb[b.hist_lo - lo : b.hist_lo - lo + b.hist.size] = b.hist
    sa, sb = pa.sum(), pb.sum()
    if sa <= 0 or sb <= 0:
        return None
    return float(0.5 * np.abs(pa / sa - pb / sb).sum())


def norm(s: wire.Sample | None) -> float | None:
    """The sample's L2 norm (None for no sample)."""
    return stats.l2(s) if s is not None else None


def pct(v: float | None) -> str:
    """``+12%``, ``-3.4%``, ``0%``; ``—`` for none, ``nan`` for not finite."""
    if v is None:
        return "—"
    if not math.isfinite(v):
        return "nan"
    p = v * 100
    if abs(p) >= 99_999.5:
        return f"{p:+.0e}%".replace("e+0", "e")
    if abs(p) >= 9.95:
        return f"{p:+.0f}%"
    return f"{p:+.1f}%" if abs(p) >= 0.05 else "0%"
