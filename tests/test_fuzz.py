"""Fuzzing the frame decoder, the recording reader and what consumes them.

Streams are built from random bytes, truncated frames, oversized length
prefixes, wrong protocol versions, schema-breaking values and *valid*
frames with absurd values (NaN/inf statistics, 2^64-1 counts, histograms
over every bin). Every case must either decode or raise one
:class:`WireError` whose message is a single line; whatever decodes must go
through the viewer's state, the alert printer and the export without an
exception; nothing may wait, and memory stays bounded by the frame cap.

``XRAY_FUZZ_EXAMPLES`` (default 200) sets hypothesis' examples per test;
docs/reliability.md gives the counts of a long run.
"""

import io
import json
import math
import os
import socket
import struct
import threading
import tracemalloc

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.protocol import histogram, stats, wire
from tui import feed, synthetic
from tui.headless import AlertPrinter, clean
from tui.state import RunState

EXAMPLES = int(os.environ.get("XRAY_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                              HealthCheck.data_too_large])
U64 = 2**64 - 1
HELLO = synthetic.hello(3, run="fuzz")
VALID = wire.MAGIC + b"".join(wire.encode(m) for m in [HELLO, *synthetic.steps(3, 3)])

# -- strategies ---------------------------------------------------------------

floats = st.floats(allow_nan=True, allow_infinity=True)
counts = st.integers(0, U64)
names = st.text(max_size=40) | st.sampled_from(["0", "../../etc/passwd", "\x00\n\r", "a" * 1000])


@st.composite
def samples(draw):
    lo = draw(st.integers(0, histogram.NUM_BINS - 1))
    hist = draw(st.binary(max_size=min(256, 4 * (histogram.NUM_BINS - lo) + 3)))  # any bytes, odd lengths too
    if draw(st.booleans()):
        lo, hist = 0, b"\xff" * (4 * histogram.NUM_BINS)  # every bin, absurd counts
    return wire.Sample(
        layer=draw(names), kind=draw(st.sampled_from(["weight", "grad", "act", "update"])),
        count=draw(counts), sum=draw(floats), sumsq=draw(floats), abssum=draw(floats), min=draw(floats),
        max=draw(floats), near_zero=draw(counts), zeros=draw(counts), nan=draw(counts), posinf=draw(counts),
        neginf=draw(counts), hist_lo=lo, hist_counts=hist, hist_n=draw(counts),
        dead_units=draw(st.none() | floats), ratio=draw(st.none() | floats))


messages = st.one_of(
    st.builds(wire.Step, step=counts, rank=counts, time=floats, samples=st.lists(samples(), max_size=4),
              drops=counts, rank_grad_norms=st.none() | st.lists(floats, max_size=4)),
    st.builds(wire.Alert, step=counts, rank=counts, severity=st.sampled_from(["info", "warning", "critical"]),
              rule=names, layer=names, kind=st.sampled_from(["weight", "grad", "act", "update"]), value=floats,
              threshold=floats, message=names),
    st.builds(wire.Note, step=counts, rank=counts, event=names,
              data=st.dictionaries(names, st.none() | st.booleans() | st.integers(-(2**63), U64) | floats | names,
                                   max_size=4)),
    st.builds(wire.End, step=counts, rank=counts, reason=names),
    st.builds(wire.Hello, version=st.integers(-5, 5), run=names, rank=counts, world_size=st.integers(1, 2**63 - 1),
              pid=counts, started=floats, argv=st.lists(names, max_size=3), every=st.integers(1, U64), eps=floats,
              layers=st.lists(st.builds(wire.LayerInfo, name=names, type=names), max_size=4)),
)

# msgpack values of any shape, dropped into message-shaped maps: wrong types, wrong tags, extra keys
any_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), U64) | floats | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
shaped = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "step", "alert", "note", "end", "sample", "", "evil"])},
    optional={k: any_value for k in ("version", "run", "step", "rank", "time", "samples", "drops", "layers", "data")})


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@st.composite
def pieces(draw):
    """One piece of a stream: a good frame, a bad one, or bytes that are not a frame."""
    kind = draw(st.sampled_from(["valid", "shaped", "random body", "raw bytes", "truncated", "oversized"]))
    if kind == "valid":
        return wire.encode(draw(messages))
    if kind == "shaped":
        return frame(msgspec.msgpack.encode(draw(shaped)))
    if kind == "random body":
        return frame(draw(st.binary(max_size=64)))
    if kind == "raw bytes":
        return draw(st.binary(max_size=64))
    if kind == "truncated":
        full = wire.encode(draw(messages))
        return full[: draw(st.integers(0, len(full) - 1))]
    return struct.pack(">I", draw(st.integers(wire.MAX_FRAME + 1, 2**32 - 1))) + draw(st.binary(max_size=8))


# -- the checks -----------------------------------------------------------------


def consume(msgs) -> None:
    """Everything the viewer does with decoded messages; must never raise."""
    state = RunState()
    printer = AlertPrinter(out=io.StringIO(), as_json=True)
    for m in msgs:
        state.ingest(m)
        printer.handle(m)
        if isinstance(m, wire.Step):
            for s in m.samples:
                row = stats.export_dict(s, m.step, m.rank)
                json.dumps(clean(row), allow_nan=False)
    for row in state.rows:
        for kind in ("weight", "grad", "act", "update"):
            state.latest(row, kind)


def decode_stream(data: bytes, chunks: list[int]) -> tuple[list, str | None]:
    """Feed ``data`` in chunks; the messages and the one-line error, if any."""
    reader, out, pos = wire.FrameReader("fuzz peer"), [], 0
    try:
        for n in chunks + [len(data)]:
            out += reader.feed(data[pos : pos + n])
            pos += n
    except wire.WireError as exc:
        msg = str(exc)
        assert msg.startswith("fuzz peer: ") and "\n" not in msg and len(msg) < 500, msg
        return out, msg
    assert reader.pending <= wire.MAX_FRAME + 4
    return out, None


@FUZZ
@given(st.lists(pieces(), max_size=6), st.lists(st.integers(1, 200), max_size=5), st.booleans())
def test_fuzz_streams_decode_or_fail_in_one_line_and_the_viewer_survives(parts, chunks, with_hello):
    data = (VALID if with_hello else wire.MAGIC) + b"".join(parts)
    msgs, _ = decode_stream(data, chunks)
    consume(msgs)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_anywhere(data):
    for prefix in (b"", wire.MAGIC[: len(data) % 9], VALID):
        msgs, _ = decode_stream(prefix + data, [])
        consume(msgs)


@FUZZ
@given(messages)
def test_fuzz_valid_frames_with_absurd_values_round_trip_or_are_refused(msg):
    msgs, err = decode_stream(wire.MAGIC + wire.encode(HELLO) + wire.encode(msg), [])
    if err is None:
        assert len(msgs) == 2 and wire.encode(msgs[1]) == wire.encode(msg)  # NaN-safe equality
        consume(msgs)
    elif isinstance(msg, wire.Hello):  # wrong protocol versions are refused
        assert msg.version not in wire.READABLE_VERSIONS and "protocol version" in err
    else:  # so are histogram counts that are not whole or run past the last bin
        assert isinstance(msg, wire.Step) and "malformed frame: histogram" in err and "\n" not in err


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(VALID)), st.binary(max_size=32))
def test_fuzz_recordings_with_flipped_bytes_cut_short_or_padded(tmp_path_factory, flips, cut, tail):
    data = bytearray(VALID)
    for pos, byte in flips:
        data[pos] = byte
    data = bytes(data[:cut]) + tail
    path = tmp_path_factory.mktemp("rec") / "fuzz.xray"
    path.write_bytes(data)
    try:
        msgs, torn = wire.read_file(str(path))
    except wire.WireError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path))
        return
    assert 0 <= torn <= len(data) and isinstance(msgs[0], wire.Hello)
    consume(msgs)


@settings(max_examples=max(10, EXAMPLES // 10), deadline=None)
@given(st.binary(max_size=256), st.booleans())
def test_fuzz_a_live_peer_sending_junk_never_hangs_the_viewer(tmp_path_factory, junk, with_hello):
    """A socket peer that sends anything then hangs up, or goes quiet: the source ends or fails, in time."""
    path = tmp_path_factory.mktemp("peer") / "p.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o600)
    srv.listen(1)
    quiet = threading.Event()

    def serve():
        conn, _ = srv.accept()
        conn.sendall((VALID if with_hello else b"") + junk)
        if len(junk) % 2:
            quiet.wait(5)  # stay connected, silent: the viewer must not wait for a hello forever
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    got = []
    try:
        for batch in feed.SocketSource([str(path)]).batches(hello_timeout=0.3):
            got += batch
            if got and isinstance(got[0], wire.Hello) and len(junk) % 2 and with_hello:
                break  # a live run that goes quiet is not an error: stop reading
    except feed.FeedError as exc:
        assert "\n" not in str(exc)
    finally:
        quiet.set()
        srv.close()
        t.join(5)
    consume(got)


# -- fixed absurd cases ---------------------------------------------------------


def array32(n: int) -> bytes:
    return b"\xdd" + struct.pack(">I", n)


def lying_histogram() -> bytes:
    """A Step body whose one sample's histogram claims 10^9 bytes of counts (and holds none)."""
    sample = msgspec.structs.replace(synthetic.steps(1, 1)[0].samples[0], hist_lo=77, hist_counts=b"")
    body = wire.encode(wire.Step(0, 0, 0.0, [sample]))[4:]
    assert body.count(b"\x4d\xc4\x00") == 1  # hist_lo=77 then empty bytes
    return body.replace(b"\x4d\xc4\x00", b"\x4d\xc6" + struct.pack(">I", 10**9))


@pytest.mark.parametrize("body", [
    b"\x82\xa4type\xa4step\xa7samples" + array32(10**9),  # "10^9 samples" in a few bytes
    lying_histogram(),
    b"\x81\xa4type\xa5hello" + b"\xdb" + struct.pack(">I", 2**31) + b"x",  # a 2 GiB string that is not there
], ids=["10^9 samples", "10^9 bins", "2 GiB string"])
def test_length_headers_that_lie_cost_no_memory(body):
    tracemalloc.start()
    try:
        _, err = decode_stream(wire.MAGIC + wire.encode(HELLO) + frame(body), [])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err is not None and "malformed frame" in err
    assert peak < 4 * 1024 * 1024  # nothing sized by the claimed length was allocated


def test_a_histogram_running_past_the_last_bin_is_refused():
    s = synthetic.steps(1, 1)[0].samples[0]
    bad = msgspec.structs.replace(s, hist_lo=histogram.NUM_BINS - 2, hist_counts=wire.encode_counts([1, 1, 1], s.hist_n))
    _, err = decode_stream(wire.MAGIC + wire.encode(HELLO) + wire.encode(wire.Step(0, 0, 0.0, [bad])), [])
    assert err and "runs past bin" in err
    ok = msgspec.structs.replace(s, hist_lo=histogram.NUM_BINS - 3, hist_counts=wire.encode_counts([1, 1, 1], s.hist_n))
    msgs, err = decode_stream(wire.MAGIC + wire.encode(HELLO) + wire.encode(wire.Step(0, 0, 0.0, [ok])), [])
    assert err is None
    consume(msgs)


def test_a_frame_of_exactly_the_cap_is_waited_for_and_one_byte_more_is_refused():
    reader = wire.FrameReader("peer")
    reader.feed(wire.MAGIC + wire.encode(HELLO) + struct.pack(">I", wire.MAX_FRAME) + b"\x00" * 100)
    assert reader.pending == 104  # held, not allocated up front
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.FrameReader("peer").feed(wire.MAGIC + struct.pack(">I", wire.MAX_FRAME + 1))


async def test_the_app_stays_up_on_valid_frames_with_absurd_values():
    from tui.app import XRayApp

    nan, inf = math.nan, math.inf
    layers = [wire.LayerInfo(n, "Linear", ["weight"], True) for n in ("a", "b", "../c")]
    hello = wire.Hello(version=wire.PROTOCOL_VERSION, run="absurd", layers=layers)

    def sample(layer, kind, value, hist):
        return wire.Sample(layer, kind, U64, value, value, value, value, -value, U64, U64, U64, U64, U64,
                           0, wire.encode_counts(hist, 1 << 32), U64, dead_units=value, ratio=value)

    steps = [wire.Step(i, 0, float(i), [sample(n, k, v, h) for n in ("a", "b", "../c") for k in ("weight", "act")],
                       drops=U64)
             for i, (v, h) in enumerate([(nan, [2**32 - 1] * histogram.NUM_BINS), (inf, []), (-inf, [0, 0, 1]),
                                         (1e308, [1] * histogram.NUM_BINS), (0.0, [2**32 - 1])])]
    batches = [[hello], steps, [wire.Alert(4, 0, "critical", "nonfinite", "../c", "act", nan, inf, "x" * 10_000)],
               [wire.Note(4, 0, "drops", {"frames": U64})], [wire.End(4, 0, "\n\x1b[2J")]]
    app = XRayApp(feed.ListSource(batches))
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(100):
            await pilot.pause(0.02)
            if app.state.finished:
                break
        app._paint()
        await pilot.pause()
        assert app.state.finished and app.is_running


def absurd(**kw) -> wire.Sample:
    base = dict(layer="x", kind="act", count=3, sum=1.0, sumsq=1.0, abssum=1.0, min=-1.0, max=1.0, near_zero=0,
                zeros=0, nan=0, posinf=0, neginf=0, hist_lo=0, hist_counts=b"", hist_n=0)
    return wire.Sample(**{**base, **kw})


@pytest.mark.parametrize("sample", [
    absurd(sumsq=-1.0),  # rms: sqrt of a negative (math domain error)
    absurd(count=1, sum=1e-160, sumsq=2e-320, sum3=1.0, sum4=1.0),  # skewness: var**1.5 underflows to 0
    absurd(count=1, sum=1e110, sumsq=1e300, sum3=1.0, sum4=1.0),  # skewness: m**3 overflows
], ids=["negative sumsq", "tiny variance", "huge mean"])
def test_derived_statistics_of_absurd_values_are_nan_not_exceptions(sample):
    row = stats.export_dict(sample, 0, 0)
    json.dumps(clean(row), allow_nan=False)


@pytest.mark.parametrize("what,data,message", [
    ("another protocol version", wire.MAGIC + wire.encode(msgspec.structs.replace(HELLO, version=99)), "protocol version 99"),
    ("a garbled frame", wire.MAGIC + wire.encode(HELLO) + frame(b"\xc1\xc1"), "malformed frame"),
    ("not a recording", b"PK\x03\x04 a zip file, say", "bad magic"),
])
def test_cli_replay_and_export_of_a_recording_that_is_not_ours_is_one_line_and_exit_2(tmp_path, what, data, message):
    import subprocess
    import sys

    path = tmp_path / "bad.xray"
    path.write_bytes(data)
    for cmd in (["replay", str(path), "--headless"], ["export", str(path)]):
        out = subprocess.run([sys.executable, "-m", "tui.cli", *cmd], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, (what, out.stderr)
