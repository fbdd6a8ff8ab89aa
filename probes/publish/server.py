"""The probe's publisher: one background thread that owns all I/O.

The training thread only calls :meth:`Publisher.submit` with a zero-argument
callable that builds a message; the call never blocks (a full queue drops
its oldest item and counts it). The publisher thread builds the messages,
runs the alert rules, records frames to the log file, keeps a bounded
backlog for viewers that attach late, and writes to every connected viewer
through non-blocking sockets with a bounded buffer each, so a slow, stopped
or killed viewer never slows training. Nothing here imports torch.

Failures stay inside the part that failed, each with one logged warning:
the recording stops on a write error, the rules stop if they raise, a
listener that raises is removed, a viewer whose socket misbehaves is
dropped, and if the thread itself dies it cleans up and :meth:`submit`
becomes a no-op. Nothing ever reaches the training thread.

Viewers connect over the Unix socket (checked: the peer must be the same
user) or, when asked, over TCP on 127.0.0.1 with a random token that only
the owner can read (a 0600 file in the 0700 run directory). A TCP viewer
must send :func:`handshake` within :data:`HANDSHAKE_TIMEOUT` seconds or is
closed. After that a viewer may send :class:`probes.protocol.wire.Request` frames
(at most :data:`probes.protocol.wire.MAX_REQUEST` bytes each) and nothing else: a
request for a kind registered with :meth:`Publisher.on_request` calls its
callback at most once per ``request_interval`` seconds (all viewers
together), and the asking viewer alone gets a ``request`` Note saying
whether it was accepted; anything else a viewer sends is read and thrown
away (:class:`probes.protocol.wire.RequestReader`). Nothing received is evaluated.
"""

from __future__ import annotations

import heapq
import hmac
import itertools
import logging
import math
import os
import queue
import secrets
import selectors
import socket
import struct
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import msgspec

from probes.protocol import rundir, wire
from probes.rules.engine import RuleEngine

log = logging.getLogger("xray-tui")

Listener = Callable[[wire.Message], None]

#: A TCP viewer sends ``TOKEN_PREFIX + token + b"\n"`` first; a token is 32 hex digits.
TOKEN_PREFIX = b"XRAYTOK1 "
TOKEN_LEN = 32
HANDSHAKE_LEN = len(TOKEN_PREFIX) + TOKEN_LEN + 1
#: Seconds a TCP connection has to send the handshake before it is closed.
HANDSHAKE_TIMEOUT = 1.0
#: New connections accepted per second at most. Each one costs the publisher thread the
#: backlog's worth of work while holding the GIL, so a connect storm would otherwise slow
#: training; beyond the rate, connections wait in the kernel's listen queue.
ACCEPT_RATE = 20
#: Seconds between two accepted requests of one kind (all viewers together).
REQUEST_INTERVAL = 10.0
#: Seconds between two answers to one viewer; requests beyond are dropped unanswered.
REPLY_INTERVAL = 1.0

#: A request callback returns (accepted, reason); the reason is shown to the viewer.
RequestCallback = Callable[[], "tuple[bool, str]"]

#: Connections the kernel keeps waiting for accept() on each listener.
LISTEN_BACKLOG = 16


def handshake(token: str) -> bytes:
    """The bytes a TCP viewer sends first to prove it holds ``token``."""
    return TOKEN_PREFIX + token.encode("ascii", "replace")[:TOKEN_LEN].ljust(TOKEN_LEN, b"?") + b"\n"


def parse_tcp(spec: str | int | bool) -> tuple[str, int]:
    """``True`` / ``PORT`` / ``"HOST:PORT"`` -> (host, port); host defaults to 127.0.0.1, port 0 = any free."""
    if spec is True:
        return "127.0.0.1", 0
    if isinstance(spec, int):
        return "127.0.0.1", spec
    host, _, port = str(spec).rpartition(":")
    try:
        return (host or "127.0.0.1").strip("[]"), int(port)
    except ValueError:
        raise ValueError(f"tcp must be PORT or HOST:PORT, got {spec!r}") from None


def _peer_uid(sock: socket.socket) -> int | None:
    """The uid of a Unix socket's peer (Linux SO_PEERCRED), or None where unknown."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    except OSError:
        return None
    return uid


class _Viewer:
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


class _Pending:
    """A TCP connection that has not yet sent its token."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.deadline = time.monotonic() + HANDSHAKE_TIMEOUT


class Recorder:
    """Appends frames to a recording file, flushed after each frame.

    A write error (disk full, file too large) or the file's removal is
    reported once; recording stops and training goes on. Everything written
    before stays readable: replay stops at the last whole frame.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.f = open(path, "ab")
        self._ino = os.fstat(self.f.fileno()).st_ino
        if self.f.tell() == 0:
            self.f.write(wire.MAGIC)

    def write(self, frame: bytes) -> None:
        if self.f is None:
            return
        try:
            self.f.write(frame)
            self.f.flush()
            # writing to a removed file succeeds and fills the disk invisibly: notice it
            if os.fstat(self.f.fileno()).st_nlink == 0:
                raise OSError(f"the file was removed (inode {self._ino})")
        except OSError as exc:
            log.warning("xray-tui: recording to %s stopped: %s; training goes on", self.path, exc)
            self.close()

    @property
    def active(self) -> bool:
        """Whether frames are still being recorded."""
        return self.f is not None

    def close(self) -> None:
        if self.f is not None:
            f, self.f = self.f, None
            try:
                f.close()
            except OSError:
                pass  # the buffered tail is lost; replay reports it as torn


def free_log_path(path: str) -> str:
    """``path`` if it does not exist yet, else the first free ``stem-N.ext``.

    An existing recording is never appended to (it holds another run's
    hello) nor overwritten.
    """
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    for n in itertools.count(1):
        candidate = f"{stem}-{n}{ext}"
        if not os.path.exists(candidate):
            return candidate
    raise AssertionError("unreachable")


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
        self.request_interval = request_interval
        #: kind -> [callback, monotonic time of the last accepted request]
        self._requests: dict[str, list] = {}
        self.rules = rules if rules is not None else RuleEngine()
        self.rules.set_hello(hello)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        #: Frames dropped for slow or stopped viewers, all viewers together.
        self.viewer_drops = 0
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
        self._viewers: dict[int, _Viewer] = {}
        self._pending: dict[int, _Pending] = {}
        self._viewer_buffer = viewer_buffer
        self._max_viewers = max_viewers
        self._last_step = 0
        self._accepts: deque[float] = deque()  # times of recent accepts, for ACCEPT_RATE
        self._paused_until = 0.0  # listeners are off the selector until then
        self._rules_on = True
        self._dead = False
        self._closing = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.recorder: Recorder | None = None
        if log_path:
            try:
                self.recorder = Recorder(free_log_path(log_path))
            except OSError as exc:
                log.warning("xray-tui: cannot record to %s: %s; training goes on unrecorded", log_path, exc)
        if self.recorder:
            self.recorder.write(self._hello_frame)
        self.socket_path: Path | None = None
        self.manifest_path: Path | None = None
        self.token_path: Path | None = None
        #: "host:port" of the TCP listener, when there is one.
        self.tcp_address: str | None = None
        #: The TCP token (also in ``token_path``, readable by the owner only).
        self.token: str | None = None
        self._listen: socket.socket | None = None
        self._listen_tcp: socket.socket | None = None
        if serve:
            try:
                self._open_socket(tcp)
            except (rundir.RunDirError, OSError, ValueError) as exc:
                log.warning("xray-tui: not serving viewers: %s", exc)  # training goes on
                self._close_listeners()
        self._thread = threading.Thread(target=self._run, name="xray-tui-publisher", daemon=True)
        self._thread.start()

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
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the wake-up pipe is full: the thread is awake anyway

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
        self._requests[what] = [callback, -math.inf]
        if what not in self.hello.accepts:  # the probe usually lists it up front, so the recording agrees
            self.hello = msgspec.structs.replace(self.hello, accepts=sorted({*self.hello.accepts, what}))
            self._hello_frame = wire.encode(self.hello)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop serving and remove the socket."""
        if self._closing.is_set():
            return
        self._closing.set()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        self._thread.join(timeout)

    # -- publisher thread -------------------------------------------------

    def _open_socket(self, tcp) -> None:
        d = rundir.ensure_run_dir()
        stem = f"{rundir.safe_name(self.hello.run)}-{self.hello.pid}-r{self.hello.rank}"
        path = d / f"{stem}.sock"
        if path.exists() or path.is_symlink():
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listen = sock
        # the directory is 0700, so nobody else can reach the socket between bind and chmod
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self._sel.register(sock, selectors.EVENT_READ, "listen")
        self.socket_path = path
        tcp_address = ""
        if tcp not in (None, False):
            host, port = parse_tcp(tcp)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            t = socket.socket(family, socket.SOCK_STREAM)
            self._listen_tcp = t
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.bind((host, port))
            t.listen(LISTEN_BACKLOG)
            t.setblocking(False)
            self.token = secrets.token_hex(TOKEN_LEN // 2)
            self.token_path = d / f"{stem}.token"
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.token + "\n")
            bound = t.getsockname()
            tcp_address = f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
            self.tcp_address = tcp_address
            self._sel.register(t, selectors.EVENT_READ, "listen-tcp")
            # the token itself is never logged: logs are often readable by others
            log.warning("xray-tui: TCP viewers on %s; token in %s (readable by you only)",
                        tcp_address, self.token_path)
        self.manifest_path = d / f"{stem}.json"
        rundir.Manifest(
            run=self.hello.run,
            pid=self.hello.pid,
            rank=self.hello.rank,
            world_size=self.hello.world_size,
            started=self.hello.started,
            argv=list(self.hello.argv),
            socket=str(path),
            protocol=wire.PROTOCOL_VERSION,
            tcp=tcp_address,
            log=os.path.abspath(self.recorder.path) if self.recorder else "",
            nodes=len(set(self.hello.hosts)) or 1,
        ).write(self.manifest_path)

    def _close_listeners(self) -> None:
        for s in (self._listen, self._listen_tcp):
            if s is not None:
                try:
                    self._sel.unregister(s)
                except (KeyError, ValueError):
                    pass
                s.close()
        self._listen = self._listen_tcp = None
        for path in (self.socket_path, self.manifest_path, self.token_path):
            if path is not None:
                try:
                    path.unlink()
                except OSError:
                    pass
        self.socket_path = self.manifest_path = self.token_path = None

    def _run(self) -> None:
        try:
            while True:
                for key, events in self._sel.select(timeout=self._select_timeout()):
                    self._on_event(key, events)
                self._resume_listeners()
                self._expire_handshakes()
                self._drain()
                if self._closing.is_set() and self.queue.empty():
                    break
            self._finish()
        except Exception:  # the probe's own failure must never reach training
            self._dead = True
            self._drain_queue()
            log.exception("xray-tui: the publisher failed and is switched off; training goes on")
            self._cleanup()

    def _select_timeout(self) -> float:
        deadlines = [p.deadline for p in self._pending.values()]
        if self._paused_until:
            deadlines.append(self._paused_until)
        if not deadlines:
            return 0.5
        return min(0.5, max(0.0, min(deadlines) - time.monotonic()))

    def _rate_limited(self) -> bool:
        """True (and the listeners paused) when ACCEPT_RATE accepts happened in the last second."""
        now = time.monotonic()
        while self._accepts and self._accepts[0] <= now - 1.0:
            self._accepts.popleft()
        if len(self._accepts) < ACCEPT_RATE:
            self._accepts.append(now)
            return False
        self._paused_until = self._accepts[0] + 1.0
        for s in (self._listen, self._listen_tcp):
            if s is not None:
                try:
                    self._sel.unregister(s)
                except (KeyError, ValueError):
                    pass
        return True

    def _resume_listeners(self) -> None:
        if not self._paused_until or time.monotonic() < self._paused_until:
            return
        self._paused_until = 0.0
        for s, tag in ((self._listen, "listen"), (self._listen_tcp, "listen-tcp")):
            if s is not None:
                self._sel.register(s, selectors.EVENT_READ, tag)

    def _on_event(self, key, events) -> None:
        if key.data == "wake":
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        elif key.data == "listen":
            self._accept(self._listen, tcp=False)
        elif key.data == "listen-tcp":
            self._accept(self._listen_tcp, tcp=True)
        elif key.data == "pending":
            self._on_handshake(key.fd)
        else:
            viewer = self._viewers.get(key.fd)
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
                        self._drop_viewer(viewer)
                        return
                    if data:
                        for req in viewer.requests.feed(data):
                            self._on_request(viewer, req)
                if events & selectors.EVENT_WRITE:
                    self._flush_viewer(viewer)
            except Exception:  # one viewer's trouble never stops the others
                log.exception("xray-tui: dropped a viewer after an error")
                self._drop_viewer(viewer)

    def _on_request(self, viewer: _Viewer, req: wire.Request) -> None:
        """Rate-limit a viewer's request, call its callback, answer that viewer alone."""
        now = time.monotonic()
        if now - viewer.replied < REPLY_INTERVAL:
            return  # a viewer repeating itself faster than once a second is not answered
        viewer.replied = now
        entry = self._requests.get(req.what)
        what = req.what if entry is not None else "?"  # never echo a kind we do not know
        if entry is None:
            ok, why = False, "not available: this probe does not take that request"
        elif now - entry[1] < self.request_interval:
            ok, why = False, (f"rate limited: one per {self.request_interval:g} s; "
                              f"try again in {math.ceil(self.request_interval - (now - entry[1]))} s")
        else:
            try:
                ok, why = entry[0]()
            except Exception:
                log.exception("xray-tui: the %s request handler failed; removed", req.what)
                self._requests.pop(req.what, None)
                ok, why = False, "failed in the probe"
            if ok:
                entry[1] = now
        if viewer.sock.fileno() in self._viewers:
            viewer.push(wire.encode(wire.Note(self._last_step, self.hello.rank, "request", {
                "what": what, "accepted": bool(ok), "reason": str(why)[:200]})), counted=False)
            self._flush_viewer(viewer)

    def _accept(self, listener: socket.socket | None, tcp: bool) -> None:
        if listener is None or self._rate_limited():
            return
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # e.g. out of file descriptors: the viewer sees a closed connection
        if len(self._viewers) + len(self._pending) >= self._max_viewers:
            conn.close()
            return
        if not tcp:
            uid = _peer_uid(conn)
            if uid is not None and uid != os.getuid():
                conn.close()  # another user reached the socket despite 0600/0700: refuse
                return
        conn.setblocking(False)
        if tcp:
            self._pending[conn.fileno()] = _Pending(conn)
            self._sel.register(conn, selectors.EVENT_READ, "pending")
            return
        self._start_viewer(conn)

    def _accept_waiting(self) -> None:
        """At the end, serve the Unix viewers still in the listen queue.

        They connected before the run ended, so they get the whole stream
        up to its End frame rather than a connection reset. Bounded by the
        listen backlog; the accept rate limit does not apply to this one pass.
        """
        self._accepts.clear()
        for _ in range(LISTEN_BACKLOG):
            before = len(self._viewers)
            self._accept(self._listen, tcp=False)
            if len(self._viewers) == before:
                return

    def _on_handshake(self, fd: int) -> None:
        p = self._pending.get(fd)
        if p is None:
            return
        try:
            data = p.sock.recv(HANDSHAKE_LEN - len(p.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        p.buf += data
        if not data or not TOKEN_PREFIX.startswith(p.buf[: len(TOKEN_PREFIX)]):
            self._close_pending(p)  # closed, or speaking something else: no need to wait
            return
        if len(p.buf) < HANDSHAKE_LEN:
            return
        self._close_pending(p, keep=True)
        if self.token and hmac.compare_digest(p.buf, handshake(self.token)):
            self._start_viewer(p.sock)
        else:
            p.sock.close()

    def _close_pending(self, p: _Pending, keep: bool = False) -> None:
        self._pending.pop(p.sock.fileno(), None)
        try:
            self._sel.unregister(p.sock)
        except (KeyError, ValueError):
            pass
        if not keep:
            p.sock.close()

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        for p in [p for p in self._pending.values() if p.deadline <= now]:
            self._close_pending(p)

    def _start_viewer(self, conn: socket.socket) -> None:
        viewer = _Viewer(conn, self._viewer_buffer)
        viewer.push(wire.MAGIC + self._hello_frame)
        for _, frame in heapq.merge(self._steps, self._other, self._scalars):
            viewer.push(frame)
        self.viewer_drops += viewer.dropped  # a backlog larger than the viewer's buffer
        if self.viewer_drops or self.dropped:
            # a newcomer learns that others, or the probe's queue, lost frames
            viewer.push(self._drops_note(viewer), counted=False)
        self._viewers[conn.fileno()] = viewer
        self._sel.register(conn, selectors.EVENT_READ, "viewer")
        self._flush_viewer(viewer)

    def _drops_note(self, viewer: _Viewer) -> bytes:
        """A ``drops`` Note for ``viewer``: its own lost frames and everyone's."""
        viewer.reported = viewer.dropped
        return wire.encode(wire.Note(self._last_step, self.hello.rank, "drops", {
            "frames": viewer.dropped,  # frames this viewer did not get because it fell behind
            "all_viewers": self.viewer_drops,  # the same, summed over every viewer so far
            "queue": self.dropped,  # step samples the probe itself dropped (Step.drops)
        }))

    def _flush_viewer(self, viewer: _Viewer) -> None:
        if not viewer.flush():
            self._drop_viewer(viewer)
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if viewer.out else 0)
        self._sel.modify(viewer.sock, mask, "viewer")

    def _drop_viewer(self, viewer: _Viewer) -> None:
        self._viewers.pop(viewer.sock.fileno(), None)
        try:
            self._sel.unregister(viewer.sock)
        except (KeyError, ValueError):
            pass
        viewer.sock.close()

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
        for viewer in list(self._viewers.values()):
            before = viewer.dropped
            viewer.push(frame)
            if viewer.dropped > before:
                self.viewer_drops += viewer.dropped - before
            if viewer.dropped > viewer.reported:
                # tell the viewer, in its stream, how much it lost (a tiny frame, never counted)
                viewer.push(self._drops_note(viewer), counted=False)
            self._flush_viewer(viewer)
        for listener in list(self._listeners):
            try:
                listener(msg)
            except Exception:
                log.exception("xray-tui: a listener failed; removed")
                self._listeners.remove(listener)

    def _finish(self) -> None:
        """Give viewers a moment to take the last frames, then clean up."""
        self._accept_waiting()
        deadline = time.monotonic() + 2.0
        while any(v.out for v in self._viewers.values()) and time.monotonic() < deadline:
            for viewer in list(self._viewers.values()):
                self._flush_viewer(viewer)
            time.sleep(0.01)
        self._cleanup()

    def _drain_queue(self) -> None:
        # Builders queued before the failure hold tensors; release them, since nothing will run them now.
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                return

    def _cleanup(self) -> None:
        for viewer in list(self._viewers.values()):
            self._drop_viewer(viewer)
        for p in list(self._pending.values()):
            self._close_pending(p)
        self._close_listeners()
        if self.recorder:
            self.recorder.close()
