"""The notification options: checked before any screen opens or any work starts, then built.

``--notify-on``, ``--notify-interval`` and ``--no-notify`` go with the app
and headless mode; ``--notify-cmd``, ``--webhook`` and ``--webhook-timeout``
with ``--headless`` (attach, replay). A bad value is a
:class:`~tui.commands.errors.CliError`: one line, exit 2.
"""

from __future__ import annotations

import math
import shlex
import shutil
import urllib.parse

from tui.commands.errors import CliError
from tui.notify import NotifyPolicy
from tui.notify_send import WEBHOOK_BACKOFF, WEBHOOK_TIMEOUT, CommandSender, Notifier, WebhookSender


def interval(args) -> float:
    """``--notify-interval`` MINUTES as seconds (0: no limit)."""
    text = getattr(args, "notify_interval", None) or "10"
    try:
        minutes = float(text)
    except ValueError:
        minutes = math.nan
    if not math.isfinite(minutes) or minutes < 0:
        raise CliError(f"--notify-interval must be a number of minutes >= 0, got {text!r}")
    return minutes * 60.0


def app_options(args) -> dict:
    """The app's ``notify_on`` (None: off) and ``notify_interval``."""
    seconds = interval(args)
    on = None if getattr(args, "no_notify", False) else (getattr(args, "notify_on", None) or "critical")
    return {"notify_on": on, "notify_interval": seconds}


def command(text: str) -> list[str]:
    """``--notify-cmd``: split once, as a shell would split words, and found; never run by a shell."""
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise CliError(f"--notify-cmd {text!r}: {exc}") from None
    if not argv:
        raise CliError("--notify-cmd is empty; give a command, e.g. --notify-cmd 'notify-send xray-tui'")
    if shutil.which(argv[0]) is None:
        raise CliError(f"--notify-cmd: {argv[0]}: no such command (not on $PATH, or not executable)")
    return argv


def webhook(url: str) -> str:
    """``--webhook``: an http or https URL with a host, or ``@FILE`` holding one.

    A Slack webhook URL is a secret, and other users can read a command line
    in the process list: ``@FILE`` (mode 600) keeps it off it."""
    if url.startswith("@"):
        try:
            with open(url[1:], encoding="utf-8") as f:
                url = f.readline().strip()
        except OSError as exc:
            raise CliError(f"--webhook {url}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise CliError(f"--webhook {url}: not a text file") from None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"--webhook must be an http:// or https:// URL (or @FILE holding one), got {url[:80]!r}")
    return url


def webhook_timeout(args) -> float:
    """``--webhook-timeout`` SECONDS > 0."""
    text = getattr(args, "webhook_timeout", None)
    if text is None:
        return WEBHOOK_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 600):
        raise CliError(f"--webhook-timeout must be a number of seconds > 0 (at most 600), got {text!r}")
    return value


def headless_notifier(args, run: str = "") -> Notifier | None:
    """The :class:`~tui.notify_send.Notifier` of ``--notify-cmd`` and ``--webhook``; None without either.

    Everything is checked before a sender thread starts, so a bad value
    leaves nothing behind."""
    cmd, url = getattr(args, "notify_cmd", None), getattr(args, "webhook", None)
    seconds = interval(args)
    timeout = webhook_timeout(args)
    if cmd is None and url is None:
        if getattr(args, "webhook_timeout", None) is not None:
            raise CliError("--webhook-timeout goes with --webhook URL")
        return None
    argv = command(cmd) if cmd is not None else None
    url = webhook(url) if url is not None else None
    senders = []
    if argv is not None:
        senders.append(CommandSender(argv))
    if url is not None:
        # the first wait between tries is a second, or the try's own timeout when that is shorter
        senders.append(WebhookSender(url, timeout=timeout, backoff=min(WEBHOOK_BACKOFF, timeout)))
    policy = NotifyPolicy(getattr(args, "notify_on", None) or "critical", seconds, run=run)
    # at the end, what is queued gets a few tries' worth of time, then the viewer exits anyway
    return Notifier(policy, senders, grace=max(5.0, 2 * timeout))
