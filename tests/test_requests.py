"""Viewer -> probe requests: the app's spectral key, the wire frame, its limits.

A viewer may send one kind of frame, a small ``wire.Request``; the probe
calls the registered callback (the spectral monitor's) at most once per
``request_interval`` and answers the asking viewer alone. Junk, oversized
frames and floods are ignored as before requests existed.
"""

from __future__ import annotations

import socket
import struct
import time

import msgspec
import pytest
import torch
from torch import nn

import probes
from probes.publish import viewers
from probes.publish.handshake import handshake
from probes.publish.publisher import Publisher
from probes.protocol import wire
from tui.app import XRayApp
from tui.feed import FileSource, ListSource, SocketSource


def hello(**kw) -> wire.Hello:
    return wire.Hello(version=wire.PROTOCOL_VERSION, run=kw.pop("run", "req"), **kw)


# -- the frame and its reader ---------------------------------------------------------


def test_request_frame_is_small_and_round_trips():
    frame = wire.encode_request("spectral")
    assert len(frame) <= 64 < wire.MAX_REQUEST
    (size,) = struct.unpack(">I", frame[:4])
    assert size == len(frame) - 4
    assert wire.RequestReader().feed(frame) == [wire.Request("spectral")]
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.Decoder(wire.Request).decode(msgspec.msgpack.encode(wire.Request("x" * 33)))


def test_reader_takes_frames_split_anywhere():
    frames = wire.encode_request("spectral") * 3
    reader = wire.RequestReader()
    got = []
    for i in range(len(frames)):
        got += reader.feed(frames[i:i + 1])
    assert got == [wire.Request("spectral")] * 3 and not reader.deaf


@pytest.mark.parametrize("junk, why", [
    (b"GET / HTTP/1.1\r\n\r\n", "request cap"),  # a length prefix of ~1.2e9
    (struct.pack(">I", 0xFFFFFFFF) + b"x" * 100, "request cap"),
    (struct.pack(">I", wire.MAX_REQUEST + 1), "request cap"),
    (struct.pack(">I", 3) + b"\x93\x01\x02", "not a request"),  # msgpack, but not a Request
    (wire.encode(hello(layers=[wire.LayerInfo(f"h.{i}") for i in range(40)])), "request cap"),  # echoed back
    (wire.encode(hello()), "not a request"),  # a small hello: valid msgpack, not a Request
    (wire.encode(wire.End(1, 0)), "not a request"),  # small, valid msgpack of another message
])
def test_junk_makes_the_reader_deaf_and_it_holds_nothing(junk, why):
    reader = wire.RequestReader()
    assert reader.feed(junk) == []
    assert reader.deaf and why in reader.why
    assert reader.feed(wire.encode_request("spectral")) == []  # nothing is heard after junk
    assert len(reader._buf) == 0


def test_reader_holds_at_most_one_small_partial_frame():
    reader = wire.RequestReader()
    partial = struct.pack(">I", wire.MAX_REQUEST) + b"\0" * (wire.MAX_REQUEST - 1)
    assert reader.feed(partial) == [] and not reader.deaf
    assert len(reader._buf) == len(partial) <= 4 + wire.MAX_REQUEST


def test_a_flood_in_one_read_makes_the_reader_deaf():
    reader = wire.RequestReader()
    assert len(reader.feed(wire.encode_request("spectral") * wire.MAX_REQUESTS_PER_READ)) == wire.MAX_REQUESTS_PER_READ
    assert reader.feed(wire.encode_request("spectral") * (wire.MAX_REQUESTS_PER_READ + 1)) == []
    assert reader.deaf


def test_older_viewers_ignore_accepts_and_older_hellos_read():
    new = wire.encode(hello(accepts=["spectral"]))

    class OldHello(msgspec.Struct, tag="hello"):  # a v2 viewer from before requests existed
        version: int
        run: str
        layers: list = []

    old = msgspec.msgpack.decode(new[4:], type=OldHello)  # the field alone breaks no reader
    assert old.version == wire.PROTOCOL_VERSION and old.run == "req"
    # and a Hello without the field (older probes, recordings) reads as accepting nothing
    body = msgspec.msgpack.encode(OldHello(2, "old"))
    assert wire.decode(body).accepts == []


# -- the publisher: callback, rate limit, answers, junk --------------------------------


class Peer:
    """A raw viewer socket on a publisher, reading frames with the viewer's own reader."""

    def __init__(self, pub: Publisher) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(pub.socket_path))
        self.sock.settimeout(10)
        self.reader = wire.FrameReader("probe")
        self.msgs: list = []

    def until(self, pred, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.msgs:
                if pred(m):
                    return m
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return None
            self.msgs += self.reader.feed(data)
        return None

    def closed_by_probe(self, timeout: float = 10.0) -> bool:
        """Half-close our side, then read until the probe closes: it has read all we sent."""
        self.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return True
            self.msgs += self.reader.feed(data)
        return False


def answer(m) -> bool:
    return isinstance(m, wire.Note) and m.event == "request"


@pytest.fixture
def pub(monkeypatch):
    monkeypatch.setattr(viewers, "REPLY_INTERVAL", 0.0)  # answer every request: no timing in the test
    p = Publisher(hello(), request_interval=3600.0)
    calls = []
    p.on_request("spectral", lambda: (calls.append(1), (True, "spectral pass started"))[1])
    p.calls = calls
    yield p
    p.close()


def test_a_request_calls_the_callback_once_and_the_rate_limit_holds(pub):
    a = Peer(pub)
    assert a.until(lambda m: isinstance(m, wire.Hello)).accepts == ["spectral"]
    a.sock.sendall(wire.encode_request("spectral"))
    first = a.until(answer)
    assert first.data == {"what": "spectral", "accepted": True, "reason": "spectral pass started"}
    assert pub.calls == [1]
    # a second request, from this viewer or another, within request_interval: refused, no call
    b = Peer(pub)
    b.sock.sendall(wire.encode_request("spectral"))
    second = b.until(answer)
    assert second.data["accepted"] is False and "rate limited" in second.data["reason"]
    a.sock.sendall(wire.encode_request("spectral"))
    a.msgs.clear()
    assert a.until(answer).data["accepted"] is False
    assert pub.calls == [1]
    # answers go to the asking viewer alone: b never saw a's answers, and nothing was recorded
    assert sum(answer(m) for m in b.msgs) == 1


def test_unknown_kinds_are_refused_without_echo(pub):
    a = Peer(pub)
    a.sock.sendall(wire.encode_request("rm -rf /"))
    got = a.until(answer)
    assert got.data["accepted"] is False and got.data["what"] == "?"
    assert pub.calls == []


@pytest.mark.parametrize("junk", [
    b"\x00\x00\x00\x05hello",  # a frame that is not a request
    struct.pack(">I", 2**31) + b"\xff" * 8192,  # a 2 GiB length prefix, then bytes
    b"\xde\xad\xbe\xef" * 4096,
])
def test_junk_is_ignored_as_before_and_the_viewer_keeps_its_stream(pub, junk):
    a = Peer(pub)
    assert a.until(lambda m: isinstance(m, wire.Hello))
    a.sock.sendall(junk + wire.encode_request("spectral"))
    pub.submit(lambda: wire.Note(1, 0, "after-junk"))
    assert a.until(lambda m: isinstance(m, wire.Note) and m.event == "after-junk")  # still served
    assert a.closed_by_probe()  # the probe read everything we sent before closing
    assert pub.calls == []
    assert not any(answer(m) for m in a.msgs)


def test_a_tcp_viewer_may_ask_after_its_handshake_and_not_before(monkeypatch):
    monkeypatch.setattr(viewers, "REPLY_INTERVAL", 0.0)
    p = Publisher(hello(), tcp=True, request_interval=0.0)
    calls = []
    p.on_request("spectral", lambda: (calls.append(1), (True, "ok"))[1])
    host, port = p.tcp_address.rsplit(":", 1)
    try:
        # a request instead of the handshake: closed before a byte, no call
        bad = socket.create_connection((host, int(port)), timeout=10)
        bad.sendall(wire.encode_request("spectral"))
        assert bad.recv(100) == b""
        # handshake and request in one write: the request is read after the handshake
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(handshake(p.token) + wire.encode_request("spectral"))
        reader, msgs = wire.FrameReader("tcp"), []
        while not any(answer(m) for m in msgs):
            data = sock.recv(65536)
            assert data
            msgs += reader.feed(data)
        assert calls == [1]
        sock.close()
        bad.close()
    finally:
        p.close()


def test_a_failing_callback_is_removed_and_the_probe_goes_on(monkeypatch):
    monkeypatch.setattr(viewers, "REPLY_INTERVAL", 0.0)
    p = Publisher(hello(), request_interval=0.0)

    def boom():
        raise RuntimeError("boom")

    p.on_request("spectral", boom)
    try:
        a = Peer(p)
        a.sock.sendall(wire.encode_request("spectral"))
        assert a.until(answer).data["reason"] == "failed in the probe"
        a.msgs.clear()
        a.sock.sendall(wire.encode_request("spectral"))
        assert "not available" in a.until(answer).data["reason"]
        p.submit(lambda: wire.Note(2, 0, "alive"))
        assert a.until(lambda m: isinstance(m, wire.Note) and m.event == "alive")
    finally:
        p.close()


# -- the spectral monitor: one pass in flight -----------------------------------------


def test_monitor_refuses_a_request_while_a_pass_runs_or_is_due():
    model = nn.Linear(16, 16)
    xr = probes.attach(model, serve=False, spectral_every=10**9)
    try:
        mon = xr.spectral
        assert xr.publisher.hello.accepts == ["spectral"]
        mon._running = True
        assert mon.viewer_request() == (False, "a spectral pass is already running")
        mon._running = False
        mon._requested = True
        assert mon.viewer_request()[0] is False
        mon._requested = False
    finally:
        xr.close()
    assert mon.viewer_request() == (False, "the spectral monitor has stopped")


def test_a_probe_without_the_monitor_accepts_nothing():
    xr = probes.attach(nn.Linear(16, 16), serve=False, spectral_every=None)
    try:
        assert xr.publisher.hello.accepts == []
    finally:
        xr.close()


# -- the app --------------------------------------------------------------------------


def train(model, opt, steps: int = 2) -> None:
    x = torch.randn(4, 32)
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def recording_notes(app):
    seen = []
    real = app.notify

    def notify(message, **kw):
        seen.append(str(message))
        return real(message, **kw)

    app.notify = notify
    return seen


async def wait_for(pilot, pred, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await pilot.pause(0.1)
    return pred()


async def test_pressing_e_gets_spectral_figures_from_a_live_probe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xr = probes.attach(model, opt, every=1, name="asked", spectral_every=10**9)  # never on its own
    xr.publisher.request_interval = 3600.0  # the second press below is refused however slow the machine
    try:
        train(model, opt)
        app = XRayApp(SocketSource.for_run("asked"))
        seen = recording_notes(app)
        async with app.run_test(size=(120, 40)) as pilot:
            assert await wait_for(pilot, lambda: app.state.hellos)
            assert not app.state.spectral
            await pilot.press("e")
            assert await wait_for(pilot, lambda: {"0.weight", "2.weight"} <= set(app.state.spectral))
            assert any("spectral pass requested" in s for s in seen)
            assert await wait_for(pilot, lambda: any("spectral pass started" in s for s in seen))
            assert await wait_for(pilot, lambda: xr.spectral.passes == 1)
            # at once again: the probe refuses (rate limit), and the app says so
            await pilot.pause(1.1)  # past the probe's one-answer-a-second limit per viewer
            await pilot.press("e")
            assert await wait_for(pilot, lambda: any("refused" in s and "rate limited" in s for s in seen))
            assert xr.spectral.passes == 1
    finally:
        xr.close()


async def test_e_on_a_run_with_the_monitor_off_says_so():
    model = nn.Linear(32, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xr = probes.attach(model, opt, every=1, name="nomon", spectral_every=None)
    try:
        train(model, opt)
        app = XRayApp(SocketSource.for_run("nomon"))
        seen = recording_notes(app)
        async with app.run_test(size=(120, 40)) as pilot:
            assert await wait_for(pilot, lambda: app.state.hellos)
            await pilot.press("e")
            await pilot.pause()
            assert any("spectral monitor off" in s for s in seen)
    finally:
        xr.close()


@pytest.mark.parametrize("make", [lambda p: ListSource([]), lambda p: FileSource(str(p))])
async def test_e_on_a_replay_says_it_is_not_available(tmp_path, make):
    rec = tmp_path / "r.xray"
    rec.write_bytes(wire.MAGIC + wire.encode(hello()))
    app = XRayApp(make(rec))
    seen = recording_notes(app)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("e")
        await pilot.pause()
    assert any("not available" in s and "replay" in s for s in seen)


def test_socket_source_request_sends_nothing_when_not_connected():
    assert SocketSource(["/nonexistent.sock"]).request("spectral") == 0

