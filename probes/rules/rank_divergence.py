"""``rank-divergence``: one rank's total gradient norm far from the other ranks'.

Every rank ships the same all-gathered list (``Step.rank_grad_norms``), so only
rank 0's step is judged (one alert, not one per rank); the alert names the
outlying rank. With two ranks both are "far from the other": the one further
from its own history is blamed (ties: the larger norm).
"""

from __future__ import annotations

import math

import numpy as np

from probes.protocol.wire import Alert
from probes.rules.base import Finding, StepContext, StepRule, StreamState, Where, median, tracked
from probes.rules.thresholds import ALL_LAYERS


class RankDivergence(StepRule):
    """``rank-divergence`` on each rank's (``(all)``, grad) stream, judged at rank 0's step."""

    id = "rank-divergence"

    def evaluate(self, ctx: StepContext, out: list[Alert]) -> None:
        step, engine = ctx.step, self.engine
        norms = step.rank_grad_norms
        c = engine.cfg(ALL_LAYERS)
        if not norms or len(norms) < 2 or step.rank != 0 or not c.on("rank-divergence"):
            return
        v = np.asarray(norms, dtype=float)
        off = np.zeros(len(v))
        for r in range(len(v)):
            others = np.delete(v, r)
            others = others[np.isfinite(others)]
            if not len(others):
                continue
            ref = float(np.median(others))
            if not math.isfinite(v[r]):
                off[r] = math.inf
            elif ref > 0 and v[r] > 0:
                off[r] = abs(math.log(v[r] / ref))
            elif v[r] != ref:
                off[r] = math.inf
        limit = math.log(c.rank_factor)
        suspects = [r for r in range(len(v)) if off[r] > limit]
        blamed = None
        if suspects:
            def own(r):
                st = engine.streams.get((ALL_LAYERS, "grad", r))
                med = median(st.series("l2"), c.explode_window, 1) if st else math.nan
                if not (math.isfinite(v[r]) and med > 0 and v[r] > 0):
                    return (math.inf, 0.0) if not math.isfinite(v[r]) else (0.0, v[r])
                return (abs(math.log(v[r] / med)), v[r])
            blamed = max(suspects, key=lambda r: (off[r], own(r)))
        for r in range(len(v)):
            st = engine.streams.setdefault((ALL_LAYERS, "grad", r), StreamState())
            bad = r == blamed
            if not bad and "rank-divergence" not in st.active and math.isfinite(v[r]):
                st.series("l2").append(float(v[r]))
            others = np.delete(v, r)
            ref = float(np.median(others[np.isfinite(others)])) if np.isfinite(others).any() else math.nan
            where = Where(ALL_LAYERS, "grad")

            def finding(r=r, ref=ref) -> Finding:
                return Finding(
                    "critical", v[r], c.rank_factor * ref,
                    f"rank {r}'s total gradient norm {v[r]:.3g} is far from the other ranks' "
                    f"{ref:.3g}: a corrupted gradient, a rank out of sync, or faulty hardware on it",
                )

            tracked(step, where, st, "rank-divergence", bad, c.rank_k, c.recover_k, finding, out, rank=r)
