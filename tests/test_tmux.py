"""The real `xray-tui demo` in a real terminal (tmux): keys in, screen out.

Drives the app as a person would: waits for the trainer's first steps, opens
the help, sorts, opens a layer's detail, quits, reading the screen with
``tmux capture-pane`` each time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None,
                       reason="tmux is not installed (CI installs it in .ci/run; locally: apt-get install tmux)"),
]


class Tmux:
    """One detached tmux session running a command, on its own server socket."""

    def __init__(self, command: str, env: dict, cwd: str, size=(120, 40)) -> None:
        self.sock = f"xray-test-{uuid.uuid4().hex[:8]}"
        self.name = "xray"
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        self._tmux("new-session", "-d", "-s", self.name, "-c", cwd, "-x", str(size[0]), "-y", str(size[1]),
                   f"env {exports} {command}; echo EXITED $?; sleep 60")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], check=True, capture_output=True,
                              text=True, timeout=10).stdout

    def screen(self) -> str:
        """The visible pane, as text."""
        return self._tmux("capture-pane", "-p", "-t", self.name)

    def keys(self, *keys: str) -> None:
        """Type keys (tmux key names: Enter, Escape, or literal characters).

        After Escape the terminal app waits a moment to tell a lone escape
        from the start of a sequence (alt+key), so we wait longer than that.
        """
        for key in keys:
            self._tmux("send-keys", "-t", self.name, key)
            time.sleep(0.6 if key == "Escape" else 0.1)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """The screen once ``text`` is on it; fails with the last screen otherwise."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.25)
        raise AssertionError(f"{text!r} never appeared; last screen:\n{screen}")

    def kill(self) -> None:
        """End the session and its server."""
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=10)


def test_demo_in_tmux_help_sort_detail_quit(run_dir):
    env = {"XRAY_TUI_RUN_DIR": str(run_dir), "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}
    cmd = f"{sys.executable} -m tui.cli demo --every 2 --name tmuxdemo"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmux = Tmux(cmd, env, cwd=root)
    try:
        tmux.wait_for("● live", timeout=120)
        screen = tmux.wait_for("act ≈ 0", timeout=60)
        tmux.wait_for("▮", timeout=120)  # the first sampled step has painted its gauges
        assert "tmuxdemo" in screen and "steps/s" in screen and "‖grad‖" in screen
        tmux.keys("?")
        screen = tmux.wait_for("xray-tui keys")
        assert "sort rows" in screen and "per-rank vs merged" in screen
        tmux.keys("Escape")
        tmux.keys("s")
        tmux.wait_for("layer ↓severity")
        tmux.keys("j", "Enter")
        screen = tmux.wait_for("HOT weight")
        assert "samples kept" in screen and "escape: back" in screen
        # The detail's footer offers only keys that work there; its charts carry their legends.
        screen = tmux.wait_for("esc Back")
        footer = next(line for line in screen.splitlines() if "esc Back" in line)
        assert "Back" in footer and "Filter" not in footer and "Sort" not in footer, footer
        assert "━ first kept" in screen and "▚ first kept" not in screen
        tmux.keys("Escape")
        tmux.wait_for("layer ↓severity")
        tmux.keys("p")
        screen = tmux.wait_for("PAUSED")
        assert "p resumes" in screen
        tmux.keys("p")
        tmux.keys("q")
        screen = tmux.wait_for("EXITED", timeout=30)
        assert "EXITED 0" in screen and "Traceback" not in screen
        assert "act ≈ 0" not in screen  # the app's screen is gone: the terminal is back to the shell
    finally:
        tmux.kill()
