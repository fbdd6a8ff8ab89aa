"""How a viewer proves it may watch: the TCP token handshake and the Unix peer check.

A TCP viewer sends ``TOKEN_PREFIX + token + b"\\n"`` (:func:`handshake`)
first, within :data:`HANDSHAKE_TIMEOUT` seconds; the token is random and
lives in a file only the owner can read. A Unix-socket viewer needs no
token, but its peer must be the same user (:func:`same_user`). Both sides
import this module: the probe checks, the viewer (``tui``) sends.
"""

from __future__ import annotations

import hmac
import os
import socket
import struct
import time

#: A TCP viewer sends ``TOKEN_PREFIX + token + b"\n"`` first; a token is 32 hex digits.
TOKEN_PREFIX = b"XRAYTOK1 "
TOKEN_LEN = 32
HANDSHAKE_LEN = len(TOKEN_PREFIX) + TOKEN_LEN + 1
#: Seconds a TCP connection has to send the handshake before it is closed.
HANDSHAKE_TIMEOUT = 1.0


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


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of a Unix socket's peer (Linux SO_PEERCRED), or None where unknown."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    except OSError:
        return None
    return uid


def same_user(sock: socket.socket) -> bool:
    """Whether a Unix socket's peer is this process's user (True where the system cannot tell:
    the socket's 0600 mode in its 0700 directory is the guard then)."""
    uid = peer_uid(sock)
    return uid is None or uid == os.getuid()


class Pending:
    """A TCP connection that has not yet sent its token."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.deadline = time.monotonic() + HANDSHAKE_TIMEOUT

    def read(self, token: str | None) -> bool | None:
        """Take what the connection sent: None while the handshake is incomplete, True once it
        proved it holds ``token``, False when it is to be closed (closed by the peer, speaking
        something else, or a wrong token)."""
        try:
            data = self.sock.recv(HANDSHAKE_LEN - len(self.buf))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        self.buf += data
        if not data or not TOKEN_PREFIX.startswith(self.buf[: len(TOKEN_PREFIX)]):
            return False  # closed, or speaking something else: no need to wait
        if len(self.buf) < HANDSHAKE_LEN:
            return None
        return bool(token) and hmac.compare_digest(self.buf, handshake(token))
