"""What viewers may ask of the probe, and how often.

A viewer sends :class:`probes.protocol.wire.Request` frames naming a kind
(say ``"spectral"``). A kind is honoured only when the probe registered a
callback for it, and then at most once per ``interval`` seconds for all
viewers together, so that no viewer can make the probe do expensive work
often. Nothing a viewer sends is evaluated: the kind is looked up by name.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

log = logging.getLogger("xray-tui")

#: Seconds between two accepted requests of one kind (all viewers together).
REQUEST_INTERVAL = 10.0

#: A request callback returns (accepted, reason); the reason is shown to the viewer.
RequestCallback = Callable[[], "tuple[bool, str]"]


class Requests:
    """The kinds of request the probe takes, each with its callback and its last accepted time."""

    def __init__(self, interval: float = REQUEST_INTERVAL) -> None:
        #: Seconds between two accepted requests of one kind.
        self.interval = interval
        #: kind -> [callback, monotonic time of the last accepted request]
        self._kinds: dict[str, list] = {}

    def register(self, what: str, callback: RequestCallback) -> None:
        """Take requests for ``what`` from now on (replacing an earlier callback)."""
        self._kinds[what] = [callback, -math.inf]

    def answer(self, what: str, now: float) -> tuple[str, bool, str]:
        """Run ``what``'s callback unless rate limited; (kind to echo, accepted, reason).

        An unknown kind is echoed as ``"?"`` (never a viewer's text back to
        it); a callback that raises is removed.
        """
        entry = self._kinds.get(what)
        if entry is None:
            return "?", False, "not available: this probe does not take that request"
        if now - entry[1] < self.interval:
            return what, False, (f"rate limited: one per {self.interval:g} s; "
                                 f"try again in {math.ceil(self.interval - (now - entry[1]))} s")
        try:
            ok, why = entry[0]()
        except Exception:
            log.exception("xray-tui: the %s request handler failed; removed", what)
            self._kinds.pop(what, None)
            return what, False, "failed in the probe"
        if ok:
            entry[1] = now
        return what, ok, why
