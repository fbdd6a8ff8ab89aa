"""What the views read from a :class:`~tui.state.RunState`: per-row samples, trends, series and alerts.

A mixin of ``RunState``: the store (:mod:`tui.state`) only appends to its
rings on ingest; everything here derives from them on request, for the
table, the detail screen and the alerts pane. ``rank=None`` asks for the
merged view of every rank (:func:`tui.merge.merge_samples`), ``until`` for
the run as it stood at a step (a paused view, a replay's chosen step).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from probes.protocol import wire
from tui.merge import merge_samples

if TYPE_CHECKING:  # the store imports this module: Row is named only for the annotations
    from tui.state import Row

#: Alert severities in increasing order of urgency (a row shows its worst active one).
SEVERITY_RANK = {"ok": 0, "info": 1, "warning": 2, "critical": 3}


def _newest(buf, until: int | None) -> wire.Sample | None:
    """The last sample of a ring of (step, Sample), or the last at step ``until`` or before."""
    if not buf:
        return None
    if until is None:
        return buf[-1][1]
    for step, sample in reversed(buf):
        if step <= until:
            return sample
    return None


def _last(buf, n: int, until: int | None) -> list:
    """The newest ``n`` (step, Sample) of a ring at step ``until`` or before, oldest first."""
    if not buf:
        return []
    out = []
    for item in reversed(buf):
        if until is not None and item[0] > until:
            continue
        out.append(item)
        if len(out) >= n:
            break
    out.reverse()
    return out


def _ratio(s: wire.Sample) -> float | None:
    return s.ratio  # None: no optimizer step yet (a gap, not a NaN)


def _norm(s: wire.Sample) -> float:
    # a tensor holding NaN/inf has no norm worth drawing: NaN marks the point
    return math.sqrt(s.sumsq) if s.sumsq >= 0 and not (s.nan or s.posinf or s.neginf) else math.nan


#: What the table's trend columns plot per kind, and how the merged view combines ranks.
_TREND_VALUE = {"grad": _norm, "update": _ratio}
_TREND_COMBINE = {"grad": lambda v: math.sqrt(sum(x * x for x in v)),
                  "update": lambda v: max((x for x in v if x is not None), default=None)}


class StateViews:
    """Queries over a RunState's rings; needs its ``history``, ``hellos``, ``job``, ``alerts``,
    ``alerts_seen``, ``active`` and ``row_of``."""

    def latest(self, row: Row, kind: str, rank: int | None = 0, until: int | None = None) -> wire.Sample | None:
        """The newest sample of a row's column, or None.

        ``rank=None`` merges every rank's newest sample (the merged view);
        ``until`` takes the newest of step ``until`` or before (a paused view).
        """
        stream = row.stream(kind)
        if stream is None:
            return None
        if rank is None and self.job:
            rank = wire.JOB_RANK  # the whole job, merged by the probe across nodes
        if rank is None:
            if len(self.hellos) <= 1:
                rank = next(iter(self.hellos), 0)
            else:
                found = (_newest(self.history.get((stream, kind, r)), until) for r in self.hellos)
                return merge_samples([s for s in found if s is not None])
        return _newest(self.history.get((stream, kind, rank)), until)

    def trend(self, row: Row, kind: str, n: int, rank: int | None = 0, until: int | None = None) -> list:
        """The newest ``n`` values of a row's trend quantity, oldest first.

        ``grad``: the gradient's L2 norm; ``update``: the update ratio
        ‖ΔW‖/‖W‖ (None where a sample has none). Read straight from the
        stream's ring (the last ``n`` entries only, so a paint costs O(n) per
        visible row, never O(ring)); ``until`` stops at that step (pause,
        replay). ``rank=None`` with several ranks combines the ranks per
        step as the merged view's sample would: norms add in quadrature,
        ratios take the worst rank.
        """
        stream = row.stream(kind)
        if stream is None or n <= 0:
            return []
        value = _TREND_VALUE[kind]
        if rank is not None or len(self.hellos) <= 1:
            r = rank if rank is not None else next(iter(self.hellos), 0)
            return [value(s) for _, s in _last(self.history.get((stream, kind, r)), n, until)]
        per_step: dict[int, list[float]] = {}
        for r in self.hellos:
            for step, s in _last(self.history.get((stream, kind, r)), n, until):
                per_step.setdefault(step, []).append(value(s))
        combine = _TREND_COMBINE[kind]
        return [combine(v) for _, v in sorted(per_step.items())[-n:]]

    def series(self, layer: str, kind: str, rank: int | None = 0) -> list:
        """The ring buffer of (step, Sample) of one stream, oldest first.

        ``rank=None`` merges the ranks step by step (steps every rank has).
        """
        if rank is None and self.job:
            rank = wire.JOB_RANK
        if rank is None:
            if len(self.hellos) <= 1:
                rank = next(iter(self.hellos), 0)
            else:
                by_step: dict[int, list] = {}
                for r in self.hellos:
                    for step, s in self.history.get((layer, kind, r), ()):
                        by_step.setdefault(step, []).append(s)
                n = len(self.hellos)
                return [(st, merge_samples(v)) for st, v in sorted(by_step.items()) if len(v) == n]
        return list(self.history.get((layer, kind, rank), ()))

    def eval_series(self, layer: str, kind: str = "act", rank: int | None = 0) -> list:
        """The (step, Sample) ring of a stream's evaluation passes, oldest first
        (``step``: training steps done when the pass ran). ``rank=None``: the
        first rank's."""
        if rank is None:
            rank = min(self.hellos, default=0)
        return list(self.history.get((layer, kind, rank, "eval"), ()))

    def oldest_full_step(self) -> int | None:
        """The first step from which every training stream still has its samples (None: no data).

        A replay longer than the rings hold cannot show the steps before it:
        seeking stops there rather than drawing rows without data.
        """
        firsts = [buf[0][0] for key, buf in self.history.items() if len(key) == 3 and buf]
        return max(firsts) if firsts else None

    def active_at(self, step: int) -> dict:
        """The active alerts as they stood at ``step``: the alerts kept, replayed up to it.

        What ``active`` was then, for a replay's chosen step (alerts older
        than the ``max_alerts`` kept are not known). Cached per step and
        alert count: a replay asks once per paint.
        """
        key = (step, self.alerts_seen, id(self.alerts))
        if self._active_cache[0] == key:
            return self._active_cache[1]
        active: dict = {}
        for a in self.alerts:
            if a.step > step:
                continue
            k = (a.rule, a.layer, a.kind, a.rank)
            if a.severity == "info":
                active.pop(k, None)
            else:
                active[k] = a
        self._active_cache = (key, active)
        return active

    def stream_alerts(self, row: Row) -> list:
        """Every alert (active or past, newest first) whose layer is this row."""
        return [a for a in reversed(self.alerts) if self.row_of(a.layer) == row.name]
