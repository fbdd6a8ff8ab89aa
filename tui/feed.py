"""Where the viewer's messages come from: live sockets, a recording, or a list.

A source's :meth:`batches` is a blocking generator of message lists, run on
a reader thread (the app's worker, or headless mode's loop). It returns when
the stream is over and raises :class:`FeedError` with a one-line reason when
it cannot go on. Nothing here touches widgets.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from probes.protocol import rundir, wire
from probes.publish.handshake import handshake, parse_tcp
from probes.publish.recorder import Recorder, free_log_path

Batch = list  # list[wire.Message]


class FeedError(Exception):
    """The source cannot be read: unknown run, not ours, malformed stream."""


def resolve_run(name: str | None) -> rundir.Run:
    """The live run called ``name``, or the only live run when ``name`` is None."""
    try:
        runs = rundir.live_runs()
    except rundir.RunDirError as exc:
        raise FeedError(str(exc)) from None
    if name is None:
        if not runs:
            raise FeedError("no live runs (start one with probes.attach(...) or `xray-tui demo`)")
        if len(runs) > 1:
            names = ", ".join(r.name for r in runs)
            raise FeedError(f"several live runs ({names}): name one, e.g. `xray-tui attach {runs[-1].name}`")
        return runs[0]
    for r in runs:
        if r.name == name:
            return r
    known = ", ".join(r.name for r in runs) or "none"
    raise FeedError(f"unknown run {name!r} (live runs: {known})")


def read_token(path: str) -> str:
    """A TCP token from a file (the probe's ``<stem>.token``), checked to be ours alone."""
    try:
        st = os.stat(path)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise FeedError(f"{path}: a token file must be yours with mode 600: refused")
        with open(path, encoding="ascii", errors="replace") as f:
            token = f.read(256).strip()
    except OSError as exc:
        raise FeedError(f"cannot read token {path}: {exc.strerror}") from None
    if not token:
        raise FeedError(f"{path}: empty token file")
    return token


class SocketSource:
    """Reads every rank of a live run (or explicit endpoints) at once.

    An endpoint is a Unix socket path, which must be a socket of ours with
    no access for others, or ``tcp:HOST:PORT``, which is sent the
    ``token`` handshake first. Whatever arrives is only ever decoded as
    frames: never evaluated, unpickled or used as a path. The only thing
    sent back is a :class:`probes.protocol.wire.Request` (:meth:`request`).
    """

    def __init__(self, paths: Iterable[str], label: str = "", token: str | None = None) -> None:
        self.paths = list(paths)
        self.label = label or ", ".join(self.paths)
        self.token = token
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []  # connected while batches() runs

    def request(self, what: str) -> int:
        """Ask every connected rank for ``what`` (e.g. "spectral"); the number of ranks asked.

        Safe from any thread while :meth:`batches` runs on another. Never
        blocks: a request frame is ~30 bytes, written with one non-blocking
        send; a socket that cannot take it whole now is skipped.
        """
        frame = wire.encode_request(what)
        sent = 0
        with self._lock:
            for sock in self._socks:
                try:
                    if sock.send(frame, socket.MSG_DONTWAIT) == len(frame):
                        sent += 1
                except OSError:  # gone, or its buffer is full: this rank is not asked
                    pass
        return sent

    @classmethod
    def for_run(cls, name: str | None, tcp: bool = False) -> "SocketSource":
        """A source for a live run found by name in the run directory
        (over its TCP listeners, with their tokens, when ``tcp``)."""
        run = resolve_run(name)
        if not tcp:
            return cls([m.socket for m in run.ranks], label=run.name)
        if not all(m.tcp for m in run.ranks):
            raise FeedError(f"run {run.name!r} has no TCP listener (start it with probes.attach(..., tcp=True))")
        tokens = {read_token(str(m.token_file)) for m in run.ranks}
        if len(tokens) != 1:
            raise FeedError(f"run {run.name!r}: its ranks have different TCP tokens; attach to one with --tcp")
        return cls([f"tcp:{m.tcp}" for m in run.ranks], label=run.name, token=tokens.pop())

    def _connect(self, path: str) -> socket.socket:
        if path.startswith("tcp:"):
            return self._connect_tcp(path)
        try:
            rundir.check_private(Path(path), want_dir=False)
        except rundir.RunDirError as exc:
            raise FeedError(str(exc)) from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise FeedError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        return sock

    def _connect_tcp(self, endpoint: str) -> socket.socket:
        if not self.token:
            raise FeedError(f"{endpoint}: a TCP viewer needs the run's token (--token-file or $XRAY_TUI_TOKEN)")
        try:
            host, port = parse_tcp(endpoint[4:])
        except ValueError as exc:
            raise FeedError(str(exc)) from None
        try:
            sock = socket.create_connection((host, port), timeout=5.0)
            sock.sendall(handshake(self.token))
        except OSError as exc:
            raise FeedError(f"cannot connect to {endpoint}: {exc.strerror or exc}") from None
        return sock

    def batches(self, stop: threading.Event | None = None, hello_timeout: float = 5.0) -> Iterator[Batch]:
        """Yield decoded messages as they arrive until every rank is done."""
        stop = stop or threading.Event()
        sel = selectors.DefaultSelector()
        readers = {}
        try:
            for path in self.paths:
                sock = self._connect(path)
                sock.setblocking(False)
                readers[sock] = wire.FrameReader(source=path)
                sel.register(sock, selectors.EVENT_READ)
                with self._lock:
                    self._socks.append(sock)
            started = time.monotonic()
            while readers and not stop.is_set():
                out: Batch = []
                for key, _ in sel.select(timeout=0.2):
                    sock = key.fileobj
                    try:
                        data = sock.recv(1 << 20)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    reader = readers[sock]
                    if not data:
                        if reader.hello is None:
                            why = ("closed before saying hello (wrong token?)" if reader.source.startswith("tcp:")
                                   else "closed before saying hello (not an xray-tui probe?)")
                            raise FeedError(f"{reader.source}: {why}")
                        sel.unregister(sock)
                        with self._lock:
                            self._socks.remove(sock)
                            sock.close()
                        del readers[sock]
                        continue
                    try:
                        out += reader.feed(data)
                    except wire.WireError as exc:
                        raise FeedError(str(exc)) from None
                if out:
                    yield out
                elif time.monotonic() - started > hello_timeout and any(r.hello is None for r in readers.values()):
                    bad = next(r.source for r in readers.values() if r.hello is None)
                    raise FeedError(f"{bad}: no hello within {hello_timeout:g}s (not an xray-tui probe?)")
        finally:
            with self._lock:
                self._socks.clear()
                for sock in list(readers):
                    sock.close()
            sel.close()


class FileSource:
    """Reads a recording; ``torn`` holds the torn-tail byte count at the end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.label = os.path.basename(path)
        self.torn = 0

    def batches(self, stop: threading.Event | None = None) -> Iterator[Batch]:
        """Yield the recording's messages in chunks."""
        try:
            for batch, pending in wire.iter_file(self.path):
                self.torn = pending
                if stop is not None and stop.is_set():
                    return
                if batch:
                    yield batch
        except wire.WireError as exc:
            raise FeedError(str(exc)) from None


class ListSource:
    """A fixed list of batches, optionally paced: for tests and benchmarks."""

    def __init__(self, batches: list[Batch], delay: float = 0.0, label: str = "test") -> None:
        self._batches = batches
        self.delay = delay
        self.label = label

    def batches(self, stop: threading.Event | None = None) -> Iterator[Batch]:
        """Yield the batches, sleeping ``delay`` between them."""
        for b in self._batches:
            if stop is not None and stop.is_set():
                return
            yield b
            if self.delay:
                time.sleep(self.delay)


class PidSource:
    """Waits for the run of a process we started to appear, then reads it.

    Used by `xray-tui demo`, whose app opens at once while the trainer
    process is still importing torch.
    """

    def __init__(self, pid: int, label: str = "demo", timeout: float = 120.0, alive=None) -> None:
        self.pid = pid
        self.label = label
        self.timeout = timeout
        self.alive = alive or (lambda: True)
        self._live: SocketSource | None = None

    def request(self, what: str) -> int:
        """Ask the trainer's probe for ``what`` (0 before it serves); see :meth:`SocketSource.request`."""
        live = self._live
        return live.request(what) if live is not None else 0

    def batches(self, stop: threading.Event | None = None) -> Iterator[Batch]:
        """Poll the run directory for the process's sockets, then stream them."""
        stop = stop or threading.Event()
        deadline = time.monotonic() + self.timeout
        while not stop.is_set():
            try:
                found = [m for m in rundir.live_manifests() if m.pid == self.pid]
            except rundir.RunDirError as exc:
                raise FeedError(str(exc)) from None
            if found:
                self._live = SocketSource([m.socket for m in found], label=found[0].run)
                try:
                    yield from self._live.batches(stop)
                finally:
                    self._live = None
                return
            if not self.alive():
                raise FeedError(f"the trainer (pid {self.pid}) exited before serving; see its log")
            if time.monotonic() > deadline:
                raise FeedError(f"the trainer (pid {self.pid}) did not start serving in {self.timeout:g}s")
            stop.wait(0.1)


class RecordingSource:
    """Passes another source's messages through, recording each to a file.

    The file is the same frames the probe writes with ``log=``, so it
    replays and exports alike; an existing file is never overwritten.
    """

    def __init__(self, inner, path: str) -> None:
        self.inner = inner
        self.path = free_log_path(path)
        self.label = inner.label

    def request(self, what: str) -> int | None:
        """The inner source's :meth:`SocketSource.request`; None when it cannot send."""
        ask = getattr(self.inner, "request", None)
        return ask(what) if ask is not None else None

    def batches(self, stop: threading.Event | None = None) -> Iterator[Batch]:
        """Yield the inner source's batches after recording them."""
        try:
            recorder = Recorder(self.path)
        except OSError as exc:
            raise FeedError(f"cannot record to {self.path}: {exc.strerror}") from None
        try:
            for batch in self.inner.batches(stop):
                for msg in batch:
                    recorder.write(wire.encode(msg))
                yield batch
        finally:
            recorder.close()
