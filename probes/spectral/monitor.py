"""Spectral health during training: a background thread that analyses the probe's model.

:class:`SpectralMonitor` runs the pass at a low cadence (``spectral_every``
steps, or when a viewer asks) and sends one :class:`probes.protocol.wire.Spectral`
per matrix plus ``spectral`` alerts through the probe's publisher.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from probes.rules.spectral import SpectralAlerts
from probes.spectral.analysis import Metrics, analyze_matrix
from probes.spectral.matrices import Target, targets

log = logging.getLogger("xray-tui")


class SpectralMonitor:
    """Runs the spectral pass of a probe's model in a background thread.

    Every ``every`` steps (and on :meth:`request`) the thread walks the target
    matrices one at a time: it copies the weight between optimizer steps (a
    sequence counter bumped by the optimizer's pre- and post-step hooks tells
    it when a copy may have raced an update; it then copies again), computes
    the metrics on the weight's device (on a side CUDA stream on GPUs), and
    hands a :class:`wire.Spectral` per matrix, and any ``spectral`` alert, to
    the probe's publisher. The training thread only bumps a counter per step.
    """

    def __init__(self, xr, every: int = 500, *, max_dim: int = 4096, bins: int = 32,
                 alerts: SpectralAlerts | None = None, poll: float = 0.2) -> None:
        if every < 1:
            raise ValueError(f"spectral_every must be >= 1, got {every}")
        self.xr = xr
        self.every = every
        self.max_dim = max_dim
        self.bins = bins
        rules = getattr(getattr(xr, "publisher", None), "rules", None)  # attach(rules=...): its [spectral] bands
        self.alerts = alerts if alerts is not None else SpectralAlerts(config=getattr(rules, "config", None))
        self.poll = poll
        self.passes = 0  # completed passes
        self.last: dict[str, Metrics] = {}
        self._seq = 0  # odd while an optimizer step runs
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._requested = False
        self._next = every  # the step of the next scheduled pass
        self._handles = []
        self._running = False  # a pass is in progress
        # the optimizer the probe hooks itself (an integration's, e.g. accelerate's wrapper, is not)
        opt = getattr(xr, "optimizer", None) if getattr(xr, "_hooked", True) else None
        if opt is not None:
            self._handles.append(opt.register_step_pre_hook(self._bump))
            self._handles.append(opt.register_step_post_hook(self._bump))
        self._thread = threading.Thread(target=self._run, name="xray-tui-spectral", daemon=True)
        self._thread.start()
        pub = getattr(xr, "publisher", None)
        if pub is not None and hasattr(pub, "on_request"):
            pub.on_request("spectral", self.viewer_request)  # the app's key asks for a pass

    def _bump(self, *_) -> None:
        self._seq += 1  # training thread: one integer add per hook call

    def request(self) -> None:
        """Run a pass as soon as possible (on demand, e.g. from the app)."""
        self._requested = True
        self._wake.set()

    def viewer_request(self) -> tuple[bool, str]:
        """A viewer asked for a pass (publisher thread): at most one pass in flight.

        Returns (accepted, reason) for the viewer. A request while a pass
        runs or is already due is refused, so viewers cannot queue up work;
        the publisher also limits how often this is called.
        """
        if self._closed() or not self._thread.is_alive():
            return False, "the spectral monitor has stopped"
        if self._running or self._requested:
            return False, "a spectral pass is already running"
        self.request()
        return True, "spectral pass started"

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (a pass in progress stops after its current matrix)."""
        self._stop.set()
        self._wake.set()
        for h in self._handles:
            h.remove()
        self._thread.join(timeout)

    def wait_pass(self, n: int = 1, timeout: float = 60.0) -> bool:
        """Block until ``n`` passes have completed (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        while self.passes < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.passes >= n

    def _closed(self) -> bool:
        return self._stop.is_set() or getattr(self.xr, "_closed", False)

    def _due(self) -> int | None:
        step = self.xr.step_index
        if self._requested or step >= self._next:
            self._running = True  # before the flag drops, so a viewer never sees neither
            self._requested = False
            self._next = (step // self.every + 1) * self.every
            return step
        return None

    def _run(self) -> None:
        try:
            while not self._closed():
                self._wake.wait(self.poll)
                self._wake.clear()
                if self._closed():
                    break
                step = self._due()
                if step is not None:
                    try:
                        self._pass(step)
                    finally:
                        self._running = False
                    self.passes += 1
        except Exception:  # the probe's own failure must never reach training
            log.exception("xray-tui: the spectral monitor failed and is switched off")
        finally:
            for h in self._handles:
                h.remove()

    def _snapshot(self, t: Target, stream) -> torch.Tensor:
        """A copy of the target's weight taken while no optimizer step ran."""
        for _ in range(20):
            s1 = self._seq
            if s1 % 2:
                time.sleep(0.001)
                continue
            if stream is not None:
                stream.wait_stream(torch.cuda.default_stream(t.param.device))
                with torch.cuda.stream(stream):
                    w = t.tensor().clone()
                stream.synchronize()
            else:
                w = t.tensor().clone()
            if self._seq == s1:
                return w
        # training steps back to back without a gap (or always mid-step when we looked): a copy at most
        # one update off
        return t.tensor().clone()

    def _pass(self, step: int) -> None:
        tg, _ = targets(self.xr.model)
        rank = self.xr.rank
        pub = self.xr.publisher
        for t in tg:
            if self._closed():
                return
            dev = t.param.device
            stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
            try:
                with torch.no_grad():
                    w = self._snapshot(t, stream)
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            m = analyze_matrix(w, t.name, max_dim=self.max_dim, bins=self.bins)
                    else:
                        m = analyze_matrix(w, t.name, max_dim=self.max_dim, bins=self.bins)
            except Exception:
                log.exception("xray-tui: spectral metrics of %s failed; skipped", t.name)
                continue
            del w
            self.last[t.name] = m
            msg = m.to_wire(step, rank, self.alerts.untrusted(m))
            pub.submit(lambda msg=msg: msg)
            alert = self.alerts.evaluate(m, step, rank)
            if alert is not None and rank == 0:  # replicated weights: rank 0 speaks for the job (all judge)
                pub.submit(lambda a=alert: a)
