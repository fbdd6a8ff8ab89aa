"""The probe's publisher: one background thread that owns all I/O.

The training thread only calls :meth:`Publisher.submit` with a zero-argument
callable that builds a message; the call never blocks (a full queue drops
its oldest item and counts it). The publisher thread builds the messages,
runs the alert rules, records frames to the log file, keeps a bounded
backlog for viewers that attach late, and writes to every connected viewer
through non-blocking sockets with a bounded buffer each, so a slow, stopped
or killed viewer never slows training. Nothing here imports torch.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from . import rundir, wire
from .rules import RuleEngine

log = logging.getLogger("xray-tui")

Listener = Callable[[wire.Message], None]


class _Viewer:
    """One connected viewer and the frames waiting to be written to it."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        self.out: deque[bytes] = deque()
        self.offset = 0  # bytes of out[0] already sent
        self.bytes = 0
        self.limit = limit
        self.dropped = 0

    def push(self, frame: bytes) -> None:
        self.out.append(frame)
        self.bytes += len(frame)
        # drop whole frames that have not started to go out, oldest first
        while self.bytes > self.limit and len(self.out) > 2:
            old = self.out[1]
            del self.out[1]
            self.bytes -= len(old)
            self.dropped += 1

    def flush(self) -> bool:
        """Write what the socket takes now; False once the viewer is gone."""
        while self.out:
            head = self.out[0]
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


class Recorder:
    """Appends frames to a recording file, flushed after each frame.

    A write error (disk full, file removed) is reported once; recording stops
    and training goes on.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.f = open(path, "ab")
        if self.f.tell() == 0:
            self.f.write(wire.MAGIC)

    def write(self, frame: bytes) -> None:
        if self.f is None:
            return
        try:
            self.f.write(frame)
            self.f.flush()
        except OSError as exc:
            log.warning("xray-tui: recording to %s stopped: %s", self.path, exc)
            self.close()

    def close(self) -> None:
        if self.f is not None:
            try:
                self.f.close()
            except OSError:
                pass
            self.f = None


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
    """Serves one rank's stream; see the module docstring."""

    def __init__(
        self,
        hello: wire.Hello,
        *,
        serve: bool = True,
        log_path: str | None = None,
        rules: RuleEngine | None = None,
        queue_size: int = 64,
        backlog_steps: int = 512,
        backlog_alerts: int = 2000,
        viewer_buffer: int = 64 * 1024 * 1024,
    ) -> None:
        self.hello = hello
        self.rules = rules if rules is not None else RuleEngine()
        self.rules.set_layers(hello.layers)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        self._listeners: list[Listener] = []
        self._hello_frame = wire.encode(hello)
        self._seq = itertools.count()
        self._steps: deque[tuple[int, bytes]] = deque(maxlen=backlog_steps)
        self._other: deque[tuple[int, bytes]] = deque(maxlen=backlog_alerts)
        self._viewers: dict[int, _Viewer] = {}
        self._viewer_buffer = viewer_buffer
        self._closing = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.recorder = Recorder(free_log_path(log_path)) if log_path else None
        if self.recorder:
            self.recorder.write(self._hello_frame)
        self.socket_path: Path | None = None
        self.manifest_path: Path | None = None
        self._listen: socket.socket | None = None
        if serve:
            try:
                self._open_socket()
            except (rundir.RunDirError, OSError) as exc:
                log.warning("xray-tui: not serving viewers: %s", exc)  # training goes on
        self._thread = threading.Thread(target=self._run, name="xray-tui-publisher", daemon=True)
        self._thread.start()

    # -- training-thread side -------------------------------------------

    def submit(self, build: Callable[[], wire.Message]) -> None:
        """Queue a message builder; never blocks, drops the oldest when full."""
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

    def _open_socket(self) -> None:
        d = rundir.ensure_run_dir()
        stem = f"{rundir.safe_name(self.hello.run)}-{self.hello.pid}-r{self.hello.rank}"
        path = d / f"{stem}.sock"
        if path.exists():
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self._listen = sock
        self._sel.register(sock, selectors.EVENT_READ, "listen")
        self.socket_path = path
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
        ).write(self.manifest_path)

    def _run(self) -> None:
        try:
            while True:
                for key, events in self._sel.select(timeout=0.5):
                    self._on_event(key, events)
                self._drain()
                if self._closing.is_set() and self.queue.empty():
                    break
            self._finish()
        except Exception:  # the probe's own failure must never reach training
            log.exception("xray-tui: publisher stopped")
            self._cleanup()

    def _on_event(self, key, events) -> None:
        if key.data == "wake":
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        elif key.data == "listen":
            self._accept()
        else:
            viewer = self._viewers.get(key.fd)
            if viewer is None:
                return
            if events & selectors.EVENT_READ:
                try:
                    data = viewer.sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    data = b"?"
                except OSError:
                    data = b""
                if not data:
                    self._drop_viewer(viewer)
                    return
            if events & selectors.EVENT_WRITE:
                self._flush_viewer(viewer)

    def _accept(self) -> None:
        try:
            conn, _ = self._listen.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        viewer = _Viewer(conn, self._viewer_buffer)
        viewer.push(wire.MAGIC + self._hello_frame)
        for _, frame in heapq.merge(self._steps, self._other):
            viewer.push(frame)
        self._viewers[conn.fileno()] = viewer
        self._sel.register(conn, selectors.EVENT_READ, "viewer")
        self._flush_viewer(viewer)

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
            self._publish(msg)
            if isinstance(msg, wire.Step):
                for alert in self.rules.evaluate(msg):
                    self._publish(alert)

    def _publish(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.Step) and self.dropped:
            msg = wire.Step(msg.step, msg.rank, msg.time, msg.samples, self.dropped)
        frame = wire.encode(msg)
        item = (next(self._seq), frame)
        (self._steps if isinstance(msg, wire.Step) else self._other).append(item)
        if self.recorder:
            self.recorder.write(frame)
        for viewer in list(self._viewers.values()):
            viewer.push(frame)
            self._flush_viewer(viewer)
        for listener in self._listeners:
            try:
                listener(msg)
            except Exception:
                log.exception("xray-tui: a listener failed; removed")
                self._listeners.remove(listener)

    def _finish(self) -> None:
        """Give viewers a moment to take the last frames, then clean up."""
        deadline = time.monotonic() + 2.0
        while any(v.out for v in self._viewers.values()) and time.monotonic() < deadline:
            for viewer in list(self._viewers.values()):
                self._flush_viewer(viewer)
            time.sleep(0.01)
        self._cleanup()

    def _cleanup(self) -> None:
        for viewer in list(self._viewers.values()):
            self._drop_viewer(viewer)
        if self._listen is not None:
            self._listen.close()
        for path in (self.socket_path, self.manifest_path):
            if path is not None:
                try:
                    path.unlink()
                except OSError:
                    pass
        if self.recorder:
            self.recorder.close()
