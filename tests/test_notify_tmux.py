"""The app's notifications in a real terminal (tmux): the bytes it wrote, and what reached the terminal.

``xray-tui attach --socket`` runs in a tmux pane on a stream served from
this test, which sends alerts when told. ``tmux pipe-pane`` records every
byte the app writes to its pane; a tmux client attached through ``script``
(a pty) records what tmux passed on to the "outer" terminal. Inside tmux the
app wraps OSC 9 and OSC 777 for passthrough, and with ``allow-passthrough
on`` the outer terminal gets them unwrapped; outside tmux (``TMUX`` unset)
the app writes them bare, and tmux's ``monitor-bell`` flags the bell.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from probes.protocol import wire
from tui import synthetic
from tui.app_notify import CATCH_UP

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None or shutil.which("script") is None,
                       reason="needs tmux and script (CI installs tmux in .ci/run)"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTILE = "NaN \x1b]0;pwned\x07 here; more"
OSC9 = re.compile(rb"\x1b\]9;([^\x07\x1b]*)\x07")
OSC777 = re.compile(rb"\x1b\]777;notify;([^;\x07\x1b]*);([^\x07\x1b]*)\x07")
WRAPPED = re.compile(rb"\x1bPtmux;\x1b\x1b\](9|777);([^\x07\x1b]*)\x07\x1b\\")


def alert(layer: str, rule: str = "nonfinite") -> wire.Alert:
    return wire.Alert(step=3, rank=0, severity="critical", rule=rule, layer=layer, kind="act", value=1.0,
                      threshold=0.0, message=HOSTILE)


class Stream:
    """A live run on a Unix socket: hello and three steps at once, then each :meth:`send` when asked."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        os.chmod(path, 0o600)
        self.srv.listen(1)
        self.conn = None
        self.ready = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.conn, _ = self.srv.accept()
        msgs = [synthetic.hello(2, run="notifyrun"), *synthetic.steps(2, 3, elements=32)]
        self.conn.sendall(wire.MAGIC + b"".join(wire.encode(m) for m in msgs))
        self.ready.set()

    def send(self, *msgs) -> None:
        assert self.ready.wait(60), "the app never connected"
        self.conn.sendall(b"".join(wire.encode(m) for m in msgs))

    def close(self) -> None:
        for s in (self.conn, self.srv):
            if s is not None:
                s.close()


class Pane:
    """A tmux server of its own running the app in a pane whose output is recorded from the first byte."""

    def __init__(self, tmp_path, env: str, *, options=()) -> None:
        self.sock = f"xray-notify-{uuid.uuid4().hex[:8]}"
        self.go = tmp_path / "go"
        self.raw = tmp_path / "pane.out"
        app = (f"{sys.executable} -m tui.cli attach --socket {tmp_path / 'run.sock'}")
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", "x", "-x", "120", "-y", "40", "-c", ROOT,
                  f"while [ ! -e {self.go} ]; do sleep 0.05; done; env {env} PYTHONPATH={ROOT} "
                  f"TERM=xterm-256color {app}; echo EXITED $?; sleep 60")
        for opt in options:
            self.tmux("set", "-g", *opt)
        self.tmux("pipe-pane", "-o", "-t", "x", f"cat >> {self.raw}")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], check=True, capture_output=True, text=True,
                              timeout=10).stdout

    def start(self) -> None:
        self.go.touch()

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "x")

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared; last screen:\n{screen}")

    def keys(self, *keys: str) -> None:
        for k in keys:
            self.tmux("send-keys", "-t", "x", k)
            time.sleep(0.1)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=10)


def read_until(path, pattern: re.Pattern, count: int, timeout: float = 20.0) -> bytes:
    """The file's bytes once ``pattern`` matches ``count`` times in them (the pipe lags a little)."""
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        data = path.read_bytes() if path.exists() else b""
        if len(pattern.findall(data)) >= count:
            return data
        time.sleep(0.2)
    raise AssertionError(f"{pattern.pattern!r} came {len(pattern.findall(data))} times, not {count}")


def start_app(pane: Pane) -> None:
    pane.start()
    pane.wait_for("● live")
    time.sleep(CATCH_UP + 0.5)  # past the connection's catch-up, so the next alert is notified on its own


def test_inside_tmux_the_notifications_pass_through_to_the_outer_terminal(tmp_path):
    stream = Stream(str(tmp_path / "run.sock"))
    # tmux sets $TMUX in the pane; the window keeps its size whatever the client's pty says
    pane = Pane(tmp_path, "", options=[("allow-passthrough", "on"), ("window-size", "manual")])
    outer = tmp_path / "outer.out"
    client = subprocess.Popen(["script", "-q", "-c", f"tmux -L {pane.sock} attach -t x", str(outer)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "TERM": "xterm-256color"})
    try:
        start_app(pane)
        stream.send(alert("model.layers.0.fc"), alert("model.layers.0.fc"))  # the second is rate-limited
        pane.wait_for("CRITICAL nonfinite")  # the toast
        read_until(pane.raw, WRAPPED, 2)
        read_until(outer, OSC9, 1)
        time.sleep(1.0)  # had the second alert (same batch) been notified, it would be here by now
        raw, got = pane.raw.read_bytes(), outer.read_bytes()
        # what the app wrote: both sequences, each in tmux's passthrough, ESC doubled inside
        assert [k for k, _ in WRAPPED.findall(raw)] == [b"9", b"777"]
        assert b"\x1b]9;" not in raw.replace(b"\x1b\x1b]9;", b"")  # never bare inside tmux
        # what tmux handed to the terminal outside: OSC 9 and OSC 777, unwrapped, once
        (text,) = OSC9.findall(got)
        assert text.decode() == ("xray-tui notifyrun: CRITICAL nonfinite: model.layers.0.fc [act] at step 3: "
                                 "NaN ]0,pwned here, more")  # the alert's ESC and BEL are gone
        assert OSC777.findall(got) == [(b"xray-tui notifyrun: CRITICAL nonfinite",
                                        b"model.layers.0.fc [act] at step 3: NaN ]0,pwned here, more")]
        assert b"pwned\x07" not in got and b"\x1b]0;pwned" not in got
        assert b"\x07" in OSC777.sub(b"", OSC9.sub(b"", got))  # the bell, passed on by tmux (bell-action)
        stream.send(wire.End(3, 0, "crashed", "ValueError: boom"))
        got = read_until(outer, OSC9, 2)
        assert OSC9.findall(got)[1] == (b"xray-tui notifyrun: run CRASHED: at step 3 (ValueError: boom), "
                                        b"alerts 2 critical, 0 warning")
        assert re.search(rb"\x1b\[[0-9;]*38;5;(?!23[2-9]|24[0-9]|25[0-5])\d+", raw), \
            "the app paints in colour without NO_COLOR (the other test's grey check can fail)"
        pane.keys("q")
        assert "EXITED 0" in pane.wait_for("EXITED", timeout=30)
    finally:
        client.kill()
        client.wait(10)
        pane.kill()
        stream.close()


def test_outside_tmux_bare_sequences_the_bell_flag_the_off_key_and_no_colour(tmp_path):
    stream = Stream(str(tmp_path / "run.sock"))
    pane = Pane(tmp_path, "-u TMUX NO_COLOR=1", options=[("monitor-bell", "on")])
    try:
        start_app(pane)
        assert pane.tmux("display", "-p", "-t", "x", "#{window_bell_flag}").strip() == "0"
        stream.send(alert("model.layers.0.fc"), alert("model.layers.0.fc"))
        pane.wait_for("CRITICAL nonfinite")  # the toast
        raw = read_until(pane.raw, OSC777, 1)
        assert b"Ptmux" not in raw and len(OSC9.findall(raw)) == 1
        assert pane.tmux("display", "-p", "-t", "x", "#{window_bell_flag}").strip() == "1"
        pane.keys("N")
        pane.wait_for("notifications off")
        stream.send(alert("model.layers.1.fc", rule="exploding"))
        pane.wait_for("3 total")
        time.sleep(1.0)
        assert len(OSC9.findall(pane.raw.read_bytes())) == 1  # off: nothing for the new alert
        pane.keys("N")
        pane.wait_for("notifications on")
        stream.send(wire.End(3, 0, "killed", "SIGTERM"))
        raw = read_until(pane.raw, OSC9, 2)
        assert OSC777.findall(raw)[1] == (b"xray-tui notifyrun: run KILLED",
                                          b"at step 3 (SIGTERM), alerts 3 critical, 0 warning")
        # NO_COLOR: every colour the app painted, toasts included, is a grey
        colours = re.findall(rb"\x1b\[[0-9;]*?[34]8;5;(\d+)", raw)
        assert colours and all(232 <= int(c) <= 255 or int(c) in (0, 15, 16, 231) for c in colours), \
            sorted(set(colours))
        assert not re.search(rb"\x1b\[[0-9;]*?[34]8;2;", raw)  # nor any 24-bit colour
        pane.keys("q")
        assert "EXITED 0" in pane.wait_for("EXITED", timeout=30)
    finally:
        pane.kill()
        stream.close()
