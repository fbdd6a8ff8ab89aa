"""Headless attach and replay: how the run ended, exit codes, --fail-on at once, status lines, scalars.

Recordings are crafted with wire.encode (so every ending can be tried), and
the live cases run tests/train_script.py for real.
"""

import json
import math
import signal
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
from tui import synthetic

HERE = Path(__file__).parent
SCRIPT = str(HERE / "train_script.py")
T0 = 1_700_000_000.0


def xray(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def scalars(step, t=None, rank=0, **values):
    return wire.Scalars(step=step, rank=rank, time=T0 + step if t is None else t, values=values)


def record(path, msgs):
    with open(path, "wb") as f:
        f.write(wire.MAGIC + b"".join(wire.encode(m) for m in msgs))
    return str(path)


def run_msgs(n=10, end=None, alerts=()):
    """Hello, n steps each with its Scalars, alerts after their step, then ``end``."""
    msgs = [synthetic.hello(2, run="crafted")]
    by_step = {}
    for a in alerts:
        by_step.setdefault(a.step, []).append(a)
    for st in synthetic.steps(2, n, elements=64):
        msgs += [st, scalars(st.step, t=st.time, loss=2.0 - 0.1 * st.step, lr=1e-3), *by_step.get(st.step, [])]
    if end is not None:
        msgs.append(end)
    return msgs


def lines(out):
    return [json.loads(x) for x in out.stdout.splitlines()]


# -- how it ended: exit codes through the CLI on crafted recordings ---------------------------


@pytest.mark.parametrize("end,code,text", [
    (wire.End(10, 0), 0, "run ended at step 10: finished; alerts 0 critical, 0 warning, 0 info"),
    (wire.End(10, 0, "stopped"), 0, "run ended at step 10: stopped;"),
    (wire.End(7, 0, "crashed", "ValueError: boom"), 1, "run ended at step 7: crashed (ValueError: boom);"),
    (wire.End(7, 0, "killed", "SIGTERM"), 1, "run ended at step 7: killed (SIGTERM);"),
    (wire.End(7, 0, "interrupted"), 1, "run ended at step 7: interrupted;"),
    (wire.End(7, 0, "error"), 1, "run ended at step 7: error;"),  # older probes
    (wire.End(7, 0, "preempted"), 1, "run ended at step 7: preempted;"),  # a reason we do not know is no success
    (None, 1, "the recording stops at step 9 without an End"),
], ids=["finished", "stopped", "crashed", "killed", "interrupted", "old-error", "unknown", "no-end"])
def test_replay_says_how_the_run_ended_and_exits_by_it(tmp_path, end, code, text):
    rec = record(tmp_path / "r.xray", run_msgs(10, end))
    out = xray("replay", rec, "--headless")
    assert out.returncode == code, out.stderr
    assert out.stdout.splitlines()[-1].startswith(text)
    js = xray("replay", rec, "--headless", "--json")
    assert js.returncode == code
    (last,) = [x for x in lines(js) if x["type"] == "end"]
    want = end.reason if end is not None else "disconnected"
    assert last == {"type": "end", "step": end.step if end else 9, "rank": 0, "reason": want,
                    "error": end.error if end else "", "alerts": {"info": 0, "warning": 0, "critical": 0},
                    "exit": code}


def test_end_line_counts_alerts_by_severity_and_a_failed_rank_wins(tmp_path):
    alerts = [synthetic.alert(2, "model.layers.0.fc"), synthetic.alert(4, "model.layers.1.fc", severity="critical"),
              synthetic.alert(6, "model.layers.0.fc", severity="info")]
    msgs = run_msgs(10, None, alerts)
    msgs.insert(1, synthetic.hello(2, run="crafted", rank=1, world_size=2))
    msgs += [wire.End(10, 0, "finished"), wire.End(8, 1, "crashed", "RuntimeError: NCCL timeout")]
    out = xray("replay", record(tmp_path / "r.xray", msgs), "--headless")
    assert out.returncode == 1
    assert out.stdout.splitlines()[-1] == ("run ended at step 8: crashed (RuntimeError: NCCL timeout); "
                                           "alerts 1 critical, 1 warning, 1 info")


def test_a_rank_without_end_is_a_disconnect(tmp_path):
    msgs = run_msgs(5, wire.End(5, 0))
    msgs.insert(1, synthetic.hello(2, run="crafted", rank=1, world_size=2))
    out = xray("replay", record(tmp_path / "r.xray", msgs), "--headless", "--json")
    assert out.returncode == 1 and lines(out)[-1]["reason"] == "disconnected" and lines(out)[-1]["rank"] == 1


def test_hostile_end_text_stays_one_line(tmp_path):
    end = wire.End(3, 0, "crashed", "Boom\n\x1b[31mfake line\r")
    out = xray("replay", record(tmp_path / "r.xray", run_msgs(3, end)), "--headless")
    assert out.returncode == 1 and len(out.stdout.splitlines()) == 1 and "\x1b" not in out.stdout


def test_hostile_alert_text_stays_one_line(tmp_path):
    """An alert's layer and message come from the training process: printed, control characters
    show as escapes, so a crafted alert cannot write to the terminal or fake a line."""
    bad = wire.Alert(2, 0, "warning", "dead", "fc\x1b]9;pwned\x07", "act", 1.0, 0.5, "msg\n\x1b[2Jfake line")
    out = xray("replay", record(tmp_path / "r.xray", run_msgs(3, wire.End(3, 0), [bad])), "--headless")
    printed = [line for line in out.stdout.splitlines() if "dead" in line]
    assert len(printed) == 1 and "\x1b" not in out.stdout and "\x07" not in out.stdout
    assert "fake line" in printed[0] and "\\x1b" in printed[0]


def test_fail_on_in_a_replay_stops_at_the_first_such_alert(tmp_path):
    alerts = [synthetic.alert(2, "model.layers.0.fc"), synthetic.alert(4, "model.layers.1.fc", severity="critical"),
              synthetic.alert(7, "model.layers.0.fc", rule="exploding", severity="critical")]
    rec = record(tmp_path / "r.xray", run_msgs(10, wire.End(10, 0), alerts))
    out = xray("replay", rec, "--headless", "--json", "--fail-on", "critical")
    assert out.returncode == 3
    got = lines(out)
    assert [(x["type"], x["step"]) for x in got] == [("alert", 2), ("alert", 4), ("end", 4)]
    assert got[-1]["reason"] == "fail-on" and got[-1]["exit"] == 3
    warn = xray("replay", rec, "--headless", "--fail-on", "warning")
    assert warn.returncode == 3 and len(warn.stdout.splitlines()) == 2
    assert warn.stdout.splitlines()[-1].startswith("left at step 2: --fail-on warning saw warning dead on "
                                                   "model.layers.0.fc [act] at step 2 (the run goes on)")
    assert xray("replay", rec, "--headless").returncode == 0  # without --fail-on the run's End decides


# -- status lines ---------------------------------------------------------------------------------


def test_replay_status_lines_follow_the_probes_clock(tmp_path):
    # 100 steps one second apart (the probe's timestamps): a status line every 25 s of run time
    msgs = [synthetic.hello(1, run="clock")]
    msgs += [scalars(s, loss=10.0 - s * 0.05, lr=3e-4, steps_per_s=1.0) for s in range(100)]
    msgs.insert(32, wire.Alert(30, 0, "warning", "loss-spike", "(loss)", "act", 1.0, 1.0, "spike"))  # after step 30
    msgs.append(wire.End(100, 0))
    rec = record(tmp_path / "r.xray", msgs)
    out = xray("replay", rec, "--headless", "--json", "--status-every", "25")
    assert out.returncode == 0, out.stderr
    status = [x for x in lines(out) if x["type"] == "status"]
    assert [x["step"] for x in status] == [25, 50, 75]
    assert status[0]["loss"] == pytest.approx(10.0 - 25 * 0.05) and status[0]["lr"] == 3e-4
    assert status[0]["steps_per_s"] == 1.0 and status[0]["alerts"]["warning"] == 0
    assert status[1]["alerts"]["warning"] == 1 and status[0]["scalars"]["lr"] == 3e-4
    text = xray("replay", rec, "--headless", "--status-every", "25").stdout.splitlines()
    assert text[0] == "status  step 25  1 steps/s  loss 8.75  lr 0.0003  alerts 0 critical, 0 warning, 0 info"
    assert [x for x in lines(xray("replay", rec, "--headless", "--json", "--status-every", "25", "--quiet"))
            if x["type"] == "status"] == []
    # the default, 60 s: one line, at step 60
    default = [x for x in lines(xray("replay", rec, "--headless", "--json")) if x["type"] == "status"]
    assert [x["step"] for x in default] == [60]


def test_status_steps_per_s_without_the_probes_figure_and_nan_loss_is_null(tmp_path):
    msgs = [synthetic.hello(1, run="clock")]
    msgs += [scalars(s, t=T0 + s * 0.5, loss=math.nan if s == 20 else 1.0) for s in range(41)]
    out = xray("replay", record(tmp_path / "r.xray", msgs), "--headless", "--json", "--status-every", "10")
    st, last = [x for x in lines(out) if x["type"] == "status"]  # at 10 s and 20 s of run time
    assert st["step"] == 20 and st["loss"] is None and st["steps_per_s"] == pytest.approx(2.0)
    assert last["step"] == 40 and last["loss"] == 1.0


@pytest.mark.parametrize("bad", ["-1", "soon", "nan"])
def test_bad_status_every_is_one_line_and_exit_2(tmp_path, bad):
    rec = record(tmp_path / "r.xray", run_msgs(2, wire.End(2, 0)))
    out = xray("replay", rec, "--headless", "--status-every", bad)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stdout == ""
    assert f"--status-every must be a number of seconds >= 0, got {bad!r}" in out.stderr


# -- export -----------------------------------------------------------------------------------------


def test_export_writes_scalar_lines(tmp_path):
    msgs = [synthetic.hello(1, run="x"), *synthetic.steps(1, 1, elements=8),
            scalars(0, loss=2.5, lr=1e-3, **{"lr/1": 0.0}), scalars(1, rank=1, loss=math.inf, grad_norm=math.nan),
            wire.End(2, 0)]
    rec = record(tmp_path / "r.xray", msgs)
    out = xray("export", rec, "-o", str(tmp_path / "o.jsonl"))
    assert out.returncode == 0 and "wrote 4 samples and 5 scalars" in out.stderr
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows] == ["sample"] * 4 + ["scalar"] * 5
    assert rows[4:] == [
        {"type": "scalar", "step": 0, "rank": 0, "name": "loss", "value": 2.5},
        {"type": "scalar", "step": 0, "rank": 0, "name": "lr", "value": 1e-3},
        {"type": "scalar", "step": 0, "rank": 0, "name": "lr/1", "value": 0.0},
        {"type": "scalar", "step": 1, "rank": 1, "name": "loss", "value": None},
        {"type": "scalar", "step": 1, "rank": 1, "name": "grad_norm", "value": None},
    ]


def test_an_old_recording_whose_end_has_no_reason_still_replays(tmp_path):
    import msgspec

    old_end = msgspec.msgpack.encode({"type": "end", "step": 3, "rank": 0})  # what older probes wrote
    data = wire.MAGIC + b"".join(wire.encode(m) for m in [synthetic.hello(1), *synthetic.steps(1, 3, elements=8)])
    (tmp_path / "old.xray").write_bytes(data + wire._LEN.pack(len(old_end)) + old_end)
    out = xray("replay", str(tmp_path / "old.xray"), "--headless")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("run ended at step 3: finished")


# -- live runs --------------------------------------------------------------------------------------


def _default_signals():
    # a runner that started us in the background may hand on SIGTERM ignored: the trainer gets the default
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def start(name, *args):
    proc = subprocess.Popen([sys.executable, SCRIPT, name, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_live_crash_is_exit_1_with_the_error(tmp_path):
    proc = start("crashy", "100000", "--raise-at", "40", "--sleep", "0.02", "--plain")
    try:
        out = xray("attach", "crashy", "--headless")
    finally:
        proc.wait(60)
    assert proc.returncode == 1 and out.returncode == 1, out.stderr
    assert out.stdout.splitlines()[-1].startswith("run ended at step 40: crashed (ValueError: boom at step 40);")


@pytest.mark.parametrize("sig,line", [
    (signal.SIGTERM, "run ended at step {}: killed (SIGTERM);"),
    (signal.SIGKILL, "run disconnected at step {} without an End"),
], ids=["sigterm", "sigkill"])
def test_live_kill_is_exit_1(tmp_path, sig, line):
    proc = start("victim", "100000", "--sleep", "0.01")
    viewer = subprocess.Popen([sys.executable, "-m", "tui.cli", "attach", "victim", "--headless", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)
        proc.send_signal(sig)
        out, err = viewer.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert viewer.returncode == 1, err
    end = json.loads(out.splitlines()[-1])
    assert end["type"] == "end" and end["exit"] == 1
    assert end["reason"] == ("killed" if sig == signal.SIGTERM else "disconnected")
    assert end["step"] > 0


def test_live_fail_on_exits_at_once_while_the_run_goes_on(tmp_path):
    proc = start("goes-on", "100000", "--nan-at", "20", "--sleep", "0.01")
    try:
        t = time.monotonic()
        out = xray("attach", "goes-on", "--headless", "--json", "--fail-on", "critical", "--log",
                   str(tmp_path / "v.xray"), timeout=60)
        took = time.monotonic() - t
        assert proc.poll() is None, "the CLI returned only when the run ended"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert out.returncode == 3, out.stderr
    got = lines(out)
    assert got[-1]["type"] == "end" and got[-1]["reason"] == "fail-on" and got[-1]["exit"] == 3
    assert [x["severity"] for x in got if x["type"] == "alert"][-1] == "critical"
    assert took < 30
    msgs, _ = wire.read_file(str(tmp_path / "v.xray"))  # the viewer's recording was closed cleanly
    assert isinstance(msgs[0], wire.Hello) and any(isinstance(m, wire.Alert) for m in msgs)


def test_live_status_lines_come_on_the_wall_clock_even_when_the_run_is_quiet():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xr = probes.attach(model, opt, every=1, name="quiet", spectral_every=None)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    timer = threading.Timer(2.5, xr.close)  # no step at all for 2.5 s, then the run ends
    timer.start()
    try:
        out = xray("attach", "quiet", "--headless", "--json", "--status-every", "0.5")
    finally:
        timer.cancel()
        xr.close()
    assert out.returncode == 0, out.stderr
    got = lines(out)
    status = [x for x in got if x["type"] == "status"]
    assert len(status) >= 3 and all(x["step"] == 2 for x in status)
    end = got[-1]
    assert (end["type"], end["step"], end["reason"], end["exit"]) == ("end", 3, "finished", 0)
    assert sum(end["alerts"].values()) == sum(x["type"] == "alert" for x in got)


def test_a_viewers_recording_keeps_the_scalars(tmp_path):
    import os
    import socket

    msgs = run_msgs(6, wire.End(6, 0, "stopped"))
    path = tmp_path / "p.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    os.chmod(path, 0o600)
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        conn.sendall(wire.MAGIC + b"".join(wire.encode(m) for m in msgs))
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    out = xray("attach", "--socket", str(path), "--headless", "--json", "--log", str(tmp_path / "v.xray"))
    srv.close()
    assert out.returncode == 0, out.stderr
    assert lines(out)[-1]["reason"] == "stopped"
    got, torn = wire.read_file(str(tmp_path / "v.xray"))
    assert torn == 0 and got == msgs


def test_live_status_lines_carry_the_probes_scalars():
    proc = start("scalar-run", "250", "--every", "5", "--sleep", "0.01", "--log-loss")
    try:
        out = xray("attach", "scalar-run", "--headless", "--json", "--status-every", "0.5")
    finally:
        proc.wait(60)
    assert out.returncode == 0, out.stderr
    status = [x for x in lines(out) if x["type"] == "status"]
    assert status, out.stdout
    last = status[-1]
    assert last["loss"] is not None and math.isfinite(last["loss"]) and last["lr"] == pytest.approx(1e-3)
    assert last["steps_per_s"] and last["steps_per_s"] > 0 and last["step"] > 0
    assert lines(out)[-1]["reason"] == "finished"


def test_replay_status_names_the_step_whose_loss_it_shows_when_scalars_come_in_bursts(tmp_path):
    # as the probe sends them: the sampled Step first, then the Scalars of every step since the last one
    msgs = [synthetic.hello(1, run="bursty")]
    steps = {st.step: st for st in synthetic.steps(1, 41, elements=8, t0=T0)}
    for s in range(0, 41, 5):
        msgs.append(wire.Step(step=s, rank=0, time=T0 + s, samples=steps[s].samples))
        msgs += [scalars(k, loss=100.0 + k) for k in range(max(0, s - 4), s + 1)]
    msgs.append(wire.End(41, 0))
    out = xray("replay", record(tmp_path / "r.xray", msgs), "--headless", "--json", "--status-every", "3")
    status = [x for x in lines(out) if x["type"] == "status"]
    assert len(status) >= 10
    for x in status:
        assert x["loss"] == 100.0 + x["step"]
