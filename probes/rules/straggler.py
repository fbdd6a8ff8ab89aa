"""``straggler``: one rank's step time well above the other ranks' median.

Judged on the whole job's Step only (``rank`` -1, built by
:mod:`probes.distributed.job` from every rank's times). The data + forward time
is judged when every rank has one: in a job whose backward all-reduces
gradients (DDP, FSDP) the fast ranks wait there for the slow one, so
whole-step times even out while data + forward times still tell them apart;
else the wall time per step. The alert names the rank and its host.
"""

from __future__ import annotations

import math

import numpy as np

from probes.protocol.wire import Alert
from probes.rules.base import Finding, StepContext, StepRule, StreamState, Where, tracked
from probes.rules.thresholds import ALL_LAYERS


class Straggler(StepRule):
    """``straggler`` on each rank's (``(all)``, straggler) stream."""

    id = "straggler"

    def evaluate(self, ctx: StepContext, out: list[Alert]) -> None:
        step, engine = ctx.step, self.engine
        ranks = step.ranks
        c = engine.cfg(ALL_LAYERS)
        if ranks is None or step.rank != -1 or not c.on("straggler"):
            return
        fwd = np.asarray(ranks.fwd_time, dtype=float)
        use_fwd = len(fwd) >= 2 and bool(np.isfinite(fwd).all())
        v = fwd if use_fwd else np.asarray(ranks.step_time, dtype=float)
        if len(v) < 2:
            return
        what = "data + forward time" if use_fwd else "time per step"
        for r in range(len(v)):
            others = np.delete(v, r)
            others = others[np.isfinite(others)]
            ref = float(np.median(others)) if len(others) else math.nan
            bad = bool(math.isfinite(v[r]) and math.isfinite(ref)
                       and v[r] > c.straggler_factor * ref and v[r] - ref >= c.straggler_min_s)
            st = engine.streams.setdefault((ALL_LAYERS, "straggler", r), StreamState())
            where = Where(ALL_LAYERS, "scalar")
            host = engine.hosts[r] if r < len(engine.hosts) else "?"

            def finding(r=r, ref=ref, host=host) -> Finding:
                return Finding(
                    "warning", v[r], c.straggler_factor * ref,
                    f"rank {r} on {host} is a straggler: its {what} {v[r]:.3g} s is "
                    f"{v[r] / ref:.1f}x the other ranks' median {ref:.3g} s; the job runs at its pace "
                    "(a slow or throttled GPU, data loading or another process on that host)",
                )

            tracked(step, where, st, "straggler", bad, c.straggler_k, c.recover_k, finding, out, rank=r)
