"""How a run ended, for :attr:`probes.protocol.wire.End.reason`, with nothing for the user to do.

A probe is usually closed by ``atexit``, which cannot tell a run that
finished from one that raised, and never runs at all when the process dies
of SIGTERM. So while at least one probe is open this module

- chains ``sys.excepthook`` (called by Python for an exception that leaves
  the main thread, before the ``atexit`` handlers run) to remember it: the
  ``atexit`` close then says ``crashed`` (``Type: message``) or, for
  ``KeyboardInterrupt``, ``interrupted``. The traceback is printed as before
  (the previous hook is called), and the exit status is Python's own;
- installs a handler for SIGTERM and SIGHUP, only in the main thread and
  only where the handler is the default one (a handler of the user's or of
  a framework is left alone): it closes the open probes with ``killed``,
  then restores the default handler and raises the signal again, so the
  process dies of it as it would have (exit status -15 for SIGTERM).

Both are removed when the last probe closes (each only if it is still ours).
SIGINT needs nothing: Python turns it into ``KeyboardInterrupt``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

#: signals whose default action (terminate) we intercept to send End(reason="killed") first
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)
#: seconds a signal handler waits for the probes to close before the process dies anyway
CLOSE_TIMEOUT = 10.0
#: longest ``error`` text an End carries
MAX_ERROR = 500

_lock = threading.RLock()
_open: list = []  # open probes (objects with close(reason, error)), oldest first
_prev_excepthook = None
_installed_signals: dict[int, object] = {}  # signal -> the handler it had (SIG_DFL)
_uncaught: BaseException | None = None  # what left the main thread, seen by our excepthook
_last_value_before = None  # sys.last_value when we installed (the fallback ignores that one)
_installed_pid = 0  # the process that installed the hooks


def describe(exc: BaseException | None) -> str:
    """``Type: message`` of an exception (just the type when the message is empty), capped."""
    if exc is None:
        return ""
    text = str(exc).strip()
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return out if len(out) <= MAX_ERROR else out[:MAX_ERROR - 1] + "…"


def reason_of(exc: BaseException | None) -> tuple[str, str]:
    """``(reason, error)`` for an exception that ended the training loop (None: it finished)."""
    if exc is None:
        return "finished", ""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", ""
    if isinstance(exc, SystemExit):
        return ("finished", "") if exc.code in (0, None) else ("crashed", f"SystemExit: {exc.code}")
    return "crashed", describe(exc)


def exit_reason() -> tuple[str, str]:
    """How the process is ending, as far as we can tell: an uncaught exception or ``finished``.

    Our excepthook's record first; else a ``sys.last_value`` set since we
    installed (Python sets it for an uncaught exception even when someone
    replaced ``sys.excepthook`` after us).
    """
    exc = _uncaught
    if exc is None:
        last = getattr(sys, "last_value", None)
        if last is not None and last is not _last_value_before:
            exc = last
    return reason_of(exc)


def _excepthook(exc_type, exc, tb) -> None:
    global _uncaught
    _uncaught = exc if exc is not None else exc_type()
    (_prev_excepthook or sys.__excepthook__)(exc_type, exc, tb)


def _on_signal(signum, frame) -> None:
    """Close every open probe with ``killed``, then die of the signal as the default handler would."""
    name = signal.Signals(signum).name
    with _lock:
        # a forked child (a DataLoader worker) inherits the handler but not the probes' threads:
        # it only dies of the signal, as it would have
        probes = list(_open) if os.getpid() == _installed_pid else []
    # The close runs on a thread of its own, so a lock the interrupted main thread holds
    # (e.g. the publisher's queue) can delay it, never deadlock it: after CLOSE_TIMEOUT we die anyway.
    closer = threading.Thread(target=close_all, args=(probes, "killed", name), name="xray-tui-signal", daemon=True)
    closer.start()
    closer.join(CLOSE_TIMEOUT)
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def close_all(probes, reason: str, error: str = "") -> None:
    """Close each probe with ``reason``; one that fails does not stop the others."""
    for p in probes:
        try:
            p.close(reason, error)
        except Exception:  # noqa: BLE001 - dying anyway; the others still get their End
            pass


def register(probe) -> None:
    """Track an open probe; the first one installs the hooks."""
    global _prev_excepthook, _uncaught, _last_value_before, _installed_pid
    with _lock:
        _open.append(probe)
        if len(_open) > 1:
            return
        _uncaught = None
        _installed_pid = os.getpid()
        _last_value_before = getattr(sys, "last_value", None)
        if sys.excepthook is not _excepthook:
            _prev_excepthook = sys.excepthook
            sys.excepthook = _excepthook
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                try:
                    current = signal.getsignal(sig)
                    if current is signal.SIG_DFL:
                        signal.signal(sig, _on_signal)
                        _installed_signals[sig] = signal.SIG_DFL
                    elif current is _on_signal:  # left by a probe closed off the main thread
                        _installed_signals.setdefault(sig, signal.SIG_DFL)
                except (ValueError, OSError):  # not settable here (an embedded interpreter)
                    pass


def unregister(probe) -> None:
    """Forget a closed probe; the last one removes the hooks (those still ours)."""
    global _prev_excepthook
    with _lock:
        if probe in _open:
            _open.remove(probe)
        if _open:
            return
        if sys.excepthook is _excepthook:
            sys.excepthook = _prev_excepthook or sys.__excepthook__
        _prev_excepthook = None
        if threading.current_thread() is threading.main_thread():
            for sig, previous in list(_installed_signals.items()):
                try:
                    if signal.getsignal(sig) is _on_signal:
                        signal.signal(sig, previous)
                except (ValueError, OSError):
                    pass
                del _installed_signals[sig]
