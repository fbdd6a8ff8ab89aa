"""The app's notifications: a toast and a desktop notification through the terminal, per new alert.

:class:`AppNotifications` is fed by :class:`tui.app.XRayApp` (each Hello,
alert and connection change, each batch, each paint tick) and decides with
:class:`~tui.notify.NotifyPolicy` what to say: critical alerts by default
(``--notify-on warning`` adds warnings), one per (rule, layer) per
``--notify-interval``, a summary when many fire at once, and the run's end
(finished, crashed, killed, stream lost). What a probe sends first on
connecting is its history: alerts in the first :data:`CATCH_UP` seconds of
a connection leave as one summary, not one notification each. A replay
notifies nothing (a recording is the past). ``N`` turns it off and on.
"""

from __future__ import annotations

import os
import time

from probes.protocol import wire
from tui.notify import DEFAULT_INTERVAL, Notice, NotifyPolicy, end_notice
from tui.terminal_notify import sequence, write_to_terminal

#: Seconds after a connection's first Hello whose alerts are taken as the run's history (one summary).
CATCH_UP = 2.0
#: A toast stays this many seconds (a critical one longer).
TOAST_S = {"critical": 15, "warning": 8, "info": 5}
#: Textual's toast severity per alert severity.
TOAST_SEVERITY = {"critical": "error", "warning": "warning", "info": "information"}
#: In the app a burst is cut short sooner than in headless mode: each notice is a popup.
APP_BURST = 3


class AppNotifications:
    """Toasts and terminal notifications of one app (see the module).

    ``min_severity`` None: off (``--no-notify``), as is a replay; ``enabled``
    is what ``N`` flips. ``env`` is read for ``$TMUX`` (passthrough-wrapped
    sequences inside tmux). ``clock``: seconds, monotonic (tests pass their own).
    """

    def __init__(self, app, *, min_severity: str | None = "critical", interval: float = DEFAULT_INTERVAL,
                 replay: bool = False, env=None, clock=time.monotonic) -> None:
        self.app = app
        self.replay = replay
        self.enabled = min_severity is not None and not replay
        self.policy = NotifyPolicy(min_severity or "critical", interval, burst=APP_BURST)
        self.tmux = bool((os.environ if env is None else env).get("TMUX"))
        self.clock = clock
        self._connected = False  # a Hello came on this connection (its history is being caught up)
        self._ended = False  # this connection's end was notified
        #: what was sent, newest last (for the tests and the help's "last notification")
        self.sent: list[Notice] = []

    # -- what the app feeds in ----------------------------------------------

    def message(self, msg) -> None:
        """A Hello or an Alert the app ingested."""
        if isinstance(msg, wire.Hello):
            self.policy.run = msg.run
            if not self._connected:
                self._connected = True
                self.policy.hold(self.clock() + CATCH_UP, "in the run's history")
        elif isinstance(msg, wire.Alert) and self.enabled:
            self._send(self.policy.offer(msg, self.clock()))

    def reconnected(self) -> None:
        """A new connection (the reattach source's fresh Status): its backlog repeats the history."""
        self._connected = False
        self._ended = False

    def after_batch(self, state, *, lost: bool) -> None:
        """Notify the run's end once per connection: every rank's End, or the stream ``lost``."""
        if self._ended or not state.hellos:
            return
        reason = state.end_reason
        if reason is None and lost:
            reason = "disconnected"
        if reason is None:
            return
        self._ended = True
        if self.enabled:
            counts = {sev: 0 for sev in ("critical", "warning", "info")}
            for a in state.alerts:
                counts[a.severity] += 1
            ends = [state.ended[r] for r in sorted(state.ended)]
            error = next((e.error for e in ends if e.reason == reason and e.error), "")
            step = max([state.step, *(e.step for e in ends)])
            self._send([*self.policy.close(),
                        end_notice(reason, run=state.run or "", step=step, error=error, counts=counts)])

    def tick(self) -> None:
        """The paint timer: send a summary that came due."""
        if self.enabled:
            self._send(self.policy.due(self.clock()))

    def toggle(self) -> bool:
        """``N``: turn notifications off or on; whether they are on now."""
        self.enabled = not self.enabled
        return self.enabled

    # -- out ------------------------------------------------------------------

    def _send(self, notices: list[Notice]) -> None:
        for n in notices:
            self.sent.append(n)
            del self.sent[:-100]
            # markup off: the text is the probe's, and "[...]" in it is meant literally
            self.app.notify(n.text, title=n.title, severity=TOAST_SEVERITY.get(n.severity, "information"),
                            timeout=TOAST_S.get(n.severity, 5), markup=False)
            write_to_terminal(self.app, sequence(n.title, n.text, tmux=self.tmux))
