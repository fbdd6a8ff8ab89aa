"""Rules over the run-level scalars (:class:`probes.wire.Scalars`): placeholder, filled in next."""

from __future__ import annotations


class ScalarRules:
    """``loss-spike``, ``nonfinite`` on the loss and ``overflow``, one Scalars message at a time."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def evaluate(self, msg) -> list:
        """Alerts that fire or recover at this step."""
        return []
