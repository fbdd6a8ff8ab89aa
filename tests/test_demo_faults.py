"""The demo's injected faults, on real training, produce their alerts.

Each case trains the demo GPT-2 for real; they take seconds each.
"""

import json
import subprocess
import sys

import pytest

from probes.demo import training as demo
from probes.protocol import wire

pytestmark = pytest.mark.slow

EXPECTED = {"nan": "nonfinite", "exploding": "exploding", "dead": "dead", "stalled": "stalled"}


def run_demo(fault, steps=110, fault_step=40):
    msgs = []
    demo.train(steps=steps, every=5, fault=fault, fault_step=fault_step, name=f"demo-{fault}",
               serve=False, listener=msgs.append)
    return msgs


@pytest.mark.parametrize("fault", sorted(EXPECTED))
def test_fault_gives_its_rule_on_its_layer_soon_after(fault):
    msgs = run_demo(fault)
    (note,) = [m for m in msgs if isinstance(m, wire.Note)]
    assert note.event == "fault" and note.step == 40
    layer = note.data["layer"]
    hits = [a for a in msgs if isinstance(a, wire.Alert) and a.rule == EXPECTED[fault]
            and (a.layer == layer or a.layer.startswith(layer + "."))]
    assert hits, f"no {EXPECTED[fault]} alert on {layer}"
    assert hits[0].step - note.step <= 20  # within four samples at every=5
    assert hits[0].severity in ("warning", "critical")
    # nothing but info fired before the fault
    early = [a for a in msgs if isinstance(a, wire.Alert) and a.step < note.step and a.severity != "info"]
    assert early == []


def test_healthy_demo_raises_no_alert():
    msgs = run_demo("none", steps=200)
    alerts = [m for m in msgs if isinstance(m, wire.Alert)]
    assert [a for a in alerts if a.severity == "critical"] == []
    assert len([a for a in alerts if a.severity == "warning"]) <= 1
    assert sum(isinstance(m, wire.Step) for m in msgs) == 40


def test_cli_headless_json_nan_names_the_faulted_layer():
    out = subprocess.run([sys.executable, "-m", "tui.cli", "demo", "--headless", "--json", "--fault", "nan",
                          "--steps", "80", "--fault-step", "30"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    fault = lines[0]
    assert fault == {"type": "fault", "step": 30, "layer": "transformer.h.1.attn.c_attn", "fault": "nan",
                     "detail": "one weight set to NaN"}
    nonfinite = [a for a in lines[1:] if a.get("rule") == "nonfinite" and a["kind"] == "act"]
    assert nonfinite[0]["layer"] == "transformer.h.1.attn.c_attn" and nonfinite[0]["severity"] == "critical"
    assert lines[-1]["type"] == "end" and lines[-1]["reason"] == "finished" and lines[-1]["step"] == 80


def test_demo_headless_prints_status_lines_and_how_the_run_ended():
    """As `attach --headless` does: a status line every --status-every seconds, then the end line."""
    out = subprocess.run([sys.executable, "-m", "tui.cli", "demo", "--headless", "--json", "--steps", "60",
                          "--status-every", "0.5"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    status = [x for x in lines if x["type"] == "status" and x["step"] is not None]  # not before step 0's
    assert status and all(0 <= x["step"] < 60 and x["loss"] > 0 for x in status)
    assert [x["step"] for x in status] == sorted(x["step"] for x in status)
    assert lines[-1] == {"type": "end", "step": 60, "rank": 0, "reason": "finished", "error": "",
                         "alerts": lines[-1]["alerts"], "exit": 0}
    quiet = subprocess.run([sys.executable, "-m", "tui.cli", "demo", "--headless", "--steps", "10", "--quiet",
                            "--status-every", "0.1"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "status" not in quiet.stdout
    assert quiet.stdout.strip().splitlines()[-1].startswith("run ended at step 10: finished")


def test_demo_headless_fail_on_stops_training_when_the_alert_arrives(tmp_path):
    """--fail-on exits 3 as soon as the alert arrives: the in-process demo stops training then,
    long before its --steps (issue 12)."""
    import subprocess
    import sys

    from probes.protocol import wire

    log = tmp_path / "d.xray"
    out = subprocess.run([sys.executable, "-m", "tui.cli", "demo", "--headless", "--fault", "nan", "--fault-step", "10",
                          "--steps", "2000", "--fail-on", "critical", "--log", str(log)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 3, out.stderr
    assert "nonfinite" in out.stdout and "(training stopped)" in out.stdout
    steps = [m.step for m in wire.read_file(str(log))[0] if isinstance(m, wire.Step)]
    assert steps and max(steps) < 100  # stopped within a few sampled steps of step 10, not at 2000


def _gone(pid: int) -> bool:
    """The process has exited (a zombie no init reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return True


def test_the_demo_trainer_stops_when_its_viewer_is_killed(tmp_path):
    """`xray-tui demo` passes --parent: a viewer killed outright (SIGKILL runs no cleanup) must not
    leave its trainer training, unseen, forever (one did, for 35 minutes, on this machine)."""
    import os
    import signal
    import time

    spawn = ("import os, subprocess, sys, time; c = subprocess.Popen([sys.executable, '-m', 'probes.demo', "
             "'--steps', '0', '--name', 'orphan-check', '--parent', str(os.getpid())], "
             "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(c.pid, flush=True); time.sleep(600)")
    viewer = subprocess.Popen([sys.executable, "-c", spawn], stdout=subprocess.PIPE, text=True)
    trainer = int(viewer.stdout.readline())
    try:
        time.sleep(2)
        assert not _gone(trainer)
        viewer.send_signal(signal.SIGKILL)
        viewer.wait(10)
        deadline = time.monotonic() + 90  # it may still be importing torch; then one check a second
        while not _gone(trainer) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(trainer)
    finally:
        if not _gone(trainer):
            os.kill(trainer, signal.SIGKILL)
