"""Recording a stream to a file that replays like a live one.

The file is :data:`probes.protocol.wire.MAGIC` followed by the frames
exactly as viewers receive them. The probe writes it; the viewer writes one
too when it records what it watches (``tui``), so nothing here imports torch.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time

from probes.protocol import wire

log = logging.getLogger("xray-tui")

#: Seconds between two checks that the file still has a name (a stat call: once a frame, it was
#: a tenth of the recorder's time when Scalars came every step).
REMOVED_CHECK = 1.0


class _Removed(OSError):
    """The recording was deleted while it was written."""


#: The Note a recorder leaves as its last frame when a write failed (``data["why"]``: the error).
STOPPED = "recording-stopped"


class Recorder:
    """Appends frames to a recording file, each written whole before the next.

    A write error (disk full, file too large) or the file's removal is
    reported once; recording stops and training goes on. Everything written
    before stays readable: the torn frame is cut off, and where the room it
    took holds one, a ``recording-stopped`` Note (``note(event, data)``
    encodes it at the stream's step; without ``note``, none) says why, so a
    replay need not guess that the process died.
    """

    def __init__(self, path: str, note=None) -> None:
        self.path = path
        # unbuffered: what is in the file is exactly what write() was told, so a failed write
        # can be cut back to the last whole frame (a buffer would flush its torn rest at close)
        self.f = open(path, "ab", buffering=0)
        self._ino = os.fstat(self.f.fileno()).st_ino
        self._note = note
        self._whole = self.f.seek(0, os.SEEK_END)  # the end of the last whole frame
        self._checked = -math.inf  # when the file's name was last checked
        if self._whole == 0:
            self.write(wire.MAGIC)  # a failure here is reported as any write's

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.f.write(view)
            if not n:
                raise OSError(f"wrote nothing of {len(view)} bytes")
            view = view[n:]

    def write(self, frame: bytes) -> None:
        """Append one encoded frame (a no-op once recording stopped)."""
        if self.f is None:
            return
        try:
            self._write_all(frame)
            # writing to a removed file succeeds and fills the disk invisibly: notice it (within a second)
            now = time.monotonic()
            if now - self._checked >= REMOVED_CHECK:
                self._checked = now
                if os.fstat(self.f.fileno()).st_nlink == 0:
                    raise _Removed(f"the file was removed (inode {self._ino})")
            self._whole += len(frame)
        except OSError as exc:
            log.warning("xray-tui: recording to %s stopped: %s; training goes on", self.path, exc)
            self._leave_note(exc)
            self.close()

    def _leave_note(self, exc: OSError) -> None:
        """Cut the torn frame off and, where there is room, end the file with why it stops."""
        if self._note is None or isinstance(exc, _Removed) or self._whole < len(wire.MAGIC):
            return  # a removed file has no reader to tell; a file without its magic, no frame
        fd = self.f.fileno()
        try:
            os.ftruncate(fd, self._whole)  # frees the torn frame's room (not on a device: ignored)
            self._write_all(self._note(STOPPED, {"why": exc.strerror or str(exc)}))
        except OSError:
            try:
                os.ftruncate(fd, self._whole)  # no room even for the note: the whole frames only
            except OSError:
                pass

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
