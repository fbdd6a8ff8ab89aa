"""Probe -> socket -> viewer, and the CLI as a user types it."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import probes
from probes.protocol import wire
from tui import feed

HERE = Path(__file__).parent
SCRIPT = str(HERE / "train_script.py")
HERE_SCRIPT = SCRIPT


def xray(*args, timeout=120, **kw):
    """Run the CLI as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train(model, opt, n):
    for _ in range(n):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_late_viewer_sees_the_history_at_once_then_live_steps_then_the_end():
    model, opt = small_model()
    xr = probes.attach(model, opt, every=1, name="late")
    train(model, opt, 50)
    msgs = []
    gen = feed.SocketSource.for_run("late").batches()
    while sum(isinstance(m, wire.Step) for m in msgs) < 50:
        msgs += next(gen)
    assert isinstance(msgs[0], wire.Hello) and msgs[0].run == "late"
    assert [m.step for m in msgs if isinstance(m, wire.Step)] == list(range(50))
    train(model, opt, 2)
    xr.close()
    for batch in gen:  # the stream ends when the run does
        msgs += batch
    assert [m.step for m in msgs if isinstance(m, wire.Step)] == list(range(52))
    assert isinstance(msgs[-1], wire.End)


def test_two_viewers_at_once_get_the_same_stream():
    model, opt = small_model()
    xr = probes.attach(model, opt, every=1, name="pair")
    got = [[], []]

    def read(i):
        for batch in feed.SocketSource.for_run("pair").batches():
            got[i] += batch

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    train(model, opt, 5)
    for t in threads:
        t.start()
    train(model, opt, 5)
    xr.close()
    for t in threads:
        t.join(10)
    assert got[0] == got[1] and sum(isinstance(m, wire.Step) for m in got[0]) == 10


def test_ls_json_lists_the_live_run_and_forgets_dead_ones(run_dir):
    model, opt = small_model()
    xr = probes.attach(model, opt, every=1, name="listed")
    # a stale entry left by a process that died
    (run_dir / "ghost-999999-r0.json").write_text(json.dumps(
        {"run": "ghost", "pid": 999999, "rank": 0, "world_size": 1, "started": 0, "socket": str(run_dir / "ghost.sock")}))
    out = xray("ls", "--json")
    xr.close()
    assert out.returncode == 0, out.stderr
    runs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["name"] for r in runs] == ["listed"]
    assert runs[0]["pid"] == os.getpid() and runs[0]["ranks"] == [0] and runs[0]["sockets"][0].endswith(".sock")
    assert not (run_dir / "ghost-999999-r0.json").exists()


def test_the_recording_path_is_said_at_attach_and_listed(tmp_path, capsys):
    model, opt = small_model()
    (tmp_path / "run.xray").write_bytes(b"an older run")  # never overwritten
    xr = probes.attach(model, opt, every=1, name="rec", log=str(tmp_path / "{name}-r{rank}.xray"))
    first = probes.attach(small_model()[0], name="rec2", log=str(tmp_path / "run.xray"))
    said = capsys.readouterr().err
    train(model, opt, 2)
    text, js = xray("ls"), xray("ls", "--json")
    sock = xr.publisher.socket_path
    xr.close()
    first.close()
    want = str(tmp_path / "rec-r0.xray")
    assert f"run 'rec', socket {sock}, recording {want}" in said
    # the name it really got, and why
    assert f"recording {tmp_path / 'run-1.xray'}, as {tmp_path / 'run.xray'} was taken" in said
    assert (tmp_path / "run.xray").read_bytes() == b"an older run"
    assert f"recording: {want}" in text.stdout
    runs = {r["name"]: r for r in map(json.loads, js.stdout.splitlines())}
    assert runs["rec"]["recordings"] == [want] and runs["rec2"]["recordings"] == [str(tmp_path / "run-1.xray")]
    assert [m.step for m in wire.read_file(want)[0] if isinstance(m, wire.Step)] == [0, 1]
    with pytest.raises(ValueError, match="not a placeholder"):
        probes.attach(model, log=str(tmp_path / "{run}.xray"), serve=False)


def test_headless_attach_prints_the_nan_alert_of_a_script_and_exits_0_when_it_ends(tmp_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, "nanrun", "60", "--nan-at", "30", "--sleep", "0.02"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        out = xray("attach", "nanrun", "--headless", "--json", "--log", str(tmp_path / "v.xray"))
    finally:
        proc.wait(60)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    alerts = [a for a in lines if a["type"] == "alert" and a["rule"] == "nonfinite"]
    assert {"type": "fault", "step": 30, "layer": "2", "fault": "nan"} in lines
    assert {(a["layer"], a["kind"]) for a in alerts} >= {("2", "act"), ("2.weight", "weight")}
    for a in alerts:
        assert set(a) == {"type", "step", "rank", "severity", "rule", "layer", "kind", "value", "threshold", "message"}
    assert lines[-1]["type"] == "end" and (lines[-1]["reason"], lines[-1]["step"], lines[-1]["exit"]) == ("finished", 60, 0)
    # the viewer's own recording replays to the same lines
    again = xray("replay", str(tmp_path / "v.xray"), "--headless", "--json")
    assert again.returncode == 0
    assert [json.loads(line) for line in again.stdout.splitlines()] == lines
    # --fail-on leaves at the first critical alert
    failed = xray("replay", str(tmp_path / "v.xray"), "--headless", "--json", "--fail-on", "critical")
    first = next(i for i, x in enumerate(lines) if x.get("severity") == "critical")
    got = [json.loads(line) for line in failed.stdout.splitlines()]
    assert failed.returncode == 3 and got[:-1] == lines[:first + 1] and got[-1]["reason"] == "fail-on"


def test_probe_recording_replays_and_exports_exactly(tmp_path):
    log = tmp_path / "run.xray"
    model, opt = small_model()
    with probes.attach(model, opt, every=2, name="rec", log=str(log), serve=False) as xr:
        recorded = []
        xr.publisher.subscribe(recorded.append)
        train(model, opt, 10)
    out = xray("export", str(log), "--format", "jsonl", "-o", str(tmp_path / "out.jsonl"))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    rows = [r for r in lines if r["type"] == "sample"]
    samples = [(st.step, s) for st in recorded if isinstance(st, wire.Step) for s in st.samples]
    scalars = [(m.step, k, v) for m in recorded if isinstance(m, wire.Scalars) for k, v in m.values.items()]
    assert [(r["step"], r["name"], r["value"]) for r in lines if r["type"] == "scalar"] == scalars
    assert {k for _, k, _ in scalars} >= {"lr"} and len({st for st, _, _ in scalars}) == 10  # every step's
    assert len(rows) == len(samples) == 5 * (3 * 4 + 3)  # 5 steps x (4 params x 3 kinds + 3 acts)
    for row, (step, s) in zip(rows, samples):
        assert (row["step"], row["layer"], row["kind"], row["count"], row["max"]) == (step, s.layer, s.kind, s.count, s.max)
        assert row["hist"]["counts"] == s.hist.tolist()
    # stdout when no -o is given
    assert len(xray("export", str(log)).stdout.splitlines()) == len(lines)


def test_replay_of_a_torn_recording_reads_all_whole_frames(tmp_path):
    log = tmp_path / "run.xray"
    model, opt = small_model()
    with probes.attach(model, opt, every=1, log=str(log), serve=False):
        train(model, opt, 5)
    data = log.read_bytes()
    log.write_bytes(data[:-7])
    out = xray("export", str(log))
    assert out.returncode == 0
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert "torn bytes" in out.stderr and sum(r["type"] == "sample" for r in rows) == 5 * 15


@pytest.mark.parametrize("args,message", [
    (["attach", "nosuchrun", "--headless"], "unknown run 'nosuchrun' (live runs: none)"),
    (["attach", "--headless"], "no live runs"),
    (["attach", "--socket", "/etc/hostname", "--headless"], "is not a socket"),
    (["replay", "/nonexistent.xray"], "no such file"),
    (["export", "/etc/hostname"], "bad magic"),
    # issue 14: each of these was a traceback, an app with an error in its header, or a run forever
    (["demo", "--every", "0", "--headless", "--steps", "5"], "--every: expected an integer >= 1, got '0'"),
    (["demo", "--every", "-1"], "expected an integer >= 1"),
    (["demo", "--steps", "-5", "--headless"], "--steps: expected an integer >= 0"),
    (["demo", "--headless", "--log", "/nonexistent/d/x.xray", "--steps", "3"], "no such directory /nonexistent/d"),
    (["export", "/etc/hostname", "-o", "/tmp"], "bad magic"),  # the input is checked first
    (["replay", HERE_SCRIPT], "bad magic"),  # not a recording: no app opens
    (["replay", "/tmp"], "is a directory, not a recording"),
    (["attach", "--socket", "/tmp/nope.sock"], "no such socket"),
    (["demo", "--json"], "--json works with --headless"),
    (["replay", "/nonexistent.xray", "--fail-on", "warning"], "--fail-on works with --headless"),
    (["nonsense"], "invalid choice: 'nonsense'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = xray(*args)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr and "Traceback" not in out.stderr


def test_export_to_a_directory_or_a_missing_one_is_one_line_and_exit_2(tmp_path):
    log = tmp_path / "run.xray"
    model, opt = small_model()
    with probes.attach(model, opt, every=1, log=str(log), serve=False):
        train(model, opt, 2)
    for target, message in ((tmp_path, "is a directory"), (tmp_path / "no" / "x.jsonl", "no such directory")):
        out = xray("export", str(log), "-o", str(target))
        assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_unknown_run_names_the_live_ones():
    model, opt = small_model()
    xr = probes.attach(model, opt, every=1, name="present")
    try:
        out = xray("attach", "absent", "--headless")
    finally:
        xr.close()
    assert out.returncode == 2 and "unknown run 'absent' (live runs: present)" in out.stderr


@pytest.mark.parametrize("greeting", [b"SSH-2.0-OpenSSH_9.2\r\n", b""])
def test_a_socket_that_is_not_ours(tmp_path, greeting):
    path = str(tmp_path / "other.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    os.chmod(path, 0o600)  # a socket open to others is refused before any protocol talk
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        if greeting:
            conn.sendall(greeting)
        time.sleep(6 if not greeting else 0.5)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    out = xray("attach", "--socket", path, "--headless")
    srv.close()
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert ("bad magic" if greeting else "no hello") in out.stderr


def test_killing_the_viewer_leaves_training_running():
    proc = subprocess.Popen([sys.executable, SCRIPT, "victim", "150", "--sleep", "0.01"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    viewer = subprocess.Popen([sys.executable, "-m", "tui.cli", "attach", "victim", "--headless"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    viewer.send_signal(signal.SIGKILL)
    viewer.wait()
    assert proc.wait(60) == 0
    assert proc.stdout.read().strip() == "done"


async def test_app_attached_after_50_steps_shows_them_on_its_first_screen():
    from tui.app import XRayApp

    model, opt = small_model()
    xr = probes.attach(model, opt, every=1, name="history")
    train(model, opt, 50)
    app = XRayApp(feed.SocketSource.for_run("history"))
    try:
        async with app.run_test(size=(120, 30)) as pilot:
            for _ in range(250):
                await pilot.pause(0.02)
                if app.state.step >= 49:
                    break
            app._paint()
            await pilot.pause()
            assert app.connection == "live"
            assert len(app.state.series("0.weight", "weight")) == 50  # the whole history, not just the latest
            text = "\n".join(strip.text for strip in app.screen._compositor.render_strips())
            assert "history" in text and "step 49" in text and "0.weight" not in text and "✓ ok" in text
    finally:
        xr.close()


def test_a_reader_that_goes_away_is_no_error(tmp_path):
    log = tmp_path / "run.xray"
    model, opt = small_model()
    with probes.attach(model, opt, every=1, log=str(log), serve=False):
        train(model, opt, 20)
    out = subprocess.run(f"{sys.executable} -m tui.cli export {log} | head -1", shell=True,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith('{"type": "sample"') and "Traceback" not in out.stderr
