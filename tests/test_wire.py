"""The wire format: round trips, and every kind of malformed input."""

import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.protocol import histogram, wire
from tui import synthetic


def stream(*msgs) -> bytes:
    return wire.MAGIC + b"".join(wire.encode(m) for m in msgs)


def test_round_trip_every_message_type():
    msgs = [synthetic.hello(3), *synthetic.steps(3, 2), synthetic.alert(1, "model.layers.1.fc"),
            wire.Note(1, 0, "fault", {"layer": "x", "fault": "nan"}), wire.End(2, 0, "finished")]
    got = wire.FrameReader().feed(stream(*msgs))
    assert got == msgs


def test_byte_at_a_time_feeding_gives_the_same_messages():
    msgs = [synthetic.hello(2), *synthetic.steps(2, 3)]
    data = stream(*msgs)
    reader = wire.FrameReader()
    got = []
    for i in range(len(data)):
        got += reader.feed(data[i : i + 1])
    assert got == msgs and reader.pending == 0


def test_bad_magic_is_refused_at_once():
    with pytest.raises(wire.WireError, match="bad magic"):
        wire.FrameReader("peer").feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(wire.WireError, match="bad magic"):
        wire.FrameReader("peer").feed(b"Z")  # even one wrong byte


def test_oversized_length_prefix_is_refused_before_reading():
    reader = wire.FrameReader("peer")
    with pytest.raises(wire.WireError, match="exceeds"):
        reader.feed(wire.MAGIC + struct.pack(">I", wire.MAX_FRAME + 1))


def test_garbage_body_names_the_peer():
    body = b"\xc1\xc1\xc1"
    with pytest.raises(wire.WireError, match="^peer: malformed frame"):
        wire.FrameReader("peer").feed(wire.MAGIC + struct.pack(">I", len(body)) + body)


def test_wrong_protocol_version():
    hello = msgspec.structs.replace(synthetic.hello(1), version=99)
    with pytest.raises(wire.WireError, match="protocol version 99"):
        wire.FrameReader().feed(stream(hello))


def test_stream_must_start_with_hello():
    with pytest.raises(wire.WireError, match="does not start with a hello"):
        wire.FrameReader().feed(stream(wire.End(0, 0)))


@pytest.mark.parametrize("field,value", [("count", -1), ("hist_lo", histogram.NUM_BINS), ("nan", -5)])
def test_absurd_values_are_schema_errors(field, value):
    step = synthetic.steps(1, 1)[0]
    bad = msgspec.structs.replace(step.samples[0], **{field: value})
    step = wire.Step(0, 0, 0.0, [bad])
    with pytest.raises(wire.WireError, match="malformed"):
        wire.FrameReader().feed(stream(synthetic.hello(1), step))


def test_nan_statistics_are_valid_data():
    s = synthetic.sample_of("x", "act", [float("nan"), 1.0])
    step = wire.Step(0, 0, 0.0, [s])
    (_, got) = wire.FrameReader().feed(stream(synthetic.hello(1), step))
    assert got.samples[0].nan == 1


def test_truncated_recording_reads_up_to_the_last_whole_frame(tmp_path):
    msgs = [synthetic.hello(2), *synthetic.steps(2, 4)]
    data = stream(*msgs)
    path = tmp_path / "run.xray"
    path.write_bytes(data[:-10])
    got, torn = wire.read_file(str(path))
    assert got == msgs[:-1]
    assert torn == len(wire.encode(msgs[-1])) - 10


def test_not_a_recording(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world, not a recording\n")
    with pytest.raises(wire.WireError, match="bad magic"):
        wire.read_file(str(path))
    empty = tmp_path / "empty.xray"
    empty.write_bytes(b"")
    with pytest.raises(wire.WireError, match="empty file"):
        wire.read_file(str(empty))
    with pytest.raises(wire.WireError, match="No such file"):
        wire.read_file(str(tmp_path / "missing.xray"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_only_ever_raise_wire_error(data):
    for prefix in (b"", wire.MAGIC, stream(synthetic.hello(1))):
        reader = wire.FrameReader()
        try:
            reader.feed(prefix + data)
        except wire.WireError:
            pass
        assert reader.pending <= len(prefix) + len(data)


def test_version_2_recordings_still_read_and_unknown_versions_are_refused():
    """Version 3 added the whole job's rank -1; a version-2 stream (every older recording) still reads."""
    for version in (2, 3):
        hello = wire.Hello(version=version, run="old")
        assert wire.decode(wire.encode(hello)[4:]).version == version
    with pytest.raises(wire.WireError, match="protocol version 4, this xray-tui speaks 3"):
        wire.decode(wire.encode(wire.Hello(version=4, run="new"))[4:])
    step = wire.Step(step=1, rank=-1, time=0.0, samples=[])
    assert wire.decode(wire.encode(step)[4:]).rank == -1
