"""Checks of the command line's files and numbers, made before any screen opens or work starts.

Each failure is a :class:`~tui.commands.errors.CliError`: one line on
stderr and exit status 2, never a traceback and never an app that opens
only to say that its input was wrong.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from probes.protocol import rundir, wire
from tui.commands.errors import CliError


def check_recording(path: str) -> None:
    """A recording given on the command line: a file whose first frame is an xray-tui hello
    (read before any screen opens, so a wrong file is a one-line error, not an app)."""
    if os.path.isdir(path):
        raise CliError(f"{path}: is a directory, not a recording")
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    reader = wire.FrameReader(source=path)
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            whole = not f.read(1)
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from None
    if not head:
        raise CliError(f"{path}: empty file, not an xray-tui recording")
    reader.feed(head)  # WireError (bad magic, a first frame that is not a hello) is a one-line error
    if reader.hello is None and whole:
        raise CliError(f"{path}: not an xray-tui recording (no hello message)")


def check_sockets(paths) -> None:
    """``--socket`` paths: each one exists and is a private socket (checked before the app opens)."""
    for path in paths:
        if path.startswith("tcp:"):
            continue
        try:
            os.lstat(path)
        except FileNotFoundError:
            raise CliError(f"{path}: no such socket (see `xray-tui ls` for live runs)") from None
        except PermissionError:
            # it may well exist: a directory on its path is not open to you (another user's run directory)
            raise CliError(f"{path}: permission denied: a directory on its path is not open to you, "
                           "so it cannot be looked at, let alone attached to") from None
        except OSError as exc:
            raise CliError(f"{path}: {exc.strerror or exc}") from None
        try:
            rundir.check_private(Path(path), want_dir=False)
        except rundir.RunDirError as exc:
            raise CliError(str(exc)) from None
        if not os.access(path, os.R_OK | os.W_OK):
            raise CliError(f"{path}: permission denied: the socket exists, but its mode "
                           f"({os.lstat(path).st_mode & 0o777:o}) lets you not connect to it")


def check_writable(path: str | None, what: str = "--log") -> None:
    """A file to be written: its folder exists and it is not a folder (checked before any work)."""
    if not path:
        return
    if os.path.isdir(path):
        raise CliError(f"{what} {path}: is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"{what} {path}: no such directory {folder}")
    if not os.access(folder, os.W_OK):
        raise CliError(f"{what} {path}: {folder} is not writable")


def check_theme(name: str | None) -> None:
    """``--theme``: a theme the app knows (checked before a trainer starts or a model is built)."""
    if name is None:
        return
    import themes  # imports textual.theme alone (0.1 s), never the app

    known = themes.known()
    if name not in known:
        raise CliError(f"unknown theme {name!r} (known: {', '.join(known)})")


def seconds(text: str, flag: str) -> float:
    """``text`` as seconds >= 0, or a one-line error naming ``flag``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise CliError(f"{flag} must be a number of seconds >= 0, got {text!r}")
    return value


def number(text: str, kind, flag: str, what: str):
    """``text`` as an int or float, or a one-line error naming ``flag`` (checked for range later)."""
    try:
        return kind(text)
    except ValueError:
        raise CliError(f"{flag} must be {what}, got {text!r}") from None
