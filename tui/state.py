"""What the viewer knows about a run, built from the message stream.

Pure Python and numpy (no Textual, no torch): the app, headless mode and the
tests share it. One :class:`RunState` is fed every decoded message with
:meth:`RunState.ingest` on one thread (the app's), keeps a ring buffer of
recent samples per stream, the latest sample per row and kind, the alerts,
and which alerts are active.

Memory is bounded whatever the run's size or length. Each stream (layer x
kind x rank) keeps its last ``stream_depth`` samples: ``depth`` (:data:`DEPTH`, 512:
as many as the probe's backlog sends on attach) while
``streams x depth`` fits in ``budget`` (131,072 samples), halved as more
streams appear, never below ``MIN_DEPTH`` (16). A decoded sample with a
realistic histogram (~220 bins) takes ~2.4 KB, so the history holds at most
~320 MB at the budget; alerts keep the newest ``max_alerts``, notes the
newest ``max_notes``. A 256-stream run keeps 512 samples per stream, a 300-stream
run 256; the
2,000-layer benchmark (8,000 streams) keeps 16.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from probes.protocol import wire

SEVERITY_RANK = {"ok": 0, "info": 1, "warning": 2, "critical": 3}
KINDS = ("weight", "grad", "act", "update")
#: The spectral message type, once probes.protocol.wire defines one (another issue's work).
_SPECTRAL = getattr(wire, "Spectral", None)
#: Samples a stream keeps while the memory budget allows: the probe's backlog
#: (probes.publish.publisher, ``backlog_steps``) sends its newest 512 sampled steps on attach.
DEPTH = 512
#: Fewest samples a stream keeps however many streams there are.
MIN_DEPTH = 16
#: steps of each run-level scalar (loss, lr, ...) kept per rank
SCALAR_DEPTH = 2048
#: distinct (rank, name) scalar streams kept; names beyond it (a runaway ``xr.log``) are dropped
MAX_SCALAR_STREAMS = 512


def merge_samples(samples: list[wire.Sample]) -> wire.Sample | None:
    """One sample from several ranks' samples of one stream (sufficient stats add).

    Counts, sums and histograms add, min/max take the extremes; the dead-unit
    fraction is averaged and the update ratio, distance from initialisation
    and LoRA shift take the worst (largest) rank.
    Fields added to :class:`~probes.protocol.wire.Sample` later add up when they are
    numbers (power sums, counts). Returns the single sample itself when there
    is one, None for none.
    """
    if not samples:
        return None
    if len(samples) == 1:
        return samples[0]
    with_hist = [s for s in samples if s.hist.size]
    lo = min((s.hist_lo for s in with_hist), default=0)
    hi = max((s.hist_lo + len(s.hist) for s in with_hist), default=lo)
    hist = np.zeros(hi - lo, dtype=np.int64)
    for s in with_hist:
        hist[s.hist_lo - lo : s.hist_lo - lo + s.hist.size] += s.hist
    hist_n = sum(s.hist_n for s in samples)
    first = samples[0]
    out = {}
    for name in wire.Sample.__struct_fields__:
        values = [getattr(s, name) for s in samples]
        if name in ("layer", "kind"):
            out[name] = values[0]
        elif name in ("min", "max"):
            # an empty rank's (an empty FSDP shard's) NaN says nothing; a NaN of a tensor holding one wins
            known = [v for s, v in zip(samples, values) if s.count]
            pick = min if name == "min" else max
            out[name] = math.nan if not known or any(math.isnan(v) for v in known) else pick(known)
        elif name == "hist_lo":
            out[name] = lo
        elif name == "hist_counts":
            out[name] = wire.encode_counts(hist, hist_n)
        elif name == "dead_units":
            known = [v for v in values if v is not None]
            out[name] = sum(known) / len(known) if known else None
        elif name in ("ratio", "init_dist", "lora_shift"):
            known = [v for v in values if v is not None]
            out[name] = max(known) if known else None
        elif all(isinstance(v, (int, float)) for v in values):
            out[name] = sum(values)
        else:
            out[name] = getattr(first, name)
    return wire.Sample(**out)


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


@dataclass
class Row:
    """One layer (module) of the table."""

    name: str
    type: str = ""
    params: list[str] = field(default_factory=list)
    act: bool = False
    adapter_of: str = ""  # a LoRA adapter's A or B: the base module it changes

    @property
    def depth(self) -> int:
        """Nesting depth of the module path (0 for top-level modules)."""
        return self.name.count(".")

    @property
    def main_param(self) -> str | None:
        """The parameter shown in the weight/grad columns: ``weight`` if any."""
        if "weight" in self.params:
            return "weight"
        return self.params[0] if self.params else None

    def stream(self, kind: str) -> str | None:
        """The stream (layer name in samples) behind a column of this row."""
        if kind == "act":
            return self.name if self.act else None
        p = self.main_param
        if p is None:
            return None
        return f"{self.name}.{p}" if self.name else p


@dataclass
class RunState:
    """Everything the viewer shows about one run, across its ranks."""

    depth: int = DEPTH
    budget: int = 131_072
    max_alerts: int = 10_000
    max_notes: int = 1_000
    run: str = ""
    hellos: dict = field(default_factory=dict)  # rank -> Hello
    rows: list[Row] = field(default_factory=list)
    step: int = -1
    # (layer, kind, rank) -> deque[(step, Sample)]; evaluation passes under (layer, kind, rank, "eval")
    history: dict = field(default_factory=dict)
    alerts: deque = field(default_factory=deque)
    active: dict = field(default_factory=dict)  # (rule, layer, kind, rank) -> Alert
    notes: deque = field(default_factory=deque)
    ended: dict = field(default_factory=dict)  # rank -> End
    #: layer -> its latest spectral figures. The place for the future ``Spectral``
    #: wire message (alpha, stable rank, ...); empty until the probe sends one.
    spectral: dict = field(default_factory=dict)
    #: (rank, name) -> deque[(step, value)]: the newest SCALAR_DEPTH steps of each Scalars name
    scalars: dict = field(default_factory=dict)
    #: rank -> {name: value}: the newest value of each scalar
    latest_scalars: dict = field(default_factory=dict)
    drops: int = 0
    samples_seen: int = 0
    #: rank 0 sends the whole job's samples (rank -1, merged over every rank of every node by
    #: torch.distributed: probes/job.py); the merged view shows them instead of merging here
    job: bool = False
    #: the whole job's newest per-rank numbers (wire.RankStats: step time, grad norm, loss...)
    job_ranks: object = None
    #: Alerts received in all (``alerts`` keeps the newest ``max_alerts`` of them).
    alerts_seen: int = 0
    _times: deque = field(default_factory=lambda: deque(maxlen=16))
    _row_index: dict = field(default_factory=dict)
    stream_depth: int = 0  # samples each stream keeps now (0: not yet set)
    _active_cache: tuple = (None, {})  # (key, active_at's answer)
    #: Keep :attr:`steps_recorded` (a replay's timeline); off for live runs, whose length is open.
    track_steps: bool = False
    #: Every training step of the lowest rank, in order, when ``track_steps``.
    steps_recorded: list = field(default_factory=list)

    def reset(self) -> None:
        """Forget everything (a new run of the same name replaced the old one)."""
        fresh = RunState(depth=self.depth, budget=self.budget, max_alerts=self.max_alerts,
                         max_notes=self.max_notes, track_steps=self.track_steps)
        self.__dict__.update(fresh.__dict__)

    def _new_stream(self, key) -> deque:
        """A ring for a new stream; shrinks every ring if the budget needs it."""
        if not self.stream_depth:
            self.stream_depth = self.depth
        n = len(self.history) + 1
        if n * self.stream_depth > self.budget and self.stream_depth > MIN_DEPTH:
            depth = self.stream_depth
            while n * depth > self.budget and depth > MIN_DEPTH:
                depth = max(depth // 2, MIN_DEPTH)
            self.stream_depth = depth
            # Rare (at most log2(depth / MIN_DEPTH) times a run): rebuild the rings.
            for k, old in self.history.items():
                self.history[k] = deque(old, maxlen=depth)
        buf = self.history[key] = deque(maxlen=self.stream_depth)
        return buf

    # -- ingest -----------------------------------------------------------

    def ingest(self, msg: wire.Message) -> None:
        """Fold one message into the state."""
        if isinstance(msg, wire.Hello):
            self.hellos[msg.rank] = msg
            self.run = msg.run
            if not self.rows or msg.rank == 0:
                self.rows = [Row(li.name, li.type, list(li.params), li.act, li.adapter_of) for li in msg.layers]
                self._row_index = {r.name: i for i, r in enumerate(self.rows)}
        elif isinstance(msg, wire.Step) and msg.phase != "train":
            # an evaluation pass: its own streams, so training columns, sparklines and plots never mix them
            for s in msg.samples:
                key = (s.layer, s.kind, msg.rank, msg.phase)
                buf = self.history.get(key)
                if buf is None:
                    buf = self._new_stream(key)
                buf.append((msg.step, s))
            self.samples_seen += len(msg.samples)
        elif isinstance(msg, wire.Step):
            if msg.rank == wire.JOB_RANK:
                self.job = True
                if msg.ranks is not None:
                    self.job_ranks = msg.ranks
            self.step = max(self.step, msg.step)
            self.drops = max(self.drops, msg.drops)
            if msg.rank == min(self.hellos, default=msg.rank):
                self._times.append((msg.step, msg.time))
                if self.track_steps and (not self.steps_recorded or msg.step > self.steps_recorded[-1]):
                    self.steps_recorded.append(msg.step)
            for s in msg.samples:
                key = (s.layer, s.kind, msg.rank)
                buf = self.history.get(key)
                if buf is None:
                    buf = self._new_stream(key)
                buf.append((msg.step, s))
            self.samples_seen += len(msg.samples)
        elif isinstance(msg, wire.Alert):
            if len(self.alerts) >= self.max_alerts:
                self.alerts.popleft()
            self.alerts.append(msg)
            self.alerts_seen += 1
            key = (msg.rule, msg.layer, msg.kind, msg.rank)
            if msg.severity == "info":
                self.active.pop(key, None)
            else:
                self.active[key] = msg
        elif isinstance(msg, wire.Note):
            if len(self.notes) >= self.max_notes:
                self.notes.popleft()
            self.notes.append(msg)
        elif isinstance(msg, wire.Scalars):
            latest = self.latest_scalars.setdefault(msg.rank, {})
            for name, value in msg.values.items():
                buf = self.scalars.get((msg.rank, name))
                if buf is None:
                    if len(self.scalars) >= MAX_SCALAR_STREAMS:
                        continue
                    buf = self.scalars[(msg.rank, name)] = deque(maxlen=SCALAR_DEPTH)
                buf.append((msg.step, value))
                latest[name] = value
        elif isinstance(msg, wire.End):
            self.ended[msg.rank] = msg
        elif _SPECTRAL is not None and isinstance(msg, _SPECTRAL):
            self.spectral[msg.layer] = msg

    # -- queries ----------------------------------------------------------

    @property
    def world_size(self) -> int:
        """Ranks the run has, as its hello says."""
        return max((h.world_size for h in self.hellos.values()), default=1)

    @property
    def finished(self) -> bool:
        """Every attached rank has sent its End."""
        return bool(self.hellos) and all(r in self.ended for r in self.hellos)

    def scalar(self, name: str, rank: int | None = None, until: int | None = None) -> float | None:
        """The newest value of scalar ``name`` (``rank=None``: from the lowest rank that sent it);
        ``until``: the newest at that step or before (a paused view, a replay's chosen step)."""
        ranks = [rank] if rank is not None else sorted(self.latest_scalars)
        for r in ranks:
            if until is not None:
                found = next((v for st, v in reversed(self.scalars.get((r, name), ())) if st <= until), None)
                if found is not None:
                    return found
                continue
            v = self.latest_scalars.get(r, {}).get(name)
            if v is not None:
                return v
        return None

    def scalar_series(self, name: str, rank: int = 0) -> list:
        """The (step, value) ring of one scalar of one rank, oldest first."""
        return list(self.scalars.get((rank, name), ()))

    @property
    def end_reason(self) -> str | None:
        """How the run ended once every rank sent its End: the first failed rank's
        reason, else ``stopped`` or ``finished``; None while it has not."""
        if not self.finished:
            return None
        ends = [self.ended[r] for r in sorted(self.ended)]
        failed = [e.reason for e in ends if e.reason not in ("finished", "stopped")]
        if failed:
            return failed[0]
        return "stopped" if any(e.reason == "stopped" for e in ends) else "finished"

    @property
    def steps_per_s(self) -> float | None:
        """Training speed from the probe's own clock (right for backlog too)."""
        if len(self._times) < 2:
            return None
        (s0, t0), (s1, t1) = self._times[0], self._times[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def row_of(self, layer: str) -> str:
        """The row (module path) that shows a stream or alert layer name."""
        if layer in self._row_index:
            return layer
        return layer.rpartition(".")[0]

    @property
    def ranks(self) -> list[int]:
        """Ranks that said hello, in order."""
        return sorted(self.hellos)

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

    def row_severity(self, row: Row) -> str:
        """Worst active alert on this row: ok, warning or critical."""
        worst = "ok"
        for (_, layer, _, _), alert in self.active.items():
            if self.row_of(layer) == row.name and SEVERITY_RANK[alert.severity] > SEVERITY_RANK[worst]:
                worst = alert.severity
        return worst

    def row_alerts(self, row: Row) -> list:
        """Active alerts on this row."""
        return [a for (_, layer, _, _), a in self.active.items() if self.row_of(layer) == row.name]
