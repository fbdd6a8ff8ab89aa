"""What a viewer that fell behind lost: steps that never arrived, said once per episode.

A live probe never waits for a viewer: frames a slow or stopped viewer has
no room for are dropped (``probes/publish/viewers.py``), and the probe tells
that viewer, in its own stream, with a ``drops`` Note whose ``frames`` is
how many it has lost so far (``queue``: step samples the probe's own queue
dropped, ``Step.drops``). While the viewer catches up it reads several such
notes, interleaved with the frames that were kept, and the gaps in the
steps it receives (Scalars come for every step; without them, sampled
Steps) say which steps are missing.

:class:`DropWatch` folds those into episodes: one starts with a note whose
count went up, takes in the gaps seen from a little before it, and ends
after :data:`QUIET` seconds without a new loss; then it yields one
:class:`Episode`, said as one line by headless mode and the app. Gaps that
no note explains (a late viewer's backlog starts where it starts) are not
losses. Pure bookkeeping: the caller gives the clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from probes.protocol import wire

#: Seconds without a new loss that close an episode (a resumed viewer reads its buffer in far less).
QUIET = 2.0


@dataclass
class Episode:
    """One stretch in which a viewer lost frames of one rank's stream."""

    rank: int
    started: float  # wall clock (time.time()) of its first sign
    frames: int = 0  # frames the probe dropped for this viewer
    queue: int = 0  # step samples the probe's own queue dropped meanwhile
    gaps: list = field(default_factory=list)  # (first missing step, last missing step)
    sampled: bool = False  # the gaps are of sampled Steps (no Scalars): steps lost are sampled steps
    every: int = 1  # the sampling cadence, when the gaps are of sampled Steps

    @property
    def steps(self) -> int:
        """Steps (sampled steps, without Scalars) that never arrived."""
        return sum((b - a) // self.every + 1 for a, b in self.gaps)

    def text(self) -> str:
        """The one line a person reads."""
        at = time.strftime("%H:%M:%S", time.localtime(self.started))
        what = "sampled steps" if self.sampled else "steps"
        span = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.gaps[:4])
        span += ", ..." if len(self.gaps) > 4 else ""
        lost = f"{self.steps:,} {what} never arrived ({span})" if self.gaps else "no whole step lost"
        queue = f"; the probe's own queue dropped {self.queue:,} samples" if self.queue else ""
        return (f"this viewer fell behind at {at} (rank {self.rank}): {lost}, "
                f"{self.frames:,} frames dropped{queue}")

    def as_json(self) -> dict:
        """The headless ``--json`` object: ``{"type": "drops", ...}``."""
        return {"type": "drops", "rank": self.rank, "time": self.started, "steps_lost": self.steps,
                "sampled": self.sampled, "gaps": [list(g) for g in self.gaps], "frames": self.frames,
                "queue": self.queue}


class _Stream:
    """One rank's stream: the newest step of each kind, the loss counters, the open episode."""

    def __init__(self) -> None:
        self.last_scalars = -1
        self.last_step = -1
        self.every = 1
        self.has_scalars = False
        self.frames = 0  # the newest drops note's count
        self.queue = 0
        self.recent: list = []  # (wall time, first, last, sampled): gaps not yet explained by a note
        self.episode: Episode | None = None
        self.last_loss = 0.0  # wall time of the episode's newest sign


class DropWatch:
    """Feed every message to :meth:`handle`; it returns the episodes that just ended."""

    def __init__(self, quiet: float = QUIET) -> None:
        self.quiet = quiet
        self._streams: dict[int, _Stream] = {}
        self._open = 0  # streams with an episode open

    def handle(self, msg: wire.Message, now: float | None = None) -> list[Episode]:
        """Fold ``msg`` in (``now``: wall clock, ``time.time()`` by default); episodes now over.

        A step that follows its predecessor (nearly every message) costs a few attribute
        reads: the clock is read only for a gap, a drops note or an open episode."""
        s = self._streams.get(msg.rank)
        if s is None:
            s = self._streams[msg.rank] = _Stream()
        if isinstance(msg, wire.Scalars):
            s.has_scalars = True
            if msg.step > s.last_scalars + 1 and s.last_scalars >= 0:
                now = time.time() if now is None else now
                self._gap(s, now, s.last_scalars + 1, msg.step - 1, False)
            if msg.step > s.last_scalars:
                s.last_scalars = msg.step
        elif isinstance(msg, wire.Step):
            if msg.phase == "train":
                if not s.has_scalars and s.last_step >= 0 and msg.step > s.last_step + s.every:
                    now = time.time() if now is None else now
                    self._gap(s, now, s.last_step + s.every, msg.step - s.every, True)
                if msg.step > s.last_step:
                    s.last_step = msg.step
        elif isinstance(msg, wire.Hello):
            s.every = max(1, msg.every)
        elif isinstance(msg, wire.Note) and msg.event == "drops":
            now = time.time() if now is None else now
            frames, queue = int(msg.data.get("frames", 0) or 0), int(msg.data.get("queue", 0) or 0)
            if frames > s.frames:
                ep = s.episode
                if ep is None:
                    ep = s.episode = Episode(msg.rank, now)
                    self._open += 1
                    # the gaps a resumed viewer met just before this note are this episode's
                    for t, a, b, sampled in s.recent:
                        if t >= now - self.quiet:
                            self._add_gap(ep, a, b, sampled, s.every)
                    s.recent.clear()
                ep.frames += frames - s.frames
                ep.queue += max(0, queue - s.queue)
                s.last_loss = now
            s.frames, s.queue = max(s.frames, frames), max(s.queue, queue)
        return self.due(now) if self._open else []

    def _gap(self, s: _Stream, now: float, first: int, last: int, sampled: bool) -> None:
        if s.episode is not None:
            self._add_gap(s.episode, first, last, sampled, s.every)
            s.last_loss = now
        else:
            s.recent = [g for g in s.recent if g[0] >= now - self.quiet] + [(now, first, last, sampled)]

    @staticmethod
    def _add_gap(ep: Episode, first: int, last: int, sampled: bool, every: int) -> None:
        ep.gaps.append((first, last))
        if sampled:
            ep.sampled, ep.every = True, every

    def due(self, now: float | None = None) -> list[Episode]:
        """Episodes quiet for :attr:`quiet` seconds at ``now``: ended, handed out once."""
        if not self._open:
            return []
        now = time.time() if now is None else now
        out = []
        for s in self._streams.values():
            if s.episode is not None and now - s.last_loss >= self.quiet:
                out.append(s.episode)
                s.episode = None
                self._open -= 1
        return out

    def close(self) -> list[Episode]:
        """The episodes still open (the stream ended): handed out once."""
        return self.due(float("inf"))


def drop_line(ep: Episode, as_json: bool) -> str:
    """Headless mode's line for an episode (``--json``: one JSON object)."""
    if as_json:
        import json

        return json.dumps(ep.as_json())
    first = f"{ep.gaps[0][0]:>7}" if ep.gaps else f"{'—':>7}"
    return f"step {first}  DROPS     {ep.text()}"
