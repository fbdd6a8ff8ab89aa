"""Sending notices from headless mode: a command per notice, a webhook POST, each on a thread of its own.

A :class:`Sender` owns a bounded queue and one worker thread: :meth:`Sender.submit`
never blocks (when the queue is full the oldest waiting notice is dropped and
counted), so a command that hangs or an endpoint that never answers cannot
stall the viewer or lose any of the stream it prints. :class:`Notifier` joins
the policy (:mod:`tui.notify`) to the senders; headless mode calls it per
alert, now and then, and at the end.

Failures are one line each on stderr (stdout is the headless output, which
scripts parse).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import TextIO

from probes.protocol import wire
from tui.notify import Notice, NotifyPolicy, printable

#: Notices a sender keeps waiting; past it the oldest is dropped (and counted).
QUEUE_SIZE = 64
#: A webhook POST: seconds per try, tries, and the first wait between tries (doubled each time).
WEBHOOK_TIMEOUT = 5.0
WEBHOOK_TRIES = 3
WEBHOOK_BACKOFF = 1.0
#: Seconds a --notify-cmd command may run before it is killed.
COMMAND_TIMEOUT = 30.0


class Sender:
    """A bounded queue of notices and the thread that delivers them, one at a time, in order."""

    name = "notify"

    def __init__(self, err: TextIO | None = None, maxsize: int = QUEUE_SIZE) -> None:
        self.err = err or sys.stderr
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._closing = threading.Event()
        self.sent = 0
        self.failed = 0
        #: notices dropped because the queue was full (the endpoint fell behind)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"xray-tui-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, notice: Notice) -> None:
        """Queue ``notice``; never blocks (a full queue drops its oldest notice)."""
        while True:
            try:
                self._q.put_nowait(notice)
                return
            except queue.Full:
                try:
                    self._q.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _run(self) -> None:
        while True:
            try:
                notice = self._q.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            try:
                if self.deliver(notice):
                    self.sent += 1
                else:
                    self.failed += 1
            except Exception as exc:  # noqa: BLE001 - a sender's bug must not end the thread, nor the viewer
                self.failed += 1
                self._warn(f"{type(exc).__name__}: {exc}")

    def deliver(self, notice: Notice) -> bool:
        """Send one notice; True when it arrived (subclasses)."""
        raise NotImplementedError

    def _warn(self, text: str) -> None:
        try:
            self.err.write(f"xray-tui: {self.name}: {printable(text, 300)}\n")
            self.err.flush()
        except (OSError, ValueError):
            pass  # stderr closed: nothing left to tell

    def close(self, grace: float) -> None:
        """Deliver what is queued for up to ``grace`` seconds, then give up on the rest and say so."""
        self._closing.set()
        self._thread.join(grace)
        left = self._q.qsize() + (1 if self._thread.is_alive() else 0)
        if left or self.dropped:
            parts = [f"{left} not sent (gave up after {grace:g}s)" if left else "",
                     f"{self.dropped} dropped while the queue was full" if self.dropped else ""]
            self._warn("notifications " + "; ".join(p for p in parts if p))


def environment(notice: Notice) -> dict[str, str]:
    """``XRAY_*`` variables of a notice: XRAY_EVENT, XRAY_SEVERITY, XRAY_TITLE, XRAY_TEXT and one per field
    (XRAY_RULE, XRAY_LAYER, XRAY_STEP, XRAY_MESSAGE, XRAY_REASON, ...); None is empty, NUL is dropped."""
    out = {"XRAY_EVENT": notice.event, "XRAY_SEVERITY": notice.severity, "XRAY_TITLE": notice.title,
           "XRAY_TEXT": notice.text}
    for k, v in notice.fields.items():
        if k in ("type", "event", "severity", "title", "text"):
            continue
        if isinstance(v, (dict, list)):
            v = json.dumps(v)
        out["XRAY_" + "".join(c if c.isalnum() else "_" for c in k).upper()] = "" if v is None else str(v)
    return {k: v.replace("\0", "") for k, v in out.items()}


def _fd(stream):
    """``stream`` if it has a file descriptor (the real stderr), else DEVNULL (a test's StringIO)."""
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL
    return stream


class CommandSender(Sender):
    """``--notify-cmd``: runs ``argv`` per notice, the notice in XRAY_* variables and as JSON on stdin.

    ``argv`` is the user's command split once (shlex) before any alert
    came: an alert's text reaches the command only as data, never through a
    shell. The command's output goes to stderr, so stdout stays headless output.
    """

    name = "notify-cmd"

    def __init__(self, argv: list[str], timeout: float = COMMAND_TIMEOUT, **kw) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        super().__init__(**kw)

    def deliver(self, notice: Notice) -> bool:
        env = {**os.environ, **environment(notice)}
        out = _fd(self.err)
        try:
            done = subprocess.run(self.argv, input=json.dumps(notice.payload()).encode(), env=env,
                                  stdout=out, stderr=out, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            self._warn(f"{self.argv[0]} ran past {self.timeout:g}s and was killed")
            return False
        except OSError as exc:
            self._warn(f"{self.argv[0]}: {exc.strerror or exc}")
            return False
        if done.returncode != 0:
            self._warn(f"{self.argv[0]} exited with {done.returncode}")
            return False
        return True


def slack_escape(text: str) -> str:
    """``&``, ``<`` and ``>`` as Slack asks for them in ``text``: an alert's ``<!channel>`` stays words, no ping."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class WebhookSender(Sender):
    """``--webhook URL``: POSTs each notice as JSON (Slack's ``text`` and the structured fields).

    Each try waits at most ``timeout`` seconds; a failure that may pass (no
    answer, a refused connection, HTTP 5xx or 429) is tried again after
    ``backoff``, 2x``backoff``, ... up to ``tries`` tries; another 4xx is not.
    """

    name = "webhook"

    def __init__(self, url: str, timeout: float = WEBHOOK_TIMEOUT, tries: int = WEBHOOK_TRIES,
                 backoff: float = WEBHOOK_BACKOFF, **kw) -> None:
        self.url = url
        self.timeout = timeout
        self.tries = tries
        self.backoff = backoff
        super().__init__(**kw)

    def deliver(self, notice: Notice) -> bool:
        payload = notice.payload()
        payload["text"] = slack_escape(payload["text"])
        body = json.dumps(payload).encode()
        why = ""
        for attempt in range(self.tries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "xray-tui"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - http(s) checked
                    resp.read(1 << 16)
                return True
            except urllib.error.HTTPError as exc:
                why = f"HTTP {exc.code}"
                if exc.code < 500 and exc.code != 429:
                    break  # the endpoint said no (a bad URL or token): trying again will not help
            except (urllib.error.URLError, OSError) as exc:  # refused, unreachable, timed out
                reason = getattr(exc, "reason", exc)
                why = "no answer in time" if isinstance(reason, TimeoutError) or "timed out" in str(reason) \
                    else str(reason)
        self._warn(f"{notice.event} {notice.title!r} not delivered after {attempt + 1} "
                   f"tr{'y' if attempt == 0 else 'ies'}: {why}")
        return False


class Notifier:
    """Headless mode's notifications: the policy, then every sender.

    :meth:`alert` per alert and :meth:`tick` now and then (``now`` of the
    caller's clock), :meth:`end` once with how the run ended; :meth:`close`
    gives the senders ``grace`` seconds to finish.
    """

    def __init__(self, policy: NotifyPolicy, senders: list[Sender], grace: float = 10.0) -> None:
        self.policy = policy
        self.senders = senders
        self.grace = grace

    def _send(self, notices: list[Notice]) -> None:
        for n in notices:
            for s in self.senders:
                s.submit(n)

    def alert(self, a: wire.Alert, now: float) -> None:
        """An alert arrived."""
        self._send(self.policy.offer(a, now))

    def tick(self, now: float) -> None:
        """Send the summary that came due, if one did."""
        self._send(self.policy.due(now))

    def end(self, notice: Notice) -> None:
        """The run ended (or the viewer left): what was held, then ``notice``."""
        self._send([*self.policy.close(), notice])

    def close(self) -> None:
        """Let the senders finish, for at most ``grace`` seconds in all."""
        deadline = time.monotonic() + self.grace
        for s in self.senders:
            s.close(max(0.0, deadline - time.monotonic()))
