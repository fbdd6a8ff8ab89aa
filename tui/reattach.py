"""A live source that outlives its run: waits, re-attaches, says what it is doing.

:class:`ReattachSource` follows a run *by name*. When the run ends or its
socket closes, the viewer keeps the last data and the source keeps polling
the run directory; when a run of the same name is live again it connects to
it by itself. Its batches carry :class:`Status` items (not wire messages)
between the run's messages, so the app can show "disconnected — retrying"
and reset its state when a new run replaces the old one.

Built on :class:`tui.feed.SocketSource`, :func:`tui.feed.resolve_run` and
:func:`probes.protocol.rundir.live_runs`; nothing here touches widgets.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

from probes.protocol import rundir, wire
from probes.publish.recorder import Recorder, free_log_path
from tui.feed import FeedError, SocketSource, resolve_run

#: Seconds between looks at the run directory while waiting for the run.
POLL_S = 0.5


@dataclass(frozen=True)
class Status:
    """A change of connection state, carried in a batch among the messages.

    ``connection`` is what the header shows; ``fresh`` says the messages
    that follow come from a new connection, whose backlog repeats the history,
    so the viewer should forget what it had.
    """

    connection: str
    fresh: bool = False
    #: the whole reason of a failed handshake (``connection`` carries it too, but the header cuts it)
    why: str = ""
    #: failed handshakes in a row with the run (0: none); the app offers to quit at :data:`GIVE_UP_AFTER`
    failures: int = 0


WAITING = "waiting for the run"
#: Failed handshakes in a row after which the app says the socket may not be a probe and offers to quit.
GIVE_UP_AFTER = 3


def _short(text: str, limit: int = 24) -> str:
    """A peer's word for the header: printable, capped."""
    text = "".join(c for c in text if c.isprintable())
    return text if len(text) <= limit else text[:limit - 1] + "…"

ENDED = "run ended — waiting for a new run"
DISCONNECTED = "disconnected — retrying"


def live_runs() -> list[rundir.Run]:
    """Live runs, oldest first ([] if the run directory cannot be read)."""
    try:
        return rundir.live_runs()
    except rundir.RunDirError:
        return []


class ReattachSource:
    """Streams the live run called ``name``, across restarts of that run.

    With ``name`` None the only live run is taken (and then followed by its
    name); when several are live, :meth:`needs_choice` is true and the app
    asks the user (:mod:`tui.chooser`) and calls :meth:`choose`. ``record``
    names a file that receives every wire message, across re-attaches.
    """

    def __init__(self, name: str | None = None, *, record: str | None = None, poll: float = POLL_S) -> None:
        self.name = name
        self.poll = poll
        self.record = free_log_path(record) if record else None
        self.attaches = 0
        self._live: SocketSource | None = None

    def request(self, what: str) -> int:
        """Ask the run's probes for ``what`` (0 while not connected); see :meth:`SocketSource.request`."""
        live = self._live
        return live.request(what) if live is not None else 0

    @property
    def label(self) -> str:
        """The run's name (empty until one is chosen)."""
        return self.name or ""

    def needs_choice(self) -> bool:
        """True when no run is named and several are live."""
        return self.name is None and len(live_runs()) > 1

    def runs(self) -> list[rundir.Run]:
        """The live runs to choose from."""
        return live_runs()

    def choose(self, name: str) -> None:
        """Follow the run called ``name``."""
        self.name = name

    def _find(self) -> rundir.Run | None:
        if self.name is None:
            runs = live_runs()
            if len(runs) > 1:
                names = ", ".join(r.name for r in runs)
                raise FeedError(f"several live runs ({names}): name one, e.g. `xray-tui attach {runs[-1].name}`")
            if runs:
                self.name = runs[0].name
            return runs[0] if runs else None
        try:
            return resolve_run(self.name)
        except FeedError:
            return None  # not live (yet, or any more): keep waiting

    def batches(self, stop: threading.Event | None = None) -> Iterator[list]:
        """Yield message batches (with :class:`Status` items) until ``stop`` is set."""
        stop = stop or threading.Event()
        recorder = None
        if self.record:
            try:
                recorder = Recorder(self.record)
            except OSError as exc:
                raise FeedError(f"cannot record to {self.record}: {exc.strerror}") from None
        said = None
        ended_identity = None  # the run that sent End: never re-attach to it again
        failures = 0  # handshakes in a row that ended before a hello
        try:
            while not stop.is_set():
                run = self._find()
                identity = (run.pid, run.ranks[0].started) if run is not None else None
                if run is None or identity == ended_identity:
                    if said is None:
                        said = WAITING
                        yield [Status(WAITING)]
                    stop.wait(self.poll)
                    continue
                hellos, ends = set(), {}
                self._live = SocketSource([m.socket for m in run.ranks], label=run.name)
                try:
                    for batch in self._live.batches(stop):
                        for msg in batch:
                            if isinstance(msg, wire.Hello):
                                hellos.add(msg.rank)
                            elif isinstance(msg, wire.End):
                                ends[msg.rank] = msg.reason
                            if recorder is not None:
                                recorder.write(wire.encode(msg))
                        if said != "live" and hellos:
                            # Live (and, after an earlier attach, fresh: forget the old data) only
                            # once the run said hello: a listed run whose socket is stale or gone
                            # must not wipe the last data the viewer still shows.
                            said = "live"
                            batch = [Status("live", fresh=self.attaches > 0), *batch]
                            self.attaches += 1
                        yield batch
                except FeedError as exc:
                    self._live = None
                    if not hellos:
                        # Could not even say hello: the run went away between the
                        # listing and the connect, or the socket is not a probe.
                        said = f"{DISCONNECTED} ({exc})"
                        failures += 1
                        yield [Status(said, why=str(exc), failures=failures)]
                        stop.wait(self.poll)
                        continue
                failures = 0
                self._live = None
                if stop.is_set():
                    return
                if hellos and hellos <= set(ends):
                    ended_identity = identity
                    failed = [ends[r] for r in sorted(ends) if ends[r] not in ("finished", "stopped")]
                    # "run ended (crashed) — waiting ...": the header shows a failed ending as critical
                    said = ENDED if not failed else ENDED.replace("run ended", f"run ended: {_short(failed[0])}", 1)
                else:
                    said = DISCONNECTED
                yield [Status(said)]
                stop.wait(self.poll)
        finally:
            if recorder is not None:
                recorder.close()
