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
from typing import TextIO

from probes import wire
from probes.rules import RuleEngine
from probes.spectral_rule import SpectralAlerts

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
        self.ended: dict[int, wire.End] = {}
        self.rules = rules
        self._spectral: dict[int, SpectralAlerts] = {}  # rank -> the spectral rule, with --rules
        self._rejudged: set[tuple[int, str]] = set()  # (rank, layer) whose spectral fits we judge

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
        if self.worst is None or rank > SEVERITIES.index(self.worst):
            self.worst = msg.severity
        if rank < self.min_rank:
            return
        if self.as_json:
            self._print(json.dumps(alert_json(msg)))
        else:
            self._print(f"step {msg.step:>7}  rank {msg.rank}  {msg.severity.upper():<8}  {msg.rule:<10}  "
                        f"{msg.layer} [{msg.kind}]  {msg.message}")

    def failed(self, fail_on: str | None) -> bool:
        """Whether an alert at or above ``fail_on`` was seen."""
        return (fail_on is not None and self.worst is not None
                and SEVERITIES.index(self.worst) >= SEVERITIES.index(fail_on))
