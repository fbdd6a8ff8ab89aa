"""Recording a stream to a file that replays like a live one.

The file is :data:`probes.protocol.wire.MAGIC` followed by the frames
exactly as viewers receive them. The probe writes it; the viewer writes one
too when it records what it watches (``tui``), so nothing here imports torch.
"""

from __future__ import annotations

import itertools
import logging
import os

from probes.protocol import wire

log = logging.getLogger("xray-tui")


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
        """Append one encoded frame (a no-op once recording stopped)."""
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
        """Stop recording; what was written stays."""
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
