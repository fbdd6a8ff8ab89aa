"""The publisher thread's sockets: every viewer connection of one rank's stream.

:class:`Viewers` waits on one selector for the listeners, the TCP
connections still owing their handshake, the connected viewers and a
wake-up pair the training thread pokes. It accepts at most
:data:`ACCEPT_RATE` connections a second (each costs the thread a backlog's
worth of work while holding the GIL, so a connect storm would otherwise slow
training; beyond the rate they wait in the kernel's listen queue), refuses
other users and wrong tokens, answers viewers' requests, and writes to every
viewer through non-blocking sockets with a bounded buffer each
(:class:`Viewer`), so a slow, stopped or killed viewer never slows training.
A viewer whose socket misbehaves is dropped; the others go on.
"""

from __future__ import annotations

import logging
import math
import selectors
import socket
import time
from collections import deque
from typing import Callable, Iterable

from probes.protocol import wire
from probes.publish.endpoints import LISTEN_BACKLOG, Endpoints
from probes.publish.handshake import Pending, same_user
from probes.publish.requests import Requests

log = logging.getLogger("xray-tui")

#: New connections accepted per second at most (see the module docstring).
ACCEPT_RATE = 20
#: Seconds between two answers to one viewer; requests beyond are dropped unanswered.
REPLY_INTERVAL = 1.0


class Viewer:
    """One connected viewer and the frames waiting to be written to it.

    ``out`` holds (frame, counted) pairs: frames dropped for want of room
    are counted in ``dropped`` unless they were our own drop notes.
    """

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        self.out: deque[tuple[bytes, bool]] = deque()
        self.offset = 0  # bytes of out[0] already sent
        self.bytes = 0
        self.limit = limit
        self.dropped = 0
        self.reported = 0  # drops the viewer has been told about (queued a note for)
        self.requests = wire.RequestReader()  # what the viewer sends: Request frames or ignored
        self.replied = -math.inf  # monotonic time of the last answer to a request

    def push(self, frame: bytes, counted: bool = True) -> None:
        """Queue ``frame``, dropping the oldest unsent frames beyond the limit."""
        self.out.append((frame, counted))
        self.bytes += len(frame)
        # drop whole frames that have not started to go out, oldest first;
        # out[0] may be half sent, and the newest frame is the one to keep
        while self.bytes > self.limit and len(self.out) > 2:
            old, was_counted = self.out[1]
            del self.out[1]
            self.bytes -= len(old)
            self.dropped += was_counted

    def flush(self) -> bool:
        """Write what the socket takes now; False once the viewer is gone."""
        while self.out:
            head = self.out[0][0]
            try:
                n = self.sock.send(memoryview(head)[self.offset :])
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            self.offset += n
            if self.offset < len(head):
                return True
            self.out.popleft()
            self.bytes -= len(head)
            self.offset = 0
        return True


class Viewers:
    """Every connection to viewers of one stream, served on the publisher thread.

    The stream is the publisher's, reached through three callables:
    ``greeting()`` gives a newcomer's first frames (the magic and Hello,
    then the backlog), ``note(event, data)`` encodes a Note at the stream's
    latest step, and ``queue_drops()`` counts the samples the probe's own
    queue dropped. Each viewer buffers at most ``buffer`` bytes; at most
    ``max_viewers`` are served (or waiting for their handshake) at once.
    """

    def __init__(self, requests: Requests, *, greeting: Callable[[], Iterable[bytes]],
                 note: Callable[[str, dict], bytes], queue_drops: Callable[[], int],
                 buffer: int, max_viewers: int) -> None:
        self.requests = requests
        self.buffer = buffer
        self.max_viewers = max_viewers
        #: Connected viewers, by socket fd.
        self.connected: dict[int, Viewer] = {}
        #: TCP connections that have not yet sent their token, by socket fd.
        self.pending: dict[int, Pending] = {}
        #: Frames dropped for slow or stopped viewers, all viewers together.
        self.drops = 0
        self._greeting = greeting
        self._note = note
        self._queue_drops = queue_drops
        self._endpoints: Endpoints | None = None
        self._accepts: deque[float] = deque()  # times of recent accepts, for ACCEPT_RATE
        self._paused_until = 0.0  # listeners are off the selector until then
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    # -- any thread -------------------------------------------------------

    def wake(self) -> None:
        """Cut the publisher thread's wait short (the training thread queued something)."""
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the wake-up pipe is full: the thread is awake anyway

    def listen(self, endpoints: Endpoints) -> None:
        """Accept viewers on ``endpoints``' listeners (before the publisher thread starts)."""
        self._endpoints = endpoints
        self._watch_listeners(True)

    # -- publisher thread -------------------------------------------------

    def poll(self) -> None:
        """Wait (at most half a second) for the sockets, then serve what is ready."""
        for key, events in self._sel.select(timeout=self._select_timeout()):
            self._on_event(key, events)
        self._resume_listeners()
        self._expire_handshakes()

    def send(self, frame: bytes) -> None:
        """Queue ``frame`` for every viewer, telling each, in its stream, what it lost."""
        for viewer in list(self.connected.values()):
            before = viewer.dropped
            viewer.push(frame)
            self.drops += viewer.dropped - before
            if viewer.dropped > viewer.reported:
                # tell the viewer, in its stream, how much it lost (a tiny frame, never counted)
                before = viewer.dropped
                viewer.push(self._drops_note(viewer), counted=False)
                self.drops += viewer.dropped - before  # making room for the note can drop a frame too
            self._flush(viewer)

    def finish(self, wait: float = 2.0) -> None:
        """At the end: serve the Unix viewers still waiting, and give all ``wait`` seconds
        at most to take their last frames."""
        self._accept_waiting()
        deadline = time.monotonic() + wait
        while any(v.out for v in self.connected.values()) and time.monotonic() < deadline:
            for viewer in list(self.connected.values()):
                self._flush(viewer)
            time.sleep(0.01)

    def close(self) -> None:
        """Close every connection and stop listening (the endpoints' files are the owner's)."""
        for viewer in list(self.connected.values()):
            self._drop(viewer)
        for p in list(self.pending.values()):
            self._close_pending(p)
        self._watch_listeners(False)
        self._endpoints = None

    def _select_timeout(self) -> float:
        deadlines = [p.deadline for p in self.pending.values()]
        if self._paused_until:
            deadlines.append(self._paused_until)
        if not deadlines:
            return 0.5
        return min(0.5, max(0.0, min(deadlines) - time.monotonic()))

    def _on_event(self, key, events) -> None:
        if key.data == "wake":
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        elif key.data == "listen":
            self._accept(key.fileobj, tcp=False)
        elif key.data == "listen-tcp":
            self._accept(key.fileobj, tcp=True)
        elif key.data == "pending":
            self._on_handshake(key.fd)
        else:
            viewer = self.connected.get(key.fd)
            if viewer is None:
                return
            try:
                if events & selectors.EVENT_READ:
                    # viewers may only send small Request frames; anything else is thrown away
                    try:
                        data = viewer.sock.recv(4096)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        data = b""
                    if data is not None and not data:
                        self._drop(viewer)
                        return
                    if data:
                        for req in viewer.requests.feed(data):
                            self._on_request(viewer, req)
                if events & selectors.EVENT_WRITE:
                    self._flush(viewer)
            except Exception:  # one viewer's trouble never stops the others
                log.exception("xray-tui: dropped a viewer after an error")
                self._drop(viewer)

    def _on_request(self, viewer: Viewer, req: wire.Request) -> None:
        """Rate-limit a viewer's request, answer it, and tell that viewer alone."""
        now = time.monotonic()
        if now - viewer.replied < REPLY_INTERVAL:
            return  # a viewer repeating itself faster than once a second is not answered
        viewer.replied = now
        what, ok, why = self.requests.answer(req.what, now)
        if viewer.sock.fileno() in self.connected:
            viewer.push(self._note("request", {"what": what, "accepted": bool(ok), "reason": str(why)[:200]}),
                        counted=False)
            self._flush(viewer)

    # -- accepting --------------------------------------------------------

    def _watch_listeners(self, on: bool) -> None:
        """Put the listeners on the selector, or take them off (paused, or closing)."""
        for s, tcp in self._endpoints.listeners if self._endpoints else ():
            if on:
                self._sel.register(s, selectors.EVENT_READ, "listen-tcp" if tcp else "listen")
            else:
                try:
                    self._sel.unregister(s)
                except (KeyError, ValueError):
                    pass

    def _rate_limited(self) -> bool:
        """True (and the listeners paused) when ACCEPT_RATE accepts happened in the last second."""
        now = time.monotonic()
        while self._accepts and self._accepts[0] <= now - 1.0:
            self._accepts.popleft()
        if len(self._accepts) < ACCEPT_RATE:
            self._accepts.append(now)
            return False
        self._paused_until = self._accepts[0] + 1.0
        self._watch_listeners(False)
        return True

    def _resume_listeners(self) -> None:
        if not self._paused_until or time.monotonic() < self._paused_until:
            return
        self._paused_until = 0.0
        self._watch_listeners(True)

    def _accept(self, listener: socket.socket | None, tcp: bool) -> None:
        if listener is None or self._rate_limited():
            return
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # e.g. out of file descriptors: the viewer sees a closed connection
        if len(self.connected) + len(self.pending) >= self.max_viewers:
            conn.close()
            return
        if not tcp and not same_user(conn):
            conn.close()  # another user reached the socket despite 0600/0700: refuse
            return
        conn.setblocking(False)
        if tcp:
            self.pending[conn.fileno()] = Pending(conn)
            self._sel.register(conn, selectors.EVENT_READ, "pending")
            return
        self._start(conn)

    def _accept_waiting(self) -> None:
        """At the end, serve the Unix viewers still in the listen queue.

        They connected before the run ended, so they get the whole stream
        up to its End frame rather than a connection reset. Bounded by the
        listen backlog; the accept rate limit does not apply to this one pass.
        """
        self._accepts.clear()
        unix = self._endpoints.unix if self._endpoints else None
        for _ in range(LISTEN_BACKLOG):
            before = len(self.connected)
            self._accept(unix, tcp=False)
            if len(self.connected) == before:
                return

    def _on_handshake(self, fd: int) -> None:
        p = self.pending.get(fd)
        if p is None:
            return
        proved = p.read(self._endpoints.token if self._endpoints else None)
        if proved is None:
            return
        self._close_pending(p, keep=proved)
        if proved:
            self._start(p.sock)

    def _close_pending(self, p: Pending, keep: bool = False) -> None:
        self.pending.pop(p.sock.fileno(), None)
        try:
            self._sel.unregister(p.sock)
        except (KeyError, ValueError):
            pass
        if not keep:
            p.sock.close()

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        for p in [p for p in self.pending.values() if p.deadline <= now]:
            self._close_pending(p)

    # -- one viewer -------------------------------------------------------

    def _start(self, conn: socket.socket) -> None:
        viewer = Viewer(conn, self.buffer)
        for frame in self._greeting():
            viewer.push(frame)
        self.drops += viewer.dropped  # a backlog larger than the viewer's buffer
        if self.drops or self._queue_drops():
            # a newcomer learns that others, or the probe's queue, lost frames
            viewer.push(self._drops_note(viewer), counted=False)
        self.connected[conn.fileno()] = viewer
        self._sel.register(conn, selectors.EVENT_READ, "viewer")
        self._flush(viewer)

    def _drops_note(self, viewer: Viewer) -> bytes:
        """A ``drops`` Note for ``viewer``: its own lost frames and everyone's."""
        viewer.reported = viewer.dropped
        return self._note("drops", {
            "frames": viewer.dropped,  # frames this viewer did not get because it fell behind
            "all_viewers": self.drops,  # the same, summed over every viewer so far
            "queue": self._queue_drops(),  # step samples the probe itself dropped (Step.drops)
        })

    def _flush(self, viewer: Viewer) -> None:
        if not viewer.flush():
            self._drop(viewer)
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if viewer.out else 0)
        self._sel.modify(viewer.sock, mask, "viewer")

    def _drop(self, viewer: Viewer) -> None:
        self.connected.pop(viewer.sock.fileno(), None)
        try:
            self._sel.unregister(viewer.sock)
        except (KeyError, ValueError):
            pass
        viewer.sock.close()
