"""Headless mode: print alerts (and injected faults) one line each.

For runs nobody watches: `xray-tui attach --headless`, `xray-tui replay
--headless` and `xray-tui demo --headless` all print through
:class:`AlertPrinter`. With ``--json`` each line is a JSON object whose
fields are the documented contract.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from typing import TextIO

from probes.protocol import wire
from probes.publish.recorder import STOPPED
from probes.rules import RuleEngine
from probes.rules.spectral import SpectralAlerts
from tui.drops import DropWatch, drop_line

SEVERITIES = ("info", "warning", "critical")


def clean(value):
    """JSON-safe floats: NaN and infinities become null (counts say why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def alert_json(a: wire.Alert) -> dict:
    """The alert contract: type, step, rank, severity, rule, layer, kind, value, threshold, message."""
    return clean({
        "type": "alert", "step": a.step, "rank": a.rank, "severity": a.severity, "rule": a.rule,
        "layer": a.layer, "kind": a.kind, "value": a.value, "threshold": a.threshold, "message": a.message,
    })


def fault_json(n: wire.Note) -> dict:
    """An injected fault: ``{"type": "fault", "step", "layer", "fault"}``."""
    return clean({"type": "fault", "step": n.step, "layer": n.data.get("layer"), "fault": n.data.get("fault"),
                  **{k: v for k, v in n.data.items() if k not in ("layer", "fault")}})


class AlertPrinter:
    """Prints alerts and faults; remembers the worst severity seen.

    With ``rules`` (a :class:`~probes.rules.RuleEngine`, e.g. from ``--rules
    FILE``) the printer evaluates every step itself with those thresholds and
    prints its own alerts instead of the ones the probe sent. ``spectral``
    is judged again from each ``Spectral`` message (alpha, tail size) with
    the file's ``[spectral]`` bands; a ``Spectral`` from an older probe has
    no tail size, so that layer's spectral alerts pass through as sent.
    """

    def __init__(self, out: TextIO | None = None, as_json: bool = False, min_severity: str = "info",
                 rules: RuleEngine | None = None) -> None:
        self.out = out or sys.stdout
        self.as_json = as_json
        self.min_rank = SEVERITIES.index(min_severity)
        self.worst: str | None = None
        #: alerts seen (printed or not) by severity
        self.counts: dict[str, int] = {sev: 0 for sev in SEVERITIES}
        #: the first alert at or above :attr:`fail_on` (set by the caller), once one came
        self.fail_on: str | None = None
        self.tripped: wire.Alert | None = None
        self.ended: dict[int, wire.End] = {}
        self.rules = rules
        self._spectral: dict[int, SpectralAlerts] = {}  # rank -> the spectral rule, with --rules
        self._rejudged: set[tuple[int, str]] = set()  # (rank, layer) whose spectral fits we judge
        #: called with every alert seen, printed or not (headless notifications: tui.notify_send)
        self.on_alert = None

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def handle(self, msg: wire.Message) -> None:
        """Print what a person or a script should see of ``msg``."""
        if self.rules is not None:
            if isinstance(msg, wire.Hello):
                self.rules.set_hello(msg)
            elif isinstance(msg, wire.Note):
                self.rules.note(msg)
            elif isinstance(msg, wire.Step):
                for alert in self.rules.evaluate(msg):
                    self._alert(alert)
                return
            elif isinstance(msg, wire.Scalars):
                for alert in self.rules.evaluate_scalars(msg):
                    self._alert(alert)
                return
            elif isinstance(msg, wire.Spectral):
                key = (msg.rank, msg.layer)
                if msg.n_tail > 0 or msg.alpha is None:
                    self._rejudged.add(key)
                    judge = self._spectral.get(msg.rank)
                    if judge is None:
                        judge = self._spectral[msg.rank] = SpectralAlerts(config=self.rules.config)
                    alert = judge.evaluate(msg, msg.step, msg.rank)
                    if alert is not None and msg.rank == 0:  # as the probe: rank 0 speaks for the job
                        self._alert(alert)
                else:
                    self._rejudged.discard(key)
                return
            elif isinstance(msg, wire.Alert) and (msg.rule != "spectral" or (msg.rank, msg.layer) in self._rejudged):
                return  # re-evaluated above with the --rules thresholds
        if isinstance(msg, wire.Alert):
            self._alert(msg)
        elif isinstance(msg, wire.Note) and msg.event == "fault":
            if self.as_json:
                self._print(json.dumps(fault_json(msg)))
            else:
                self._print(f"step {msg.step:>7}  FAULT     {msg.data.get('fault')} injected into {msg.data.get('layer')}")
        elif isinstance(msg, wire.Note) and msg.event == "engine-fallback":
            if self.as_json:
                self._print(json.dumps({"type": "note", "event": msg.event, "step": msg.step, "rank": msg.rank,
                                        **msg.data}))
            else:
                self._print(f"step {msg.step:>7}  ENGINE    the probe's device engine fell back to torch on "
                            f"{msg.data.get('device')}: {msg.data.get('why')}")
        elif isinstance(msg, wire.End):
            self.ended[msg.rank] = msg

    def _alert(self, msg: wire.Alert) -> None:
        rank = SEVERITIES.index(msg.severity)
        self.counts[msg.severity] += 1
        if (self.tripped is None and self.fail_on is not None
                and rank >= SEVERITIES.index(self.fail_on)):
            self.tripped = msg
        if self.worst is None or rank > SEVERITIES.index(self.worst):
            self.worst = msg.severity
        if self.on_alert is not None:
            self.on_alert(msg)
        if rank < self.min_rank:
            return
        if self.as_json:
            self._print(json.dumps(alert_json(msg)))
        else:
            self._print(f"step {msg.step:>7}  rank {msg.rank}  {msg.severity.upper():<8}  {msg.rule:<10}  "
                        f"{_printable(msg.layer)} [{msg.kind}]  {_printable(msg.message, 4000)}")

    def failed(self, fail_on: str | None) -> bool:
        """Whether an alert at or above ``fail_on`` was seen."""
        return (fail_on is not None and self.worst is not None
                and SEVERITIES.index(self.worst) >= SEVERITIES.index(fail_on))


# -- how the run is going, and how it ended -------------------------------------------------------

#: End reasons after which headless mode exits 0; any other (crashed, killed, interrupted, the
#: older probes' error, or one this viewer does not know) exits 1
END_OK = ("finished", "stopped")
#: the ``reason`` of the end line when the stream stopped without an End
DISCONNECTED = "disconnected"
#: the ``reason`` of the end line when ``--fail-on`` left before the run ended
FAIL_ON = "fail-on"
#: scalar names kept per rank for the status line
MAX_SCALAR_NAMES = 512


def _printable(text: str, limit: int = 300) -> str:
    """One line of a peer's text: control characters shown as escapes, capped."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[:limit - 1] + "…"


def _num(v: float | None, fmt: str) -> str:
    """``v`` formatted; "—" when there is none yet. A NaN or infinite loss is shown as such
    (``nan``, ``inf``): after a NaN the loss is the news, not a missing value."""
    return "—" if v is None else format(v, fmt)


class RunWatch:
    """Headless mode's view of one run: alerts (through :class:`AlertPrinter`), a
    status line now and then, and one line at the end saying how the run ended.

    The caller feeds every message to :meth:`handle`, calls :meth:`status`
    when its clock says so (the wall clock live, the probe's timestamps in a
    replay: :attr:`newest_time`), checks :attr:`tripped` for ``--fail-on``, and
    ends with :meth:`finish`, which prints the end line and returns the exit
    status: 0 finished or stopped, 1 crashed, killed, interrupted or no End
    (a disconnect), 3 ``--fail-on``.
    """

    def __init__(self, printer: AlertPrinter, *, live: bool, label: str = "") -> None:
        self.printer = printer
        self.live = live
        self.label = label
        self.hellos: set[int] = set()
        self.drops = DropWatch()  # steps this viewer lost when it fell behind (tui/drops.py)
        self.recording_stopped: wire.Note | None = None  # the probe's note that its recording stopped, and why
        self.ends: dict[int, wire.End] = {}
        self.step = -1  # the newest training step seen (Step or Scalars)
        self.scalars: dict[int, dict[str, float]] = {}  # rank -> latest value of each name
        self._times: deque = deque(maxlen=64)  # (step, probe time) of the first rank, for steps/s
        self.newest_time: float | None = None  # the probe's clock in the newest message that has one
        self._saw_scalars = False
        self.scalar_step = -1  # the newest step whose Scalars came
        self.stops_run = False  # --fail-on stops the training too (the demo trains in this process)
        self._status_at: tuple[int, float] | None = None  # (step, wall clock) the status lines first showed

    @property
    def tripped(self) -> wire.Alert | None:
        """The alert that met ``--fail-on``, if one came."""
        return self.printer.tripped

    def handle(self, msg: wire.Message) -> None:
        """Fold ``msg`` in and print what it asks for (alerts, faults)."""
        if isinstance(msg, wire.Hello):
            self.hellos.add(msg.rank)
        elif isinstance(msg, wire.End):
            self.ends[msg.rank] = msg
        elif isinstance(msg, wire.Note) and msg.event == STOPPED:
            self.recording_stopped = msg
        elif isinstance(msg, (wire.Step, wire.Scalars)) and getattr(msg, "phase", "train") == "train":
            self.step = max(self.step, msg.step)
            # The replay clock. Scalars come in bursts right after their sampled Step, so once a run
            # sends them they alone move it: a status line then has the loss of the step it names.
            self._saw_scalars = self._saw_scalars or isinstance(msg, wire.Scalars)
            if msg.time > 0 and (isinstance(msg, wire.Scalars) or not self._saw_scalars):
                self.newest_time = max(self.newest_time or msg.time, msg.time)
            if msg.rank == min(self.hellos, default=msg.rank):
                if not self._times or msg.step > self._times[-1][0]:
                    self._times.append((msg.step, msg.time))
            if isinstance(msg, wire.Scalars):
                latest = self.scalars.setdefault(msg.rank, {})
                for name, value in msg.values.items():
                    if name in latest or len(latest) < MAX_SCALAR_NAMES:  # a runaway xr.log stays bounded
                        latest[name] = value
                self.scalar_step = max(self.scalar_step, msg.step)
        self.printer.handle(msg)
        self._say_drops(self.drops.handle(msg))

    def tick(self) -> None:
        """Say the drop episodes that have ended by now (each message and status line calls it)."""
        self._say_drops(self.drops.due())

    def _say_drops(self, episodes) -> None:
        for ep in episodes:
            self.printer._print(drop_line(ep, self.printer.as_json))

    # -- the status line --------------------------------------------------

    def latest(self, name: str) -> float | None:
        """The newest value of scalar ``name`` from the lowest rank that sent it."""
        for rank in sorted(self.scalars):
            v = self.scalars[rank].get(name)
            if v is not None:
                return v
        return None

    @property
    def steps_per_s(self) -> float | None:
        """The probe's own figure if it sends one, else steps over the probe's clock."""
        v = self.latest("steps_per_s")
        if v is not None:
            return v
        if len(self._times) < 2:
            return None
        (s0, t0), (s1, t1) = self._times[0], self._times[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def _alert_counts(self) -> str:
        c = self.printer.counts
        return f"{c['critical']} critical, {c['warning']} warning, {c['info']} info"

    def status(self) -> None:
        """Print the status line: step, steps/s, loss, lr, alerts so far.

        ``step`` is that of the newest Scalars when the run sends them (the
        loss shown is that step's), else the newest sampled step."""
        self.tick()
        at = self.scalar_step if self._saw_scalars else self.step
        if self.printer.as_json:
            rank = min(self.scalars, default=None)
            self.printer._print(json.dumps(clean({
                "type": "status", "step": at if at >= 0 else None,
                "steps_per_s": self.steps_per_s, "loss": self.latest("loss"), "lr": self.latest("lr"),
                "alerts": dict(self.printer.counts),
                "scalars": dict(self.scalars.get(rank, {})) if rank is not None else {},
            })))
            return
        step = f"{at:,}" if at >= 0 else "—"
        self.printer._print(f"status  step {step}  {_num(self.steps_per_s, '.3g')} steps/s  "
                            f"loss {_num(self.latest('loss'), '.4g')}  lr {_num(self.latest('lr'), '.3g')}  "
                            f"alerts {self._alert_counts()}{self._quiet_for(at)}")

    def _quiet_for(self, at: int) -> str:
        """Live, when no new step came since the last status line: how long the run has been quiet,
        so that line is not the last one printed again (a hung run still gets its lines)."""
        now = time.monotonic()
        if self._status_at is None or self._status_at[0] != at:
            self._status_at = (at, now)
            return ""
        return f"  (no new step for {now - self._status_at[1]:.0f} s)" if self.live else ""

    # -- the end ----------------------------------------------------------

    def outcome(self) -> tuple[str, str, int, int | None]:
        """``(reason, error, step, rank)`` of the run as it stands: the first rank that
        failed, else ``disconnected`` if a rank sent no End, else stopped or finished."""
        ends = [self.ends[r] for r in sorted(self.ends)]
        for e in ends:
            if e.reason not in END_OK:
                return e.reason, e.error, e.step, e.rank
        # without a Hello (a listener in the training process sees none) the Ends name the ranks
        missing = sorted(self.hellos - set(self.ends)) if self.hellos else ([] if ends else [None])
        if missing or not ends:
            return DISCONNECTED, "", self.step, missing[0] if missing else None
        stopped = [e for e in ends if e.reason == "stopped"]
        e = stopped[0] if stopped else ends[0]
        return e.reason, e.error, max(x.step for x in ends), e.rank

    def finish(self, fail_on: str | None = None) -> int:
        """Print the end line; the exit status (see the class)."""
        self._say_drops(self.drops.close())
        tripped = self.tripped
        if tripped is not None:
            reason, error, step, rank = FAIL_ON, "", max(self.step, tripped.step), tripped.rank
            code = 3
        else:
            reason, error, step, rank = self.outcome()
            code = 0 if reason in END_OK else 1
            if reason == DISCONNECTED and not self.live and self.recording_stopped is not None:
                error = f"recording stopped: {self.recording_stopped.data.get('why', '')}"  # the probe said why
        if self.printer.as_json:
            self.printer._print(json.dumps(clean({
                "type": "end", "step": step if step >= 0 else None, "rank": rank, "reason": reason,
                "error": error, "alerts": dict(self.printer.counts), "exit": code})))
            return code
        at = f"step {step:,}" if step >= 0 else "the start"
        if tripped is not None:
            what = (f"left at {at}: --fail-on {fail_on} saw {tripped.severity} {tripped.rule} on "
                    f"{_printable(tripped.layer)} [{tripped.kind}] at step {tripped.step} "
                    f"({'training stopped' if self.stops_run else 'the run goes on'})")
        elif reason == DISCONNECTED:
            what = (f"run disconnected at {at} without an End (the process died or was SIGKILLed)" if self.live else
                    _recording_cut(at, self.recording_stopped))
        else:
            why = f" ({_printable(error)})" if error else ""
            what = f"run ended at {at}: {_printable(reason, 40)}{why}"
        self.printer._print(f"{what}; alerts {self._alert_counts()}")
        return code


def _recording_cut(at: str, stopped: wire.Note | None) -> str:
    """Why a recording ends without an End: the probe's own note when it left one, else the causes."""
    if stopped is not None:
        why = _printable(str(stopped.data.get("why", "")), 120)
        return f"the recording stops at {at}: the probe stopped recording ({why}); the run went on unrecorded"
    return f"the recording stops at {at} without an End (the process died, the disk filled, or it is still writing it)"
