"""What the viewer knows about a run, built from the message stream.

Pure Python and numpy (no Textual, no torch): the app, headless mode and the
tests share it. One :class:`RunState` is fed every decoded message with
:meth:`RunState.ingest` on one thread (the app's), keeps a ring buffer of
recent samples per stream, the latest sample per row and kind, the alerts,
and which alerts are active; the queries over them are in
:mod:`tui.state_views`, the merge of several ranks' samples in :mod:`tui.merge`.

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

from collections import deque
from dataclasses import dataclass, field

from probes.protocol import wire
from tui.drops import DropWatch, Episode
from tui.state_views import StateViews

#: The kinds of stream a layer can have, in the order the views list them.
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
class RunState(StateViews):
    """Everything the viewer shows about one run, across its ranks.

    This class is the store: :meth:`ingest` folds messages into its rings
    and tables. What the views read from them (a row's newest sample, a
    trend, a series, the alerts active at a step) is :class:`~tui.state_views.StateViews`.
    """

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
    #: torch.distributed: probes/distributed/job.py); the merged view shows them instead of merging here
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
    #: What this viewer lost when it fell behind: the ended episodes (tui/drops.py), oldest first.
    lost: list = field(default_factory=list)
    _drop_watch: DropWatch = field(default_factory=DropWatch)
    _lost_told: int = 0  # episodes :meth:`new_losses` has handed out

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
        self.lost += self._drop_watch.handle(msg)

    def new_losses(self) -> list[Episode]:
        """Drop episodes that ended since the last call (each handed out once), and the
        stream's end closes an open one (:attr:`finished`)."""
        self.lost += self._drop_watch.close() if self.finished else self._drop_watch.due()
        new, self._lost_told = self.lost[self._lost_told:], len(self.lost)
        return new

    @property
    def lost_steps(self) -> int:
        """Steps (sampled steps, without Scalars) this viewer lost over all ended episodes."""
        return sum(ep.steps for ep in self.lost)

    # -- the run as a whole -----------------------------------------------

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
    def last_step(self) -> int:
        """The run's last step as far as it is known: the newest sampled step, or the step an End
        names when it is later (a run of 120 steps sampled every 5 has its last sample at 115)."""
        return max(self.step, *(e.step for e in self.ended.values()), -1)

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

