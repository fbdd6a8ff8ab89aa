"""The xray-tui wire format: versioned msgpack frames behind a length prefix.

A stream (a socket connection or a recording file) starts with the 8-byte
``MAGIC``; then each frame is a 4-byte big-endian length followed by one
msgpack-encoded message. The first message is always a :class:`Hello`.
Every frame from outside is untrusted: its size is capped, its schema is
checked by msgspec, and anything malformed raises :class:`WireError` with a
one-line reason. The message types are :mod:`probes.protocol.messages`'s;
the ones a reader of frames names (``wire.Step``, ``wire.Alert``) are
imported here too. Numpy and msgspec only: the viewer uses it without torch.
"""

from __future__ import annotations

import struct
from typing import Iterator

import msgspec

from probes.protocol import histogram
from probes.protocol.messages import (JOB_RANK, Alert, End, Hello, LayerInfo, Message, Note, RankStats, Request,
                                      Sample, Scalars, Spectral, Step, encode_counts)

__all__ = ["JOB_RANK", "Alert", "End", "Hello", "LayerInfo", "Message", "Note", "RankStats", "Request", "Sample",
           "Scalars", "Spectral", "Step", "encode_counts"]  # the message types, for readers of frames

#: 3: the whole job of a multi-node run (rank -1 in Step, Alert and Note; RankStats). A version-2
#: stream is a version-3 stream without them, so recordings of either replay; a viewer that reads
#: only 2 refuses a version-3 probe with "upgrade the older side" instead of failing on a rank -1.
PROTOCOL_VERSION = 3
#: Versions this side reads.
READABLE_VERSIONS = frozenset({2, 3})
MAGIC = b"XRAYTUI\x01"
#: Largest frame accepted; a bigger length prefix is refused before reading.
MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct(">I")


class WireError(Exception):
    """A stream or frame that is not a valid xray-tui message."""


# -- viewer -> probe ---------------------------------------------------------

#: Largest frame body a viewer may send to a probe. A Request is about 30 bytes.
MAX_REQUEST = 256
#: Request frames one read may complete; more in one read is a flood, not a person pressing a key.
MAX_REQUESTS_PER_READ = 16


_request_decoder = msgspec.msgpack.Decoder(Request)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    """One frame: length prefix plus the msgpack body."""
    body = _encoder.encode(msg)
    if len(body) > MAX_FRAME:
        raise WireError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte cap")
    return _LEN.pack(len(body)) + body


def encode_request(what: str) -> bytes:
    """The frame a viewer sends to ask for ``what`` (length prefix plus msgpack)."""
    body = _encoder.encode(Request(what))
    if len(body) > MAX_REQUEST:
        raise WireError(f"request of {len(body)} bytes exceeds the {MAX_REQUEST}-byte cap")
    return _LEN.pack(len(body)) + body


class RequestReader:
    """The probe's reader of one viewer's bytes: :class:`Request` frames and nothing else.

    Memory is bounded: it holds at most one partial frame (4 + MAX_REQUEST
    bytes). The first thing that is not a Request frame (a length prefix
    over :data:`MAX_REQUEST`, a body that is not a Request, more than
    :data:`MAX_REQUESTS_PER_READ` frames in one read) makes the reader
    ``deaf``: from then on every byte from that viewer is discarded, as
    before requests existed, and the viewer keeps receiving the stream.
    Nothing received is evaluated: a body is only msgspec-decoded into a
    Request with a short string field.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.deaf = False
        #: Why the reader went deaf ("" while it listens).
        self.why = ""

    def _stop(self, why: str) -> list:
        self.deaf = True
        self.why = why
        self._buf = bytearray()
        return []

    def feed(self, data: bytes) -> list[Request]:
        """Add bytes; return the requests they complete (nothing once deaf)."""
        if self.deaf:
            return []
        self._buf += data
        out: list[Request] = []
        while len(self._buf) >= _LEN.size:
            (size,) = _LEN.unpack_from(self._buf)
            if size > MAX_REQUEST:
                return self._stop(f"frame of {size} bytes exceeds the {MAX_REQUEST}-byte request cap")
            if len(self._buf) < _LEN.size + size:
                break
            body = bytes(self._buf[_LEN.size : _LEN.size + size])
            del self._buf[: _LEN.size + size]
            try:
                out.append(_request_decoder.decode(body))
            except (msgspec.MsgspecError, ValueError):
                return self._stop("a frame that is not a request")
            if len(out) > MAX_REQUESTS_PER_READ:
                return self._stop(f"more than {MAX_REQUESTS_PER_READ} requests in one read")
        return out


def decode(body: bytes) -> Message:
    """Decode and validate one frame body."""
    try:
        msg = _decoder.decode(body)
    except (msgspec.MsgspecError, ValueError) as exc:  # ValueError: invalid UTF-8 in a string, found by fuzzing
        raise WireError(f"malformed frame: {exc}") from None
    if isinstance(msg, Hello) and msg.version not in READABLE_VERSIONS:
        raise WireError(
            f"protocol version {msg.version}, this xray-tui speaks {PROTOCOL_VERSION}: "
            "upgrade the older side"
        )
    if isinstance(msg, Sample):  # pragma: no cover - Sample is never a top-level message
        raise WireError("malformed frame: bare sample")
    if isinstance(msg, Step):
        # the schema bounds hist_lo, not the run's end: a run past the last bin would
        # break every consumer of the fixed edges (quantiles, export, the sparkline)
        for s in msg.samples:  # arithmetic on the byte count: an array per sample cost a viewer 0.4 s per 150k
            width = 2 if s.hist_n < 1 << 16 else 4
            nbytes = len(s.hist_counts)
            if nbytes % width:
                raise WireError(f"malformed frame: histogram of {s.layer[:80]!r} is not a whole number of counts")
            if s.hist_lo + nbytes // width > histogram.NUM_BINS:
                raise WireError(f"malformed frame: histogram of {s.layer[:80]!r} runs past bin {histogram.NUM_BINS - 1}")
    return msg


class FrameReader:
    """Incremental decoder: feed bytes as they arrive, get whole messages.

    Checks the magic, that the first message is a Hello, and the size cap.
    ``pending`` is the number of bytes of an incomplete frame held back.
    """

    def __init__(self, source: str = "stream") -> None:
        self.source = source
        self._buf = bytearray()
        self._magic_ok = False
        self._hello: Hello | None = None

    @property
    def hello(self) -> Hello | None:
        """The stream's Hello, once read."""
        return self._hello

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buf)

    def _fail(self, why: str) -> WireError:
        return WireError(f"{self.source}: {why}")

    def feed(self, data: bytes) -> list[Message]:
        """Add bytes; return every message they complete (may be empty)."""
        self._buf += data
        out: list[Message] = []
        if not self._magic_ok:
            if len(self._buf) < len(MAGIC):
                if not MAGIC.startswith(bytes(self._buf)):
                    raise self._fail("not an xray-tui stream (bad magic)")
                return out
            if self._buf[: len(MAGIC)] != MAGIC:
                raise self._fail("not an xray-tui stream (bad magic)")
            del self._buf[: len(MAGIC)]
            self._magic_ok = True
        while len(self._buf) >= _LEN.size:
            (size,) = _LEN.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise self._fail(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte cap")
            if len(self._buf) < _LEN.size + size:
                break
            body = bytes(self._buf[_LEN.size : _LEN.size + size])
            del self._buf[: _LEN.size + size]
            try:
                msg = decode(body)
            except WireError as exc:
                raise self._fail(str(exc)) from None
            if self._hello is None:
                if not isinstance(msg, Hello):
                    raise self._fail("stream does not start with a hello message")
                self._hello = msg
            out.append(msg)
        return out


def read_file(path: str, chunk: int = 1 << 20) -> tuple[list[Message], int]:
    """Read a whole recording: its messages and the number of torn tail bytes.

    A recording cut short by a crash ends in a partial frame; everything up
    to the last whole frame is returned and the torn bytes are counted.
    Raises :class:`WireError` for a file that is not a recording.
    """
    msgs, torn = [], 0
    for batch, torn in iter_file(path, chunk):
        msgs.extend(batch)
    return msgs, torn


def iter_file(path: str, chunk: int = 1 << 20) -> Iterator[tuple[list[Message], int]]:
    """Stream a recording as batches of messages; the torn byte count rides along."""
    reader = FrameReader(source=path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise WireError(f"{path}: {exc.strerror}") from None
    with f:
        if not f.read(1):
            raise WireError(f"{path}: empty file, not an xray-tui recording")
        f.seek(0)
        while data := f.read(chunk):
            yield reader.feed(data), reader.pending
    if reader.hello is None:
        raise WireError(f"{path}: not an xray-tui recording (no hello message)")
