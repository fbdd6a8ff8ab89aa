"""Where viewers find and reach a run: its listening sockets and the files that announce them.

One probe rank serves on a Unix socket in the run directory (0700, the
socket 0600), and, when asked, on TCP with a random token in a 0600 file
beside it; a manifest (``<stem>.json``) tells viewers what runs and where.
All of them go away when the probe closes.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path

from probes.protocol import rundir, wire
from probes.publish.handshake import TOKEN_LEN, parse_tcp

log = logging.getLogger("xray-tui")

#: Connections the kernel keeps waiting for accept() on each listener.
LISTEN_BACKLOG = 16


class Endpoints:
    """A rank's listening sockets, token and manifest; all None until :meth:`open`, and after :meth:`close`."""

    def __init__(self) -> None:
        self.socket_path: Path | None = None
        self.manifest_path: Path | None = None
        self.token_path: Path | None = None
        #: "host:port" of the TCP listener, when there is one.
        self.tcp_address: str | None = None
        #: The TCP token (also in ``token_path``, readable by the owner only).
        self.token: str | None = None
        #: The listening sockets (non-blocking).
        self.unix: socket.socket | None = None
        self.tcp: socket.socket | None = None

    def open(self, hello: wire.Hello, tcp: str | int | bool | None, log_path: str) -> None:
        """Listen for ``hello``'s run and write its manifest (``log_path``: the recording, or "").

        Raises (:class:`~probes.protocol.rundir.RunDirError`, OSError,
        ValueError) with whatever it opened still held: :meth:`close` it.
        """
        d = rundir.ensure_run_dir()
        stem = f"{rundir.safe_name(hello.run)}-{hello.pid}-r{hello.rank}"
        path = d / f"{stem}.sock"
        if path.exists() or path.is_symlink():
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix = sock
        # the directory is 0700, so nobody else can reach the socket between bind and chmod
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self.socket_path = path
        tcp_address = ""
        if tcp not in (None, False):
            host, port = parse_tcp(tcp)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            t = socket.socket(family, socket.SOCK_STREAM)
            self.tcp = t
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
            # the token itself is never logged: logs are often readable by others
            log.warning("xray-tui: TCP viewers on %s; token in %s (readable by you only)",
                        tcp_address, self.token_path)
        self.manifest_path = d / f"{stem}.json"
        rundir.Manifest(
            run=hello.run,
            pid=hello.pid,
            rank=hello.rank,
            world_size=hello.world_size,
            started=hello.started,
            argv=list(hello.argv),
            socket=str(path),
            protocol=wire.PROTOCOL_VERSION,
            tcp=tcp_address,
            log=log_path,
            nodes=len(set(hello.hosts)) or 1,
        ).write(self.manifest_path)

    @property
    def listeners(self) -> list[tuple[socket.socket, bool]]:
        """The open listening sockets, each with whether it is the TCP one."""
        return [(s, tcp) for s, tcp in ((self.unix, False), (self.tcp, True)) if s is not None]

    def close(self) -> None:
        """Close the listeners and remove the socket, token and manifest files."""
        for s in (self.unix, self.tcp):
            if s is not None:
                s.close()
        self.unix = self.tcp = None
        for path in (self.socket_path, self.manifest_path, self.token_path):
            if path is not None:
                try:
                    path.unlink()
                except OSError:
                    pass
        self.socket_path = self.manifest_path = self.token_path = None
