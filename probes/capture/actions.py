"""What ``attach(on_alert=...)`` does with an alert: call, raise in the loop, or ask it to stop."""

from __future__ import annotations

from probes.protocol import wire

#: Severities in order; ``alert_level`` is the least that raises or stops.
LEVELS = {"info": 0, "warning": 1, "critical": 2}


class AlertRaised(RuntimeError):
    """Raised in the training loop by ``on_alert="raise"``; ``.alert`` says why."""

    def __init__(self, alert: wire.Alert) -> None:
        super().__init__(f"xray-tui: {alert.severity} {alert.rule} alert on {alert.layer} ({alert.kind}) "
                         f"at step {alert.step}: {alert.message}")
        self.alert = alert


class AlertActions:
    """The probe's ``on_alert``: a publisher subscriber that acts on each warning or critical alert.

    A callable is called with the alert (on the publisher thread). ``"stop"``
    sets :attr:`should_stop` for an alert at ``level`` or above; ``"raise"``
    keeps the first such alert in :attr:`pending`, which the training thread
    raises as :class:`AlertRaised` at the next step boundary (an exception on
    the publisher thread would not reach the loop).
    """

    def __init__(self, on_alert, level: str) -> None:
        self.on_alert = on_alert
        self.level = LEVELS[level]
        #: the alert the training thread raises at the next step boundary (``"raise"``)
        self.pending: wire.Alert | None = None
        #: an alert at ``level`` fired and ``on_alert="stop"``: the loop should stop
        self.should_stop = False

    def __call__(self, msg: wire.Message) -> None:
        """Runs on the publisher thread: act on alerts as ``on_alert`` says."""
        if not isinstance(msg, wire.Alert) or msg.severity == "info":
            return
        if callable(self.on_alert):
            self.on_alert(msg)
        elif LEVELS[msg.severity] >= self.level:
            if self.on_alert == "stop":
                self.should_stop = True
            elif self.pending is None:
                self.pending = msg  # raised by the training thread at the next step boundary

    def take(self) -> AlertRaised:
        """The pending alert as the exception to raise, leaving none pending."""
        alert, self.pending = self.pending, None
        return AlertRaised(alert)
