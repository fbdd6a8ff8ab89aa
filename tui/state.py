"""What the viewer knows about a run, built from the message stream.

Pure Python and numpy (no Textual, no torch): the app, headless mode and the
tests share it. One :class:`RunState` is fed every decoded message with
:meth:`RunState.ingest` on one thread (the app's), keeps a ring buffer of
recent samples per stream (``depth`` samples), the latest sample per row and
kind, the alerts, and which alerts are active.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from probes import wire

SEVERITY_RANK = {"ok": 0, "info": 1, "warning": 2, "critical": 3}
KINDS = ("weight", "grad", "act", "update")


@dataclass
class Row:
    """One layer (module) of the table."""

    name: str
    type: str = ""
    params: list[str] = field(default_factory=list)
    act: bool = False

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

    depth: int = 256
    max_alerts: int = 10_000
    run: str = ""
    hellos: dict = field(default_factory=dict)  # rank -> Hello
    rows: list[Row] = field(default_factory=list)
    step: int = -1
    history: dict = field(default_factory=dict)  # (layer, kind, rank) -> deque[(step, Sample)]
    alerts: deque = field(default_factory=deque)
    active: dict = field(default_factory=dict)  # (rule, layer, kind, rank) -> Alert
    notes: list = field(default_factory=list)
    ended: dict = field(default_factory=dict)  # rank -> End
    drops: int = 0
    samples_seen: int = 0
    _times: deque = field(default_factory=lambda: deque(maxlen=16))
    _row_index: dict = field(default_factory=dict)

    # -- ingest -----------------------------------------------------------

    def ingest(self, msg: wire.Message) -> None:
        """Fold one message into the state."""
        if isinstance(msg, wire.Hello):
            self.hellos[msg.rank] = msg
            self.run = msg.run
            if not self.rows or msg.rank == 0:
                self.rows = [Row(li.name, li.type, list(li.params), li.act) for li in msg.layers]
                self._row_index = {r.name: i for i, r in enumerate(self.rows)}
        elif isinstance(msg, wire.Step):
            self.step = max(self.step, msg.step)
            self.drops = max(self.drops, msg.drops)
            if msg.rank == min(self.hellos, default=msg.rank):
                self._times.append((msg.step, msg.time))
            for s in msg.samples:
                key = (s.layer, s.kind, msg.rank)
                buf = self.history.get(key)
                if buf is None:
                    buf = self.history[key] = deque(maxlen=self.depth)
                buf.append((msg.step, s))
            self.samples_seen += len(msg.samples)
        elif isinstance(msg, wire.Alert):
            if len(self.alerts) >= self.max_alerts:
                self.alerts.popleft()
            self.alerts.append(msg)
            key = (msg.rule, msg.layer, msg.kind, msg.rank)
            if msg.severity == "info":
                self.active.pop(key, None)
            else:
                self.active[key] = msg
        elif isinstance(msg, wire.Note):
            self.notes.append(msg)
        elif isinstance(msg, wire.End):
            self.ended[msg.rank] = msg

    # -- queries ----------------------------------------------------------

    @property
    def world_size(self) -> int:
        """Ranks the run has, as its hello says."""
        return max((h.world_size for h in self.hellos.values()), default=1)

    @property
    def finished(self) -> bool:
        """Every attached rank has sent its End."""
        return bool(self.hellos) and all(r in self.ended for r in self.hellos)

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

    def latest(self, row: Row, kind: str, rank: int = 0) -> wire.Sample | None:
        """The newest sample of a row's column, or None."""
        stream = row.stream(kind)
        buf = self.history.get((stream, kind, rank)) if stream is not None else None
        return buf[-1][1] if buf else None

    def series(self, layer: str, kind: str, rank: int = 0) -> list:
        """The ring buffer of (step, Sample) of one stream, oldest first."""
        return list(self.history.get((layer, kind, rank), ()))

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
