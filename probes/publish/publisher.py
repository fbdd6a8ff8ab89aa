"""The probe's publisher: one background thread that owns all I/O.

The training thread only calls :meth:`Publisher.submit` with a zero-argument
callable that builds a message; the call never blocks (a full queue drops
its oldest item and counts it). The publisher thread builds the messages,
runs the alert rules, records frames (:mod:`~probes.publish.recorder`),
keeps a bounded backlog for viewers that attach late, and hands each frame
to every connected viewer (:mod:`~probes.publish.viewers`), so a slow,
stopped or killed viewer never slows training. Nothing here imports torch.

Failures stay inside the part that failed, each with one logged warning:
the recording stops on a write error, the rules stop if they raise, a
listener that raises is removed, a viewer whose socket misbehaves is
dropped, and if the thread itself dies it cleans up and :meth:`submit`
becomes a no-op. Nothing ever reaches the training thread.

Viewers connect over the Unix socket (checked: the peer must be the same
user) or, when asked, over TCP on 127.0.0.1 with a random token that only
the owner can read (:mod:`~probes.publish.endpoints`,
:mod:`~probes.publish.handshake`). After that a viewer may send
:class:`probes.protocol.wire.Request` frames and nothing else: a request
for a kind registered with :meth:`Publisher.on_request` calls its callback
at most once per ``request_interval`` seconds (all viewers together), and
the asking viewer alone gets a ``request`` Note saying whether it was
accepted (:mod:`~probes.publish.requests`). Nothing received is evaluated.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import msgspec

from probes.protocol import rundir, wire
from probes.publish.endpoints import Endpoints
from probes.publish.recorder import Recorder, free_log_path
from probes.publish.requests import REQUEST_INTERVAL, RequestCallback, Requests
from probes.publish.viewers import Viewers
from probes.rules.engine import RuleEngine

log = logging.getLogger("xray-tui")

Listener = Callable[[wire.Message], None]


class Publisher:
    """Serves one rank's stream; see the module docstring.

    Memory is bounded: the queue holds ``queue_size`` step builders, the
    backlog the newest ``backlog_steps`` Step frames that fit in
    ``backlog_bytes`` (at least one) and ``backlog_alerts`` others, and
    each viewer at most ``viewer_buffer`` bytes of frames (frames are shared
    with the backlog and between viewers, not copied). At most
    ``max_viewers`` viewers are served at once; more are closed at once.
    """

    def __init__(
        self,
        hello: wire.Hello,
        *,
        serve: bool = True,
        log_path: str | None = None,
        rules: RuleEngine | None = None,
        queue_size: int = 64,
        backlog_steps: int = 512,
        backlog_bytes: int = 32 * 1024 * 1024,
        backlog_alerts: int = 2000,
        backlog_scalars: int = 8192,
        viewer_buffer: int = 64 * 1024 * 1024,
        max_viewers: int = 64,
        tcp: str | int | bool | None = None,
        request_interval: float = REQUEST_INTERVAL,
    ) -> None:
        self.hello = hello
        self.requests = Requests(request_interval)
        self.rules = rules if rules is not None else RuleEngine()
        self.rules.set_hello(hello)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        self._listeners: list[Listener] = []
        self._listeners.append(self.rules.note)  # a precision Note (autocast seen) sets the rules' hints
        self._hello_frame = wire.encode(hello)
        self._seq = itertools.count()
        self._steps: deque[tuple[int, bytes]] = deque()
        self._backlog_steps = backlog_steps
        # a large model's Step frame is ~0.3-1 MiB: 512 of them would cost more than the probe may
        self._backlog_bytes = backlog_bytes
        #: Bytes of the Step frames in the backlog.
        self.backlog_size = 0
        self._other: deque[tuple[int, bytes]] = deque(maxlen=backlog_alerts)
        # a Scalars frame every training step (~60 bytes): a backlog of its own, so a long run's
        # scalars never push the alerts and notes out of a late viewer's history
        self._scalars: deque[tuple[int, bytes]] = deque(maxlen=backlog_scalars)
        self._last_step = 0
        self._rules_on = True
        self._dead = False
        self._closing = threading.Event()
        #: The viewers' connections, served on the publisher thread.
        self.viewers = Viewers(self.requests, greeting=self._greeting, note=self._note,
                               queue_drops=lambda: self.dropped, buffer=viewer_buffer, max_viewers=max_viewers)
        self.recorder: Recorder | None = None
        if log_path:
            try:
                self.recorder = Recorder(free_log_path(log_path), note=self._note)  # says why, if it stops
            except OSError as exc:
                log.warning("xray-tui: cannot record to %s: %s; training goes on unrecorded", log_path, exc)
        if self.recorder:
            self.recorder.write(self._hello_frame)
        #: The socket, manifest and token files, and the TCP address (all None when not serving).
        self.endpoints = Endpoints()
        if serve:
            try:
                self.endpoints.open(hello, tcp, os.path.abspath(self.recorder.path) if self.recorder else "")
                self.viewers.listen(self.endpoints)
            except (rundir.RunDirError, OSError, ValueError) as exc:
                log.warning("xray-tui: not serving viewers: %s", exc)  # training goes on
                self.endpoints.close()
        self._thread = threading.Thread(target=self._run, name="xray-tui-publisher", daemon=True)
        self._thread.start()

    # -- where viewers reach this rank, and how they fare (the parts' state, read here) --

    @property
    def socket_path(self) -> Path | None:
        """The Unix socket viewers connect to (None when not serving)."""
        return self.endpoints.socket_path

    @property
    def manifest_path(self) -> Path | None:
        """The run's manifest in the run directory (None when not serving)."""
        return self.endpoints.manifest_path

    @property
    def token_path(self) -> Path | None:
        """The 0600 file holding the TCP token (None without TCP)."""
        return self.endpoints.token_path

    @property
    def tcp_address(self) -> str | None:
        """"host:port" of the TCP listener, when there is one."""
        return self.endpoints.tcp_address

    @property
    def token(self) -> str | None:
        """The TCP token (also in ``token_path``, readable by the owner only)."""
        return self.endpoints.token

    @property
    def viewer_drops(self) -> int:
        """Frames dropped for slow or stopped viewers, all viewers together."""
        return self.viewers.drops

    @property
    def request_interval(self) -> float:
        """Seconds between two accepted requests of one kind (all viewers together)."""
        return self.requests.interval

    @request_interval.setter
    def request_interval(self, seconds: float) -> None:
        self.requests.interval = seconds

    # the tests watch connections come and go through these two

    # -- training-thread side -------------------------------------------

    def submit(self, build: Callable[[], wire.Message]) -> None:
        """Queue a message builder; never blocks, drops the oldest when full."""
        if self._dead:
            return
        while True:
            try:
                self.queue.put_nowait(build)
                break
            except queue.Full:
                try:
                    self.queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass
        self.viewers.wake()

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(msg)`` on the publisher thread for every message."""
        self._listeners.append(listener)

    def on_request(self, what: str, callback: RequestCallback) -> None:
        """Honour viewers' ``Request(what)`` by calling ``callback`` on the publisher thread.

        ``callback()`` must be quick and return (accepted, reason). It runs
        at most once per ``request_interval`` seconds for all viewers
        together; the Hello sent to viewers from now on lists ``what`` in
        ``accepts``, so a viewer can tell the user what the probe offers.
        """
        self.requests.register(what, callback)
        if what not in self.hello.accepts:  # the probe usually lists it up front, so the recording agrees
            self.hello = msgspec.structs.replace(self.hello, accepts=sorted({*self.hello.accepts, what}))
            self._hello_frame = wire.encode(self.hello)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop serving and remove the socket."""
        if self._closing.is_set():
            return
        self._closing.set()
        self.viewers.wake()
        self._thread.join(timeout)

    # -- publisher thread -------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self.viewers.poll()
                self._drain()
                if self._closing.is_set() and self.queue.empty():
                    break
            self.viewers.finish()  # give viewers a moment to take the last frames
            self._cleanup()
        except Exception:  # the probe's own failure must never reach training
            self._dead = True
            self._drain_queue()
            log.exception("xray-tui: the publisher failed and is switched off; training goes on")
            self._cleanup()

    def _greeting(self) -> Iterator[bytes]:
        """A new viewer's first frames: the magic and Hello, then the backlog in stream order."""
        yield wire.MAGIC + self._hello_frame
        for _, frame in heapq.merge(self._steps, self._other, self._scalars):
            yield frame

    def _note(self, event: str, data: dict) -> bytes:
        """A Note from this rank at the latest step, encoded (for one viewer's stream)."""
        return wire.encode(wire.Note(self._last_step, self.hello.rank, event, data))

    def _drain(self) -> None:
        while True:
            try:
                build = self.queue.get_nowait()
            except queue.Empty:
                return
            try:
                msg = build()
            except Exception:
                log.exception("xray-tui: a sample could not be built; skipped")
                continue
            for m in msg if isinstance(msg, list) else (msg,):  # a builder may make several messages
                self._publish_and_judge(m)

    def _publish_and_judge(self, msg: wire.Message) -> None:
        """Publish ``msg``, then the alerts the rules draw from it (Steps and Scalars)."""
        self._publish(msg)
        if isinstance(msg, (wire.Step, wire.Scalars)) and self._rules_on:
            try:
                alerts = self.rules.evaluate(msg) if isinstance(msg, wire.Step) else self.rules.evaluate_scalars(msg)
            except Exception:
                self._rules_on = False
                log.exception("xray-tui: the alert rules failed and are switched off; training goes on")
                return
            for alert in alerts:
                self._publish(alert)

    def _publish(self, msg: wire.Message) -> None:
        """One message to the backlog, the recording, every viewer and the listeners."""
        if isinstance(msg, wire.Step):
            self._last_step = msg.step
            if self.dropped:
                msg = msgspec.structs.replace(msg, drops=self.dropped)
        frame = wire.encode(msg)
        item = (next(self._seq), frame)
        if isinstance(msg, wire.Step):
            self._steps.append(item)
            self.backlog_size += len(frame)
            while len(self._steps) > 1 and (len(self._steps) > self._backlog_steps
                                            or self.backlog_size > self._backlog_bytes):
                self.backlog_size -= len(self._steps.popleft()[1])
        elif isinstance(msg, wire.Scalars):
            self._scalars.append(item)
        else:
            self._other.append(item)
        if self.recorder:
            self.recorder.write(frame)
        self.viewers.send(frame)
        for listener in list(self._listeners):
            try:
                listener(msg)
            except Exception:
                log.exception("xray-tui: a listener failed; removed")
                self._listeners.remove(listener)

    def _drain_queue(self) -> None:
        # Builders queued before the failure hold tensors; release them, since nothing will run them now.
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                return

    def _cleanup(self) -> None:
        self.viewers.close()
        self.endpoints.close()
        if self.recorder:
            self.recorder.close()
