"""Faults injected around a real probe: viewers that stop, crawl, die or
churn; a recording whose disk fills or whose file is removed; the probe's
own parts failing; the training process exiting every way it can. Training
must never notice, memory must stay bounded, and nothing recorded is lost.
"""

import gc
import json
import logging
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import probes
from probes.capture import activations
from probes.capture.reads import WeightReads
from probes.protocol import wire
from probes.rules import RuleEngine
from probes.publish.publisher import Publisher
from probes.publish.recorder import Recorder
from tui import feed, synthetic
from tui.headless import clean
from probes.protocol import stats

HERE = Path(__file__).parent
SCRIPT = str(HERE / "train_script.py")


def wait_for(cond, timeout=20.0, what="condition"):
    """Poll ``cond`` until true; fail (not hang) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def small_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def train(model, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        model(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def read_all(sock: socket.socket, already: bytes = b"") -> list:
    """Every message a raw viewer socket delivers until the probe closes it."""
    reader = wire.FrameReader("test viewer")
    out = reader.feed(already)
    sock.settimeout(30)
    while data := sock.recv(1 << 16):
        out += reader.feed(data)
    return out


def shrink_kernel_buffers(pub: Publisher) -> None:
    """Make the probe's side of each viewer socket small, so the probe's own
    bounded buffer, not the kernel's, is what a stuck viewer fills."""
    for v in pub.viewers.connected.values():
        v.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def open_fds() -> int:
    """Open file descriptors of this process, after a collection: an earlier test's object that
    the cyclic collector frees mid-test (a Lightning or FSDP run's) would close its fds then."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def xray(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


# -- viewers that misbehave ---------------------------------------------------


@pytest.mark.parametrize("reader", ["stopped", "one byte at a time"])
def test_a_viewer_that_falls_behind_loses_whole_oldest_frames_is_told_how_many_and_memory_stays_bounded(reader):
    limit = 64 * 1024
    pub = Publisher(synthetic.hello(6, run="laggard"), viewer_buffer=limit)
    published = []
    pub.subscribe(published.append)
    sock = socket.socket(socket.AF_UNIX)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small kernel buffer: the backlog is ours
    sock.connect(str(pub.socket_path))
    wait_for(lambda: len(pub.viewers.connected) == 1, what="the viewer to be accepted")
    shrink_kernel_buffers(pub)
    stop = threading.Event()
    crawled = bytearray()
    slow = threading.Thread(target=lambda: [crawled.extend(sock.recv(1)) for _ in iter(lambda: stop.wait(0.002), True)])
    if reader != "stopped":
        slow.start()
    steps = synthetic.steps(6, 300, elements=4096)
    frame = max(len(wire.encode(s)) for s in steps)
    high = 0
    for i, s in enumerate(steps):
        pub.submit(lambda s=s: s)
        if i % 10 == 9:
            wait_for(lambda: pub.queue.empty() and len(published) and pub._last_step == s.step, what="the publisher")
            high = max(high, max(v.bytes for v in pub.viewers.connected.values()))
    pub.submit(lambda: wire.End(300, 0))
    stop.set()
    if slow.is_alive():
        slow.join()
    # only what the viewer was kept from, plus the frame in flight and the newest, is ever held
    assert high <= limit + 2 * frame
    got: list = []
    t = threading.Thread(target=lambda: got.extend(read_all(sock, bytes(crawled))))
    t.start()
    pub.close()
    t.join(30)
    assert pub.dropped == 0  # the probe's own queue kept up: every loss below is the viewer's
    notes = [m for m in got if isinstance(m, wire.Note) and m.event == "drops"]
    data = [m for m in got if not isinstance(m, (wire.Note, wire.Hello))]
    if reader == "stopped":
        assert data[0] == published[0]  # the frame in flight when it stopped is finished, not cut
    lost = len(published) - len(data)
    assert lost > 200 and notes and notes[-1].data["frames"] == lost == pub.viewer_drops
    # what did arrive is whole and in order, ending with the newest frames
    assert [m for m in published if m in data] == data and data[-1] == published[-1]
    sock.close()


def test_the_next_viewer_is_told_about_drops_and_gets_the_backlog():
    pub = Publisher(synthetic.hello(2, run="told"), viewer_buffer=128 * 1024, backlog_steps=20)
    stuck = socket.socket(socket.AF_UNIX)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(str(pub.socket_path))
    wait_for(lambda: len(pub.viewers.connected) == 1)
    shrink_kernel_buffers(pub)
    steps = synthetic.steps(2, 300, elements=2048)
    assert 20 * max(len(wire.encode(s)) for s in steps) < 128 * 1024 < sum(len(wire.encode(s)) for s in steps) // 2
    for s in steps:
        pub.submit(lambda s=s: s)
        wait_for(lambda: pub.queue.empty() and pub._last_step == s.step)
    stuck.close()
    wait_for(lambda: not pub.viewers.connected, what="the stuck viewer to be dropped")
    nxt = socket.socket(socket.AF_UNIX)
    nxt.connect(str(pub.socket_path))
    t = threading.Thread(target=lambda: got.extend(read_all(nxt)))
    got: list = []
    t.start()
    wait_for(lambda: len(pub.viewers.connected) == 1)
    pub.close()
    t.join(30)
    notes = [m for m in got if isinstance(m, wire.Note)]
    assert notes and notes[0].event == "drops" and notes[0].data["frames"] == 0
    assert notes[0].data["all_viewers"] == pub.viewer_drops > 0
    assert [m.step for m in got if isinstance(m, wire.Step)] == list(range(280, 300))


def test_the_backlog_keeps_the_newest_steps_that_fit_its_byte_budget():
    steps = synthetic.steps(3, 60, elements=2048)
    size = max(len(wire.encode(s)) for s in steps)
    budget = 10 * size + size // 2  # room for 10 frames, not 11
    pub = Publisher(synthetic.hello(3, run="budget"), backlog_bytes=budget, serve=False)
    for s in steps:
        pub.submit(lambda s=s: s)
    wait_for(lambda: pub.queue.empty() and pub._last_step == 59)
    kept = [wire.decode(frame[4:]).step for _, frame in pub._steps]  # a frame is a 4-byte length, then the body
    assert pub.backlog_size == sum(len(f) for _, f in pub._steps) <= budget
    assert kept == list(range(60 - len(kept), 60)) and len(kept) == 10
    pub.close()


def test_ten_viewers_attaching_and_detaching_in_a_loop_leave_nothing_behind():
    model, opt = small_model()
    xr = probes.attach(model, opt, every=1, name="churn")
    train(model, opt, 2)
    path = str(xr.publisher.socket_path)
    fds = open_fds()
    stop = threading.Event()
    cycles = [0] * 10

    def churn(i):
        while not stop.is_set():
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.recv(100 + 997 * i)  # some hang up mid-frame, some mid-backlog
            s.close()
            cycles[i] += 1

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    train(model, opt, 100)
    wait_for(lambda: min(cycles) >= 5, what="every viewer to cycle 5 times")
    stop.set()
    for t in threads:
        t.join(10)
    wait_for(lambda: not xr.publisher.viewers.connected, what="every viewer to be dropped")
    assert open_fds() == fds
    got = []
    reader = threading.Thread(target=lambda: [got.extend(b) for b in feed.SocketSource.for_run("churn").batches()])
    reader.start()
    wait_for(lambda: sum(isinstance(m, wire.Step) for m in got) == 102, what="the backlog")
    xr.close()
    reader.join(10)
    assert [m.step for m in got if isinstance(m, wire.Step)] == list(range(102))
    assert isinstance(got[-1], wire.End) and xr.publisher.dropped == 0


@pytest.mark.slow
def test_sigstopped_viewer_does_not_hold_training_back():
    proc = subprocess.Popen([sys.executable, SCRIPT, "frozen", "150", "--sleep", "0.005"],
                            stdout=subprocess.PIPE, text=True)
    viewer = None
    try:
        assert proc.stdout.readline().strip() == "ready"
        viewer = subprocess.Popen([sys.executable, "-m", "tui.cli", "attach", "frozen", "--headless"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        viewer.send_signal(signal.SIGSTOP)
        assert proc.wait(120) == 0 and proc.stdout.read().strip() == "done"
    finally:
        if viewer is not None:
            viewer.send_signal(signal.SIGCONT)
            viewer.wait(30)  # it sees a closed stream and exits: nothing hangs on either side
        proc.kill()
    assert viewer.returncode in (0, 1)


# -- the recording ------------------------------------------------------------


@pytest.mark.slow
def test_recording_disk_full_warns_once_and_training_goes_on(tmp_path):
    log = tmp_path / "full.xray"

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))  # writes past 48 KiB fail: EFBIG

    out = subprocess.run([sys.executable, SCRIPT, "fulldisk", "80", "--log", str(log)], capture_output=True,
                         text=True, timeout=120, preexec_fn=small_disk, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0 and out.stdout.split() == ["ready", "done"], out.stderr
    warnings = [line for line in out.stderr.splitlines() if "xray-tui" in line and "xray-tui: run " not in line]
    assert len(warnings) == 1 and "recording to" in warnings[0] and "stopped" in warnings[0], out.stderr
    msgs, torn = wire.read_file(str(log))
    steps = [m.step for m in msgs if isinstance(m, wire.Step)]
    assert 0 < len(steps) < 80 and steps == list(range(len(steps)))
    assert log.stat().st_size <= 48 * 1024
    # the torn frame was cut off and the probe's last word says why the recording stops
    assert torn == 0 and isinstance(msgs[-1], wire.Note) and msgs[-1].event == "recording-stopped"
    assert msgs[-1].data["why"] == "File too large"
    replay = xray("replay", str(log), "--headless")
    assert replay.returncode == 1 and "Traceback" not in replay.stderr
    assert replay.stdout.splitlines()[-1].startswith(
        f"the recording stops at step {steps[-1]}: the probe stopped recording (File too large); "
        "the run went on unrecorded"), replay.stdout


def test_a_recording_cut_short_without_a_note_names_every_cause(tmp_path):
    """No End and no note of the probe's: the replay names the disk as well as a death."""
    log = tmp_path / "cut.xray"
    rec = Recorder(str(log))
    rec.write(wire.encode(synthetic.hello(1)))
    for s in synthetic.steps(1, 3):
        rec.write(wire.encode(s))
    rec.close()
    out = xray("replay", str(log), "--headless")
    assert out.returncode == 1
    assert out.stdout.splitlines()[-1].startswith(
        "the recording stops at step 2 without an End (the process died, the disk filled, or it is still writing it)")


def test_recorder_on_a_full_device_warns_once(caplog):
    rec = Recorder("/dev/full")
    with caplog.at_level(logging.WARNING, "xray-tui"):
        for s in synthetic.steps(1, 5):
            rec.write(wire.encode(s))
    assert not rec.active and len(caplog.records) == 1 and "No space left" in caplog.text


def test_recording_removed_while_running_warns_once_and_nothing_else_changes(tmp_path, caplog, monkeypatch):
    from probes.publish import recorder

    monkeypatch.setattr(recorder, "REMOVED_CHECK", 0.0)  # checked at every frame (else within a second)
    log = tmp_path / "gone.xray"
    model, opt = small_model()
    got = []
    with caplog.at_level(logging.WARNING, "xray-tui"):
        with probes.attach(model, opt, every=1, name="gone", log=str(log)) as xr:
            xr.publisher.subscribe(got.append)
            train(model, opt, 5)
            wait_for(lambda: len(got) >= 5)
            log.unlink()
            train(model, opt, 20)
        ref, ref_opt = small_model()
        train(ref, ref_opt, 5)
        train(ref, ref_opt, 20)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "was removed" in warnings[0].getMessage()
    assert not xr.publisher.recorder.active and not log.exists()
    assert [m.step for m in got if isinstance(m, wire.Step)] == list(range(25))  # viewers still get it all
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_sigkill_of_training_keeps_every_whole_frame(tmp_path, run_dir):
    log = tmp_path / "killed.xray"
    proc = subprocess.Popen([sys.executable, SCRIPT, "killed", "100000", "--log", str(log), "--sleep", "0.002"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    wait_for(lambda: sum(isinstance(m, wire.Step) for m in wire.read_file(str(log))[0]) > 20, timeout=60,
             what="twenty recorded steps")
    proc.kill()
    proc.wait()
    msgs, torn = wire.read_file(str(log))
    steps = [m.step for m in msgs if isinstance(m, wire.Step)]
    assert isinstance(msgs[0], wire.Hello) and len(steps) > 10 and steps == list(range(len(steps)))
    assert torn < max(len(wire.encode(m)) for m in msgs)  # at most the frame being written
    # replay says how many bytes were torn (here, by cutting one more frame short)
    data = log.read_bytes()
    log.write_bytes(data[: len(data) - torn - 5])
    out = xray("export", str(log))
    assert out.returncode == 0 and "torn bytes" in out.stderr
    # the dead run's socket and manifest are stale: ls forgets them
    assert any(run_dir.iterdir())
    assert xray("ls", "--json").stdout == "" and not any(run_dir.iterdir())


def test_replay_and_live_attach_give_the_same_messages_and_export_keeps_every_field(tmp_path):
    log = tmp_path / "both.xray"
    model, opt = small_model()
    live: list = []
    with probes.attach(model, opt, every=1, name="both", log=str(log)) as xr:
        reader = threading.Thread(target=lambda: [live.extend(b) for b in feed.SocketSource.for_run("both").batches()])
        train(model, opt, 10)
        reader.start()
        with torch.no_grad():
            model[2].weight[0, 0] = math.nan  # alerts too
        train(model, opt, 10)
    reader.join(30)
    recorded, torn = wire.read_file(str(log))
    assert torn == 0 and [wire.encode(m) for m in live] == [wire.encode(m) for m in recorded]  # NaN != NaN
    assert sum(isinstance(m, wire.Step) for m in live) == 20 and any(isinstance(m, wire.Alert) for m in live)
    out = tmp_path / "samples.jsonl"
    assert xray("export", str(log), "-o", str(out)).returncode == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = []
    for m in recorded:  # each step's samples, then the scalars the probe sent with it
        if isinstance(m, wire.Step):
            want += [clean(stats.export_dict(s, m.step, m.rank)) for s in m.samples]
        elif isinstance(m, wire.Scalars):
            want += [clean({"type": "scalar", "step": m.step, "rank": m.rank, "name": k, "value": v})
                     for k, v in m.values.items()]
    assert rows == want  # every field, NaN written as null
    assert {r["name"] for r in rows if r["type"] == "scalar"} >= {"lr", "grad_norm"}
    assert set(rows[0]) >= {"type", "step", "rank", "layer", "kind", "count", "mean", "std", "min", "max", "absmax",
                            "l2", "near_zero", "zeros", "nan", "inf", "dead_units", "ratio", "hist"}


# -- the probe's own failures -------------------------------------------------


def test_publisher_thread_failure_is_one_warning_and_training_never_sees_it(caplog):
    model, opt = small_model()
    with caplog.at_level(logging.WARNING, "xray-tui"):
        xr = probes.attach(model, opt, every=1, name="broken")

        def boom(msg):
            raise RuntimeError("injected publisher failure")

        xr.publisher._publish = boom
        sock_path = xr.publisher.socket_path
        train(model, opt, 5)
        wait_for(lambda: xr.publisher._dead, what="the publisher to fail")
        train(model, opt, 20)  # submit is a no-op now
        assert xr.publisher.queue.empty() and not sock_path.exists()
        xr.close()
    ref, ref_opt = small_model()
    train(ref, ref_opt, 5)
    train(ref, ref_opt, 20)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "publisher failed" in warnings[0].getMessage()


def test_hook_failures_switch_that_part_off_with_one_warning_each(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("injected reduction failure")

    monkeypatch.setattr(activations, "first_tensor", broken)  # inside the forward hooks
    monkeypatch.setattr(WeightReads, "read_params", broken)  # inside the optimizer pre-step hook
    model, opt = small_model()
    with caplog.at_level(logging.WARNING, "xray-tui"):
        with probes.attach(model, opt, every=1, name="hookfail", serve=False):
            train(model, opt, 30)
    ref, ref_opt = small_model()
    train(ref, ref_opt, 30)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all("switched off" in w for w in warnings)


def test_failing_rules_are_switched_off_and_steps_still_flow(caplog):
    class BadRules(RuleEngine):
        def evaluate(self, step):
            raise ValueError("injected rule failure")

    model, opt = small_model()
    got = []
    with caplog.at_level(logging.WARNING, "xray-tui"):
        with probes.attach(model, opt, every=1, name="badrules", serve=False, rules=BadRules()) as xr:
            xr.publisher.subscribe(got.append)
            train(model, opt, 10)
    assert [m.step for m in got if isinstance(m, wire.Step)] == list(range(10))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "rules failed" in warnings[0]


# -- every way the training process ends ----------------------------------------

EXIT_SCRIPT = textwrap.dedent("""
    import sys, time, torch, probes
    from torch import nn
    mode, log = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    def train(n):
        for _ in range(n):
            model(torch.randn(4, 8)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
    if mode == "no-close":       # the user forgets xr.close(): atexit does it
        xr = probes.attach(model, opt, every=1, name="ending", log=log); train(5)
    elif mode == "error":        # an exception in the user's loop
        with probes.attach(model, opt, every=1, name="ending", log=log):
            train(5); raise RuntimeError("bug in the training loop")
    elif mode == "error-no-with":
        xr = probes.attach(model, opt, every=1, name="ending", log=log); train(5); raise RuntimeError("bug")
    elif mode == "ctrl-c":
        with probes.attach(model, opt, every=1, name="ending", log=log):
            train(5); print("ready", flush=True)
            while True: train(1); time.sleep(0.01)
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode,reason,codes", [
    ("no-close", "finished", (0,)),
    ("error", "crashed", (1,)),
    ("error-no-with", "crashed", (1,)),  # atexit closes it, and knows of the exception (probes/publish/lifecycle.py)
    ("ctrl-c", "interrupted", (130, -signal.SIGINT)),
])
def test_every_exit_removes_socket_and_manifest_and_closes_the_recording(tmp_path, run_dir, mode, reason, codes):
    script, log = tmp_path / "ending.py", tmp_path / "end.xray"
    script.write_text(EXIT_SCRIPT)
    # A runner that started us in the background (CI does) hands on SIGINT ignored, and Python then
    # keeps it ignored: give the child the default disposition a terminal gives.
    proc = subprocess.Popen([sys.executable, str(script), mode, str(log)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if mode == "ctrl-c":
        assert proc.stdout.readline().strip() == "ready"
        assert any(p.suffix == ".sock" for p in run_dir.iterdir())
        proc.send_signal(signal.SIGINT)
    proc.wait(60)  # no thread of the probe keeps the process alive
    assert proc.returncode in codes, proc.stderr.read()
    assert not any(run_dir.iterdir())  # socket and manifest removed
    msgs, torn = wire.read_file(str(log))
    assert torn == 0 and isinstance(msgs[-1], wire.End) and msgs[-1].reason == reason
    assert sum(isinstance(m, wire.Step) for m in msgs) >= 5
