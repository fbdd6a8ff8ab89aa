"""A viewer that fell behind is told which steps it lost, once per episode (tui/drops.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from probes.protocol import wire
from probes.publish.publisher import Publisher
from tui import synthetic
from tui.drops import DropWatch
from tui.headless import AlertPrinter, RunWatch


def scalars(step, rank=0):
    return wire.Scalars(step, rank, 1000.0 + step, {"loss": 1.0})


def drops(frames, rank=0, queue=0):
    return wire.Note(0, rank, "drops", {"frames": frames, "all_viewers": frames, "queue": queue})


def test_one_episode_one_report_with_the_steps_that_never_arrived():
    w = DropWatch(quiet=2.0)
    out = []
    for s in range(5):
        out += w.handle(scalars(s), now=10.0)
    out += w.handle(scalars(40), now=20.0)  # the gap comes before the note that explains it
    out += w.handle(drops(70), now=20.01)
    out += w.handle(drops(90), now=20.02)  # the same episode: more notes while it catches up
    out += w.handle(scalars(41), now=20.03)
    out += w.handle(scalars(60), now=20.04)
    out += w.handle(scalars(61), now=21.0)
    assert out == []  # not over yet
    out += w.handle(scalars(62), now=22.5)
    assert len(out) == 1
    ep = out[0]
    assert ep.gaps == [(5, 39), (42, 59)] and ep.steps == 35 + 18 and ep.frames == 90 and ep.started == 20.01
    assert "53 steps never arrived (5-39, 42-59), 90 frames dropped" in ep.text()
    assert w.close() == [] and w.due(100.0) == []  # said once
    # a second episode later is its own
    w.handle(drops(95), now=50.0)
    w.handle(scalars(70), now=50.1)
    (again,) = w.close()
    assert again.gaps == [(63, 69)] and again.frames == 5


def test_gaps_no_note_explains_are_not_losses_and_sampled_steps_count_by_every():
    w = DropWatch()
    w.handle(synthetic.hello(1), now=0.0)
    for s in (280, 281, 290):  # a late viewer's backlog: not a loss of this viewer
        w.handle(scalars(s), now=1.0)
    assert w.close() == []
    import msgspec

    hello = msgspec.structs.replace(synthetic.hello(1), every=10)
    w = DropWatch()
    w.handle(hello, now=0.0)
    for s, t in ((0, 1.0), (10, 1.0), (60, 9.0)):
        w.handle(wire.Step(s, 0, 1.0, []), now=t)
    w.handle(drops(4), now=9.0)
    (ep,) = w.close()
    assert ep.sampled and ep.gaps == [(20, 50)] and ep.steps == 4 and "4 sampled steps never arrived" in ep.text()


def test_headless_prints_the_episode_once_in_text_and_json():
    for as_json in (False, True):
        import io

        buf = io.StringIO()
        watch = RunWatch(AlertPrinter(out=buf, as_json=as_json), live=True)
        for m in [synthetic.hello(1), scalars(0), scalars(1), scalars(30), drops(40), scalars(31)]:
            watch.handle(m)
        watch.status()
        watch.handle(wire.End(32, 0, "finished"))
        watch.finish()
        said = [line for line in buf.getvalue().splitlines() if "DROPS" in line or '"drops"' in line]
        assert len(said) == 1, buf.getvalue()
        if as_json:
            got = json.loads(said[0])
            assert got["type"] == "drops" and got["steps_lost"] == 28 and got["gaps"] == [[2, 29]]
        else:
            assert said[0].startswith("step       2  DROPS") and "28 steps never arrived" in said[0]


@pytest.mark.slow
def test_a_stopped_headless_viewer_says_how_many_steps_it_lost(tmp_path):
    """A real publisher, a real `attach --headless` SIGSTOPped while 300 steps go by: it prints one
    drops line whose lost steps are exactly the steps absent from what it received (its --log)."""
    pub = Publisher(synthetic.hello(4, run="laggard"), viewer_buffer=64 * 1024)
    viewer = subprocess.Popen([sys.executable, "-m", "tui.cli", "attach", "--socket", str(pub.socket_path),
                               "--headless", "--json", "--log", str(tmp_path / "v.xray")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not pub.viewers.connected:
            assert time.monotonic() < deadline and viewer.poll() is None, "the viewer never connected"
            time.sleep(0.02)
        for v in pub.viewers.connected.values():
            v.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the probe's buffer is what fills
        steps = synthetic.steps(4, 330, elements=4096)

        def publish(lo, hi):
            for s in steps[lo:hi]:
                pub.submit(lambda s=s: [s, scalars(s.step)])
                if s.step % 10 == 9 or s.step == hi - 1:  # the probe's own queue keeps up
                    deadline = time.monotonic() + 30
                    while not (pub.queue.empty() and pub._last_step == s.step):
                        assert time.monotonic() < deadline
                        time.sleep(0.01)

        publish(0, 5)
        time.sleep(0.5)
        os.kill(viewer.pid, signal.SIGSTOP)
        try:
            publish(5, 305)
        finally:
            os.kill(viewer.pid, signal.SIGCONT)
        time.sleep(0.5)
        publish(305, 330)
        pub.submit(lambda: wire.End(330, 0, "finished"))
        pub.close()
        out, err = viewer.communicate(timeout=60)
    finally:
        viewer.kill()
        viewer.wait()
    assert viewer.returncode == 0, err
    assert pub.dropped == 0  # every loss is this viewer's
    got = [json.loads(line) for line in out.splitlines()]
    said = [x for x in got if x["type"] == "drops"]
    assert len(said) == 1, out
    kept = [m for m in wire.read_file(str(tmp_path / "v.xray"))[0] if not isinstance(m, (wire.Hello, wire.Note))]
    received = {m.step for m in kept if isinstance(m, wire.Scalars)}
    missing = sorted(set(range(330)) - received)
    assert said[0]["steps_lost"] == len(missing) > 200
    assert [s for a, b in said[0]["gaps"] for s in range(a, b + 1)] == missing
    assert said[0]["frames"] == 2 * 330 + 1 - len(kept) == pub.viewer_drops  # each step's Step and Scalars, the End


async def test_the_app_says_it_once_in_a_toast_and_keeps_the_sum_in_the_header():
    """The app's tick hands each ended episode to one warning toast; the header's "lost" keeps the total."""
    from test_app import HoldSource, screen_text

    from tui.app import XRayApp

    batches = [[synthetic.hello(2, run="laggard")], [scalars(s) for s in range(5)],
               [scalars(40), drops(70), drops(90), scalars(41)]]
    app = XRayApp(HoldSource(batches))
    app.state._drop_watch.quiet = 0.3  # the episode ends sooner than the default QUIET
    told = []
    app.notify = lambda message, **kw: told.append((message, kw.get("severity")))
    async with app.run_test(size=(140, 30)) as pilot:
        for _ in range(100):
            await pilot.pause(0.05)
            if told:
                break
        await pilot.pause(0.6)  # more ticks: still one toast
        app._paint()
        await pilot.pause()
        header = "\n".join(screen_text(app).splitlines()[:3])
    assert len(told) == 1 and told[0][1] == "warning"
    assert "35 steps never arrived (5-39), 90 frames dropped" in told[0][0]
    assert "lost 35 steps, last at" in header, header
