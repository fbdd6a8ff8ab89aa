"""The app on a socket that is not a probe: the whole reason, and after a few failed handshakes an
offer to quit (it retried forever, the reason cut at the header's edge)."""

from __future__ import annotations

import json
import os
import socket
import threading

from test_app import screen_text
from tui.app import XRayApp
from tui.not_a_probe import NotAProbeScreen
from tui.reattach import GIVE_UP_AFTER, ReattachSource


def not_a_probe(run_dir, name="impostor"):
    """A socket under a live run's manifest that answers every connection with bytes that are not a
    probe's; the caller closes the returned listener."""
    path = run_dir / f"{name}-{os.getpid()}-r0.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    os.chmod(path, 0o600)
    srv.listen(8)
    (run_dir / f"{name}-{os.getpid()}-r0.json").write_text(json.dumps(
        {"run": name, "pid": os.getpid(), "rank": 0, "world_size": 1, "started": 1.0, "socket": str(path)}))

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # some other server's greeting
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv


async def test_a_socket_that_is_not_a_probe_says_why_in_full_and_offers_to_quit(run_dir):
    name = "an-impostor-that-is-no-probe"  # a reason longer than the header's room
    srv = not_a_probe(run_dir, name)
    app = XRayApp(ReattachSource(name, poll=0.05))
    toasts = []
    real_notify = app.notify
    app.notify = lambda message, **kw: (toasts.append(message), real_notify(message, **kw))
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            for _ in range(200):
                await pilot.pause(0.02)
                if isinstance(app.screen, NotAProbeScreen):
                    break
            screen = app.screen
            assert isinstance(screen, NotAProbeScreen), screen_text(app)
            assert screen.failures == GIVE_UP_AFTER
            why = screen.why
            assert len(why) > 100 and why.startswith(str(run_dir)) and why.endswith("not an xray-tui stream (bad magic)")
            for _ in range(5):
                await pilot.pause(0.05)
            text = "".join(screen_text(app).replace("│", " ").split())
            assert "".join(why.split()) in text  # the whole reason on screen, wrapped, not cut
            assert f"{GIVE_UP_AFTER}handshakesinarowfailed" in text and "qquit" in text
            assert len(toasts) == 1 and toasts[0] == why  # the first failure's toast: said once, whole
            await pilot.press("q")
            for _ in range(50):
                await pilot.pause(0.02)
                if not app.is_running:
                    break
            assert not app.is_running and app._stop.is_set()  # quit: the app and its reader stopped
    finally:
        srv.close()


async def test_escape_keeps_retrying_and_the_offer_is_not_repeated(run_dir):
    srv = not_a_probe(run_dir, "other")
    app = XRayApp(ReattachSource("other", poll=0.02))
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            for _ in range(200):
                await pilot.pause(0.02)
                if isinstance(app.screen, NotAProbeScreen):
                    break
            assert isinstance(app.screen, NotAProbeScreen)
            await pilot.press("escape")
            await pilot.pause(0.5)  # many more failed handshakes
            assert not isinstance(app.screen, NotAProbeScreen) and app.is_running
            assert app.connection.startswith("disconnected — retrying")
    finally:
        srv.close()
