"""``--headless``: alerts and status lines on stdout instead of the app, and the exit status.

Used by ``attach --headless`` and ``replay --headless`` (a stream read
here) and by ``demo --headless`` (which trains in-process and borrows
:func:`rules_engine` and the printer's settings).
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time

from tui.commands.checks import seconds
from tui.commands.errors import CliError
from tui.commands.notify import headless_notifier
from tui.headless import AlertPrinter, RunWatch
from tui.notify import end_notice


def rules_engine(args):
    """A RuleEngine with the thresholds of ``--rules FILE``, or None without it."""
    if not getattr(args, "rules", None):
        return None
    from probes.rules import RuleEngine
    from probes.rules.config import RulesConfigError, load

    try:
        return RuleEngine(load(args.rules))
    except RulesConfigError as exc:
        raise CliError(str(exc)) from None


def status_every(args) -> float | None:
    """Seconds between status lines (``--status-every``); None for none (``--quiet`` or 0)."""
    every = seconds(args.status_every, "--status-every")
    return None if args.quiet or every <= 0 else every


def headless(source, args, *, live: bool) -> int:
    """Print alerts and status lines from ``source``, then how the run ended; pick the exit code.

    Exit 3 as soon as an alert meets ``--fail-on`` (the run may go on), else
    0 when the run finished or stopped, 1 when it crashed, was killed or
    interrupted, or the stream stopped without an End. Status lines come
    every ``--status-every`` seconds: of the wall clock when live (a hung
    run still gets them), of the probe's own timestamps in a replay.
    """
    every = status_every(args)
    printer = AlertPrinter(as_json=args.json, rules=rules_engine(args))
    printer.fail_on = args.fail_on
    watch = RunWatch(printer, live=live, label=source.label)
    notifier = headless_notifier(args, run=source.label)  # --notify-cmd, --webhook: None without them
    tick = None
    if notifier is not None:
        # live: the wall clock; a replay: the probe's own, so it is rate-limited as the run was
        def clock() -> float:
            return time.monotonic() if live else (watch.newest_time or 0.0)

        def tick() -> None:
            notifier.tick(clock())

        printer.on_alert = lambda a: notifier.alert(a, clock())
    try:
        if live:
            _watch_live(source, watch, every, tick)
        else:
            _watch_replay(source, watch, every, tick)
    except KeyboardInterrupt:
        _notify_end(notifier, watch, "viewer-interrupted", 130)
        return 130
    except Exception:  # a stream that broke mid-way (a one-line error follows): tell whoever waits on it
        _notify_end(notifier, watch, "disconnected", 2)
        raise
    torn = getattr(source, "torn", 0)
    if torn:
        print(f"xray-tui: {source.label}: the recording ends with {torn} torn bytes "
              "(the writer stopped mid-frame); everything before them was read", file=sys.stderr)
    code = watch.finish(args.fail_on)
    _notify_end(notifier, watch, None, code)
    return code


def _notify_end(notifier, watch: RunWatch, reason: str | None, code: int) -> None:
    """Tell --notify-cmd and --webhook how the run ended (``reason`` None: as the end line says), then
    give them their grace to finish."""
    if notifier is None:
        return
    error = ""
    step = watch.step
    if reason is None and watch.tripped is not None:
        reason = "fail-on"
        t = watch.tripped
        error = f"{t.severity} {t.rule} on {t.layer} [{t.kind}] at step {t.step}"
    elif reason is None:
        reason, error, step, _rank = watch.outcome()
    try:
        notifier.end(end_notice(reason, run=watch.label, step=step, error=error,
                                counts=dict(watch.printer.counts), code=code))
        notifier.close()  # what is queued gets its grace, then the viewer exits anyway
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: leave without the notices still queued


#: The reader thread's last item: the stream ended.
_DONE = object()


def _watch_live(source, watch: RunWatch, every: float | None, tick=None) -> None:
    """Read the live source on a thread of its own, so status lines keep their clock while the
    run is quiet; return when the stream ends or ``--fail-on`` trips (the reader is stopped)."""
    q: queue.Queue = queue.Queue(maxsize=256)
    stop = threading.Event()

    def read() -> None:
        item = _DONE
        try:
            for batch in source.batches(stop):
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            item = exc
        q.put(item)

    reader = threading.Thread(target=read, name="xray-tui-headless-reader", daemon=True)
    reader.start()
    next_status = time.monotonic() + every if every else math.inf
    try:
        while True:
            try:
                item = q.get(timeout=max(0.0, min(next_status - time.monotonic(), 1.0)))
            except queue.Empty:
                item = None
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            for msg in item or ():
                watch.handle(msg)
                if watch.tripped is not None:
                    return
            if tick is not None:
                tick()
            if time.monotonic() >= next_status:
                watch.status()
                next_status += every * (math.floor((time.monotonic() - next_status) / every) + 1)
    finally:
        stop.set()
        reader.join(2.0)  # the recording (--log) is closed by the reader's generator


def _watch_replay(source, watch: RunWatch, every: float | None, tick=None) -> None:
    """Read a recording; status lines at each ``every`` seconds of the probe's own clock."""
    next_status = None
    stop = threading.Event()
    gen = source.batches(stop)
    try:
        for batch in gen:
            for msg in batch:
                watch.handle(msg)
                if watch.tripped is not None:
                    return
                t = watch.newest_time
                if every and t is not None:
                    if next_status is None:
                        next_status = t + every
                    elif t >= next_status:
                        watch.status()
                        next_status += every * (math.floor((t - next_status) / every) + 1)
            if tick is not None:
                tick()
    finally:
        gen.close()
