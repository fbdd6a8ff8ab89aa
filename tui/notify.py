"""Notifications of alerts and of the run's end: what to say, and when to say it.

A :class:`Notice` is one thing to tell the person watching (an alert, the
run's end, or a summary of several alerts); :class:`NotifyPolicy` decides
which notices go out now: alerts of ``min_severity`` or worse, at most one
per (rule, layer) per ``interval`` seconds, and when many fire at once the
first ``burst`` go out and the rest wait and leave as one summary. The run's
end always goes out, after a summary of what was still waiting.

Where notices go is elsewhere: :mod:`tui.notify_send` (a command, a webhook:
headless mode) and :mod:`tui.terminal_notify` (the terminal and the app's
toast). Nothing here reads a clock: callers pass ``now`` (the wall clock
live, the probe's clock in a replay), so a replay is rate-limited as the run
would have been.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from probes.protocol import wire
from tui.headless import alert_json, clean

SEVERITIES = ("info", "warning", "critical")
#: Default seconds between two notifications of the same (rule, layer): ten minutes.
DEFAULT_INTERVAL = 600.0
#: Notices let out within :data:`BURST_WINDOW` seconds before the rest wait for a summary.
DEFAULT_BURST = 5
BURST_WINDOW = 60.0
#: Layers a summary names before it says "and N more".
SUMMARY_LAYERS = 5


def printable(text: str, limit: int = 400) -> str:
    """``text`` as one line without control characters (ESC, BEL, newlines become spaces), capped.

    Alert text comes from the training process; a message holding ESC or BEL
    could end an escape sequence early or start one of its own, so every
    notice's text goes through here."""
    out = "".join(c if c.isprintable() else " " for c in str(text))
    out = " ".join(out.split())
    return out if len(out) <= limit else out[:limit - 1] + "…"


@dataclass(frozen=True)
class Notice:
    """One notification: ``event`` is ``alert``, ``end`` or ``summary``.

    ``title`` and ``text`` are printable one-liners (for a desktop
    notification, a chat message); ``fields`` are the structured values
    (an alert's :func:`~tui.headless.alert_json` fields, an end's reason and
    counts) with the run's name, JSON-safe."""

    event: str
    severity: str
    title: str
    text: str
    fields: dict = field(default_factory=dict)

    def payload(self) -> dict:
        """The JSON a command reads on stdin and a webhook receives: ``text`` (Slack's field) and the fields."""
        return {"text": f"{self.title}: {self.text}", "event": self.event, "severity": self.severity,
                "title": self.title, **self.fields}


def alert_notice(a: wire.Alert, run: str = "") -> Notice:
    """The notice of an alert (a recovery, severity ``info``, says so)."""
    what = "recovered" if a.severity == "info" else a.severity.upper()
    where = f"{a.layer} [{a.kind}]" if a.layer else f"[{a.kind}]"
    rank = f" rank {a.rank}" if a.rank else ""
    fields = {**alert_json(a), "run": run}
    fields["type"] = "alert"
    return Notice("alert", a.severity, printable(f"xray-tui {run}: {what} {a.rule}".replace("  ", " ")),
                  printable(f"{where} at step {a.step}{rank}: {a.message}"), fields)


#: How the run's end reads: a headline, what it means, how severe it is (an unknown reason is critical).
END_WORDS = {
    "finished": ("run finished", "", "info"),
    "stopped": ("run stopped", "on_alert stopped the training", "warning"),
    "crashed": ("run CRASHED", "", "critical"),
    "error": ("run CRASHED", "", "critical"),
    "killed": ("run KILLED", "", "critical"),
    "interrupted": ("run interrupted", "", "warning"),
    "disconnected": ("stream LOST", "the process died or the connection broke", "critical"),
    "fail-on": ("--fail-on tripped", "the viewer left; the run goes on", "critical"),
    "viewer-interrupted": ("viewer interrupted", "nobody is watching the run now", "warning"),
}


def end_notice(reason: str, *, run: str = "", step: int | None = None, error: str = "",
               counts: dict | None = None, code: int | None = None) -> Notice:
    """The notice of the run's end: finished, crashed, killed, stream lost, ..."""
    head, means, severity = END_WORDS.get(reason, (f"run ended: {reason}", "", "critical"))
    text = f"at step {step:,}" if step is not None and step >= 0 else "at the start"
    if error:
        text += f" ({error})"
    if means:
        text += f": {means}"
    if counts:
        text += f"; alerts {counts.get('critical', 0)} critical, {counts.get('warning', 0)} warning"
    fields = clean({"type": "end", "run": run, "reason": reason, "error": error,
                    "step": step if step is not None and step >= 0 else None,
                    "alerts": dict(counts or {}), "exit": code})
    return Notice("end", severity, printable(f"xray-tui {run}: {head}".replace("  ", " ")), printable(text),
                  fields)


def summary_notice(held: list[Notice], run: str = "", why: str = "at once") -> Notice:
    """One notice for several alerts that came together: counts per rule, the layers named."""
    worst = max((n.severity for n in held), key=SEVERITIES.index)
    rules = Counter(n.fields.get("rule", "?") for n in held)
    layers = list(dict.fromkeys(n.fields.get("layer", "") for n in held if n.fields.get("layer")))
    named = ", ".join(layers[:SUMMARY_LAYERS]) + (f" and {len(layers) - SUMMARY_LAYERS} more"
                                                   if len(layers) > SUMMARY_LAYERS else "")
    per_rule = ", ".join(f"{k} {v}" for k, v in rules.most_common())
    steps = [n.fields["step"] for n in held if isinstance(n.fields.get("step"), int)]
    fields = {"type": "summary", "run": run, "count": len(held), "rules": dict(rules), "layers": layers,
              "first_step": min(steps, default=None), "last_step": max(steps, default=None)}
    return Notice("summary", worst, printable(f"xray-tui {run}: {len(held)} alerts {why}".replace("  ", " ")),
                  printable(f"{per_rule}" + (f" on {named}" if named else "")), fields)


class NotifyPolicy:
    """Which notices go out, and when.

    :meth:`offer` an alert's notice as it arrives and call :meth:`due`
    now and then (each batch, each second); both return the notices to send
    now. ``min_severity``: alerts below it are never sent. ``interval``:
    seconds between two notices of the same (rule, layer) (0: no limit);
    a recovery (``info``) is limited apart from its alert. ``burst``: notices
    let out within :data:`BURST_WINDOW` seconds; past it the rest are held
    and leave as one summary when the window has passed. :meth:`hold` holds
    everything until a time (the app's catch-up on a run's history).
    :meth:`close` returns what is still held, as a summary.
    """

    def __init__(self, min_severity: str = "critical", interval: float = DEFAULT_INTERVAL,
                 burst: int = DEFAULT_BURST, run: str = "") -> None:
        if min_severity not in SEVERITIES:
            raise ValueError(f"unknown severity {min_severity!r}")
        self.min_rank = SEVERITIES.index(min_severity)
        self.interval = interval
        self.burst = burst
        self.run = run
        self._last: dict[tuple, float] = {}  # (rule, layer, recovery) -> when its last notice went out
        #: notices of a (rule, layer) left out by the interval, per key, since its last notice
        self.suppressed: Counter = Counter()
        self._sent: deque[float] = deque()  # when each notice of the last BURST_WINDOW went out
        self._held: list[Notice] = []
        self._held_since: float | None = None
        self._hold_until: float | None = None
        self._hold_why = "at once"

    def wants(self, a: wire.Alert) -> bool:
        """Whether alerts of this severity are notified at all."""
        return SEVERITIES.index(a.severity) >= self.min_rank

    def offer(self, a: wire.Alert, now: float) -> list[Notice]:
        """Take in an alert; the notices to send now (none, it, or a summary that came due)."""
        if not self.wants(a):
            return []
        if self._hold_until is not None and now >= self._hold_until and not self._held:
            self._hold_until = None  # the hold passed with nothing held: the burst rule alone again
        key = (a.rule, a.layer, a.severity == "info")
        last = self._last.get(key)
        if last is not None and self.interval > 0 and now - last < self.interval:
            self.suppressed[key] += 1
            return self.due(now)
        self._last[key] = now
        notice = alert_notice(a, self.run)
        if self.suppressed.get(key):
            notice = Notice(notice.event, notice.severity, notice.title,
                            printable(f"{notice.text} (+{self.suppressed[key]} more since the last notice)"),
                            {**notice.fields, "suppressed": self.suppressed.pop(key)})
        out = self.due(now)
        while self._sent and now - self._sent[0] >= BURST_WINDOW:
            self._sent.popleft()
        holding = self._hold_until is not None and now < self._hold_until
        if holding or self._held or len(self._sent) >= self.burst:
            if not self._held:
                self._held_since = now
            self._held.append(notice)
            return out
        self._sent.append(now)
        return [*out, notice]

    def hold(self, until: float, why: str = "at once") -> None:
        """Hold every notice until ``until``; then they leave together (one as itself, more as a summary)."""
        self._hold_until = until
        self._hold_why = why

    def due(self, now: float) -> list[Notice]:
        """The held notices, once their window has passed: one as itself, several as a summary."""
        if not self._held:
            return []
        if self._hold_until is not None and now < self._hold_until:
            return []
        if self._hold_until is None and now - (self._held_since or now) < BURST_WINDOW:
            return []
        why = self._hold_why if self._hold_until is not None else "at once"
        self._hold_until = None
        self._hold_why = "at once"
        return self._release(now, why)

    def close(self) -> list[Notice]:
        """What is still held (as one notice), so it goes out before the run's end."""
        return self._release(None, self._hold_why if self._hold_until is not None else "at once")

    def _release(self, now: float | None, why: str) -> list[Notice]:
        held, self._held, self._held_since = self._held, [], None
        if not held:
            return []
        if now is not None:
            self._sent.append(now)
        return [held[0] if len(held) == 1 else summary_notice(held, self.run, why)]
