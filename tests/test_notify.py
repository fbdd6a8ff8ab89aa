"""Notifications (issue 27): the policy, the escape sequences, --notify-cmd and --webhook in headless mode.

The headless cases run the real CLI on crafted recordings and on a crafted
live stream (a Unix socket served from this process), with webhooks served
by http.server on 127.0.0.1: one that answers, one that answers 500, one
that never answers. The app in a real terminal is tests/test_notify_tmux.py.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from probes.protocol import wire
from tui import synthetic
from tui.notify import BURST_WINDOW, NotifyPolicy, end_notice, printable
from tui.notify_send import QUEUE_SIZE, Sender, environment
from tui.terminal_notify import osc9, osc777, sequence, tmux_passthrough

HOSTILE = "NaN \x1b]0;pwned\x07 in $(touch PWNED); `id` <!channel> here"


def xray(*args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def alert(step, layer="model.layers.0.fc", rule="nonfinite", severity="critical", message="bad", kind="act"):
    return wire.Alert(step=step, rank=0, severity=severity, rule=rule, layer=layer, kind=kind, value=1.0,
                      threshold=0.0, message=message)


def stream(n_steps=20, alerts=(), end=wire.End(19, 0, "crashed", "ValueError: boom")):
    """Hello, steps, each step's alerts after it, then ``end``."""
    by_step: dict = {}
    for a in alerts:
        by_step.setdefault(a.step, []).append(a)
    msgs = [synthetic.hello(2, run="crafted")]
    for st in synthetic.steps(2, n_steps, elements=32):
        msgs += [st, *by_step.get(st.step, [])]
    return msgs + ([end] if end is not None else [])


def record(path, msgs) -> str:
    with open(path, "wb") as f:
        f.write(wire.MAGIC + b"".join(wire.encode(m) for m in msgs))
    return str(path)


#: The recording most tests replay: the same (rule, layer) three times, ten layers at once, a warning.
ALERTS = [alert(3, message=HOSTILE), alert(4), alert(5),
          *[alert(8, layer=f"model.layers.{i}.fc", rule="exploding", kind="grad") for i in range(10)],
          alert(9, rule="dead", severity="warning")]


# -- the policy ----------------------------------------------------------------------------


def test_policy_one_per_rule_and_layer_per_interval_then_counts_what_it_left_out():
    p = NotifyPolicy("critical", interval=600)
    assert [n.fields["step"] for n in p.offer(alert(1), now=0)] == [1]
    assert p.offer(alert(2), now=10) == [] and p.offer(alert(3), now=599) == []
    again = p.offer(alert(4), now=600)  # the interval has passed
    assert [n.fields["step"] for n in again] == [4] and again[0].fields["suppressed"] == 2
    assert "+2 more since the last notice" in again[0].text
    assert [n.fields["layer"] for n in p.offer(alert(5, layer="other"), now=601)] == ["other"]  # its own key
    assert p.offer(alert(6, severity="warning"), now=700) == []  # below --notify-on
    assert NotifyPolicy("warning").offer(alert(6, severity="warning"), now=0)


def test_policy_lets_a_burst_through_then_one_summary_when_the_window_passed():
    p = NotifyPolicy("critical", interval=600, burst=5)
    sent = [n for i in range(12) for n in p.offer(alert(7, layer=f"l{i}", rule="exploding"), now=1.0)]
    assert [n.fields["layer"] for n in sent] == [f"l{i}" for i in range(5)]
    assert p.due(now=1.0 + BURST_WINDOW - 1) == []
    (summary,) = p.due(now=1.0 + BURST_WINDOW)
    assert summary.event == "summary" and summary.fields["count"] == 7
    assert summary.fields["layers"] == [f"l{i}" for i in range(5, 12)] and "and 2 more" in summary.text
    assert p.due(now=1e6) == [] and p.close() == []


def test_policy_hold_sends_one_held_notice_as_itself_and_several_as_a_summary():
    p = NotifyPolicy("critical")
    p.hold(until=2.0, why="in the run's history")
    assert p.offer(alert(1), now=0.5) == []
    (one,) = p.due(now=2.0)
    assert one.event == "alert" and one.fields["step"] == 1
    p.hold(until=5.0, why="in the run's history")
    for i in range(3):
        assert p.offer(alert(2, layer=f"l{i}"), now=3.0) == []
    (s,) = p.close()
    assert s.event == "summary" and s.title.endswith("3 alerts in the run's history")


def test_end_notices_say_how_the_run_ended():
    n = end_notice("crashed", run="r", step=7, error="ValueError: boom", counts={"critical": 2, "warning": 1})
    assert (n.severity, n.title, n.text) == ("critical", "xray-tui r: run CRASHED",
                                             "at step 7 (ValueError: boom); alerts 2 critical, 1 warning")
    assert end_notice("finished").severity == "info"
    assert end_notice("disconnected").title.endswith("stream LOST")
    assert end_notice("preempted").severity == "critical"  # a reason we do not know is no success


# -- the escape sequences ------------------------------------------------------------------


def test_escape_sequences_byte_for_byte_and_no_control_character_gets_through():
    assert osc9("a b") == "\x1b]9;a b\x07"
    assert osc777("T", "B") == "\x1b]777;notify;T;B\x07"
    assert tmux_passthrough("\x1b]9;x\x07") == "\x1bPtmux;\x1b\x1b]9;x\x07\x1b\\"
    seq = sequence("xray-tui: CRITICAL", HOSTILE, tmux=False)
    assert seq.count("\x1b") == 2 and seq.count("\x07") == 3 and seq.endswith("\x07\x07")  # 2 OSC + the bell
    assert "pwned" in seq and "\x1b]0" not in seq  # the alert's ESC and BEL are gone, its words stay
    assert osc777("a;b", "c;d") == "\x1b]777;notify;a,b;c,d\x07"  # ';' would split OSC 777's fields
    wrapped = sequence("t", HOSTILE, tmux=True)
    assert wrapped.count("\x1bPtmux;") == 2 and wrapped.endswith("\x1b\\\x07")  # the bell is tmux's own
    assert printable("a\nb\tc\x00d") == "a b c d"


def test_environment_of_a_notice_drops_nul_and_names_every_field():
    env = environment(end_notice("crashed", run="r", step=3, error="x\x00y"))
    assert env["XRAY_EVENT"] == "end" and env["XRAY_REASON"] == "crashed" and env["XRAY_STEP"] == "3"
    assert env["XRAY_ERROR"] == "xy" and env["XRAY_RUN"] == "r" and json.loads(env["XRAY_ALERTS"]) == {}


def test_a_sender_never_blocks_and_drops_the_oldest_when_its_queue_is_full():
    release = threading.Event()
    got = []

    class Stuck(Sender):
        def deliver(self, notice):
            release.wait(10)
            got.append(notice.fields["step"])
            return True

    err = open(os.devnull, "w")
    s = Stuck(err=err)
    t0 = time.monotonic()
    for i in range(200):
        s.submit(end_notice("finished", step=i))
    assert time.monotonic() - t0 < 0.5  # the viewer's side never waits for the endpoint
    assert s.dropped in (200 - QUEUE_SIZE, 200 - QUEUE_SIZE - 1)  # one may be in delivery already
    release.set()
    s.close(5)
    err.close()
    assert got[-1] == 199 and len(got) == 200 - s.dropped  # the newest survive, in order
    assert got == sorted(got)


# -- headless: --notify-cmd ----------------------------------------------------------------


HOOK = """
import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"argv": sys.argv[2:], "stdin": json.load(sys.stdin),
                        "env": {k: v for k, v in os.environ.items() if k.startswith("XRAY_")}}) + "\\n")
"""


def test_notify_cmd_gets_fields_in_env_and_json_on_stdin_and_no_shell_sees_the_text(tmp_path):
    rec = record(tmp_path / "r.xray", stream(alerts=ALERTS))
    hook, out = tmp_path / "hook.py", tmp_path / "got.jsonl"
    hook.write_text(HOOK)
    plain = xray("replay", rec, "--headless", "--json")
    cmd = f"{sys.executable} {hook} {out} 'two words' ;"
    got = xray("replay", rec, "--headless", "--json", "--notify-cmd", cmd, cwd=tmp_path)
    assert got.returncode == plain.returncode == 1, got.stderr
    assert got.stdout == plain.stdout  # the headless output is untouched
    calls = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(c["argv"] == ["two words", ";"] for c in calls)  # shlex, never a shell
    assert not (tmp_path / "PWNED").exists()
    kinds = [(c["env"]["XRAY_EVENT"], c["env"].get("XRAY_LAYER"), c["env"].get("XRAY_STEP")) for c in calls]
    # nonfinite at 3 (4 and 5 rate-limited), four of the ten exploding (the burst), the other six as one
    # summary, no warning (--notify-on critical), the end last
    assert kinds[:5] == [("alert", "model.layers.0.fc", "3")] + [("alert", f"model.layers.{i}.fc", "8")
                                                                 for i in range(4)]
    assert [k[0] for k in kinds[5:]] == ["summary", "end"]
    first, summary, end = calls[0], calls[5], calls[6]
    assert first["env"]["XRAY_MESSAGE"] == HOSTILE and first["stdin"]["message"] == HOSTILE  # data, as sent
    assert first["env"]["XRAY_RULE"] == "nonfinite" and first["env"]["XRAY_SEVERITY"] == "critical"
    assert "\x1b" not in first["env"]["XRAY_TEXT"] and first["stdin"]["text"].startswith("xray-tui r.xray: ")
    assert summary["stdin"]["count"] == 6 and summary["stdin"]["rules"] == {"exploding": 6}
    assert end["env"]["XRAY_REASON"] == "crashed" and end["stdin"]["error"] == "ValueError: boom"
    assert end["stdin"]["alerts"] == {"critical": 13, "warning": 1, "info": 0} and end["stdin"]["exit"] == 1


def test_notify_on_warning_and_no_interval(tmp_path):
    rec = record(tmp_path / "r.xray", stream(alerts=[alert(3), alert(4), alert(9, rule="dead", severity="warning")],
                                             end=wire.End(19, 0)))
    hook, out = tmp_path / "hook.py", tmp_path / "got.jsonl"
    hook.write_text(HOOK)
    got = xray("replay", rec, "--headless", "--notify-on", "warning", "--notify-interval", "0",
               "--notify-cmd", f"{sys.executable} {hook} {out}")
    assert got.returncode == 0, got.stderr
    calls = [json.loads(x)["env"] for x in out.read_text().splitlines()]
    assert [(c["XRAY_EVENT"], c.get("XRAY_STEP"), c["XRAY_SEVERITY"]) for c in calls] == [
        ("alert", "3", "critical"), ("alert", "4", "critical"), ("alert", "9", "warning"), ("end", "19", "info")]


@pytest.mark.parametrize("flags,says", [
    (["--notify-cmd", "no-such-command-xyz"], "--notify-cmd: no-such-command-xyz: no such command"),
    (["--notify-cmd", "'unbalanced"], "--notify-cmd \"'unbalanced\": No closing quotation"),
    (["--notify-cmd", "  "], "--notify-cmd is empty"),
    (["--webhook", "ftp://example.com/x"], "--webhook must be an http:// or https:// URL"),
    (["--webhook", "@/no/such/file"], "--webhook @/no/such/file: No such file or directory"),
    (["--webhook", "http://127.0.0.1:9/", "--webhook-timeout", "0"], "--webhook-timeout must be"),
    (["--notify-interval", "-1"], "--notify-interval must be a number of minutes >= 0"),
    (["--notify-interval", "soon"], "--notify-interval must be a number of minutes >= 0"),
    (["--notify-on", "fatal"], "invalid choice: 'fatal'"),
])
def test_bad_notify_flags_are_one_line_and_exit_2(tmp_path, flags, says):
    rec = record(tmp_path / "r.xray", stream(n_steps=2, end=wire.End(1, 0)))
    out = xray("replay", rec, "--headless", *flags)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and says in out.stderr, out.stderr


def test_headless_notify_flags_without_headless_are_one_line_and_exit_2(tmp_path):
    rec = record(tmp_path / "r.xray", stream(n_steps=2, end=wire.End(1, 0)))
    out = xray("replay", rec, "--webhook", "http://127.0.0.1:9/")
    assert out.returncode == 2 and "--webhook works with --headless" in out.stderr
    assert len(out.stderr.splitlines()) == 1


# -- headless: --webhook against local servers -----------------------------------------------


class Hook(http.server.ThreadingHTTPServer):
    """A webhook endpoint on 127.0.0.1: ``mode`` ok (200), 500, or hang (never answers)."""

    daemon_threads = True

    def __init__(self, mode: str) -> None:
        self.mode, self.bodies, self.posts = mode, [], 0
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.posts += 1
                if server.mode == "hang":
                    server.release.wait(30)
                    return
                if server.mode == "ok":
                    server.bodies.append(json.loads(body))
                self.send_response(200 if server.mode == "ok" else 500)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hooks/xray"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def hook(request):
    h = Hook(request.param)
    yield h
    h.stop()


@pytest.mark.parametrize("hook", ["ok"], indirect=True)
def test_webhook_posts_slack_text_and_the_fields(tmp_path, hook):
    rec = record(tmp_path / "r.xray", stream(alerts=ALERTS))
    plain = xray("replay", rec, "--headless", "--json")
    got = xray("replay", rec, "--headless", "--json", "--webhook", hook.url)
    assert got.returncode == 1 and got.stdout == plain.stdout and got.stderr == "", got.stderr
    events = [(b["event"], b.get("layer")) for b in hook.bodies]
    assert events == [("alert", "model.layers.0.fc"), *[("alert", f"model.layers.{i}.fc") for i in range(4)],
                      ("summary", None), ("end", None)]
    first = hook.bodies[0]
    assert first["text"].startswith("xray-tui r.xray: CRITICAL nonfinite: model.layers.0.fc [act] at step 3: NaN")
    assert "\x1b" not in first["text"] and first["message"] == HOSTILE
    assert "&lt;!channel&gt;" in first["text"] and "<!channel>" not in first["text"]  # Slack pings nobody
    assert {k: first[k] for k in ("type", "step", "rank", "rule", "kind", "value", "threshold")} == {
        "type": "alert", "step": 3, "rank": 0, "rule": "nonfinite", "kind": "act", "value": 1.0, "threshold": 0.0}
    assert hook.bodies[-1]["reason"] == "crashed" and "run CRASHED" in hook.bodies[-1]["text"]


@pytest.mark.parametrize("hook", ["ok"], indirect=True)
def test_webhook_url_from_a_file_stays_off_the_command_line(tmp_path, hook):
    secret = tmp_path / "hook.url"
    secret.write_text(hook.url + "\n")
    rec = record(tmp_path / "r.xray", stream(n_steps=3, end=wire.End(2, 0)))
    got = xray("replay", rec, "--headless", "--webhook", f"@{secret}")
    assert got.returncode == 0 and got.stderr == "", got.stderr
    assert [b["event"] for b in hook.bodies] == ["end"] and hook.bodies[0]["reason"] == "finished"


@pytest.mark.parametrize("hook", ["500"], indirect=True)
def test_webhook_500_is_tried_three_times_then_one_line_on_stderr(tmp_path, hook):
    rec = record(tmp_path / "r.xray", stream(alerts=[alert(3)]))
    plain = xray("replay", rec, "--headless")
    got = xray("replay", rec, "--headless", "--webhook", hook.url, "--webhook-timeout", "0.2")
    assert got.returncode == 1 and got.stdout == plain.stdout
    assert hook.posts == 6  # the alert and the end, three tries each
    errs = got.stderr.splitlines()
    assert len(errs) == 2 and all("after 3 tries: HTTP 500" in e and e.startswith("xray-tui: webhook: ")
                                  for e in errs), got.stderr


def serve_live(path, phases):
    """Serve ``phases`` (lists of messages) on a Unix socket, 1.5 s apart; the time each was sent."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    os.chmod(path, 0o600)
    srv.listen(1)
    sent: list[float] = []

    def serve():
        conn, _ = srv.accept()
        conn.sendall(wire.MAGIC)
        for i, msgs in enumerate(phases):
            if i:
                time.sleep(1.5)
            sent.append(time.monotonic())
            conn.sendall(b"".join(wire.encode(m) for m in msgs))
        conn.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return sent


@pytest.mark.parametrize("hook", ["hang"], indirect=True)
def test_a_webhook_that_never_answers_stalls_nothing_and_loses_nothing(tmp_path, hook):
    """A live stream; alerts keep coming while every POST hangs: each line is printed as it arrives
    (a viewer that waited for the endpoint would be ~2 s per notice behind), every message is there,
    and the viewer leaves a bounded time after the end, saying what it could not send."""
    msgs = stream(n_steps=12, alerts=[alert(2, layer=f"model.layers.{i % 2}.fc", rule=r)
                                      for i, r in enumerate(("nonfinite", "exploding", "dead", "vanishing"))]
                  + [alert(9, layer="model.layers.1.fc", rule="stalled")], end=wire.End(11, 0, "killed", "SIGTERM"))
    cut = next(i for i, m in enumerate(msgs) if isinstance(m, wire.Step) and m.step == 6)
    sent = serve_live(tmp_path / "p.sock", [msgs[:cut], msgs[cut:]])
    proc = subprocess.Popen([sys.executable, "-m", "tui.cli", "attach", "--socket", str(tmp_path / "p.sock"),
                             "--headless", "--json", "--quiet", "--webhook", hook.url, "--webhook-timeout", "0.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got = []
    for line in proc.stdout:
        got.append((time.monotonic(), json.loads(line)))
    t_exit = time.monotonic()
    proc.wait(30)
    err = proc.stderr.read()
    alerts = [x for _, x in got if x["type"] == "alert"]
    assert [(a["step"], a["rule"]) for a in alerts] == [(2, "nonfinite"), (2, "exploding"), (2, "dead"),
                                                        (2, "vanishing"), (9, "stalled")]
    assert got[-1][1]["reason"] == "killed" and proc.returncode == 1
    t_late = next(t for t, x in got if x["type"] == "alert" and x["step"] == 9)
    # sent in line, the first phase's four notices would hold the viewer 4 x 1.8 s: ~5.7 s behind here
    assert t_late - sent[1] < 3.0, "the second phase's alert waited for the hung webhook"
    assert t_exit - got[-1][0] < 10.0  # the grace (5 s), then the viewer leaves anyway
    assert hook.posts >= 2 and "not sent (gave up after 5s)" in err, err


# -- on real training: the injected fault is notified, a healthy run notifies only its end ----------


SCRIPT = str(Path(__file__).parent / "train_script.py")


def trained_and_notified(tmp_path, name, *script_args):
    """Run tests/train_script.py and watch it headless with --notify-cmd; (stdout lines, notifications)."""
    hook, out = tmp_path / "hook.py", tmp_path / f"{name}.jsonl"
    hook.write_text(HOOK)
    proc = subprocess.Popen([sys.executable, SCRIPT, name, "200", "--sleep", "0.01", *script_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        got = xray("attach", name, "--headless", "--json", "--quiet",
                   "--notify-cmd", f"{sys.executable} {hook} {out}", timeout=120)
    finally:
        proc.wait(60)
    assert got.returncode == 0, got.stderr
    return [json.loads(x) for x in got.stdout.splitlines()], [json.loads(x)["stdin"] for x in
                                                              out.read_text().splitlines()]


@pytest.mark.slow
def test_real_training_a_nan_is_notified_once_per_rule_and_layer_and_a_healthy_run_only_ends(tmp_path):
    lines, sent = trained_and_notified(tmp_path, "nan-run", "--nan-at", "30")
    critical = [x for x in lines if x["type"] == "alert" and x["severity"] == "critical"]
    keys = list(dict.fromkeys((x["rule"], x["layer"]) for x in critical))  # what the probe found, in order
    alerts = [n for n in sent if n["event"] == "alert"]
    assert ("nonfinite", "2") in keys  # the fault, where it was injected (model[2])
    assert [(n["rule"], n["layer"]) for n in alerts] == keys[:5]  # each (rule, layer) once, the burst's first five
    assert all(n["severity"] == "critical" for n in alerts)
    nonfinite = next(n for n in alerts if n["rule"] == "nonfinite")
    assert nonfinite["step"] >= 30 and nonfinite["layer"] == "2"
    if len(keys) > 5:
        assert sent[-2]["event"] == "summary" and sent[-2]["count"] >= len(keys) - 5
    assert sent[-1]["event"] == "end" and sent[-1]["reason"] == "finished"

    lines, sent = trained_and_notified(tmp_path, "healthy-run")
    assert [n["event"] for n in sent] == ["end"]  # no false alarm reached anyone
    assert sent[0]["reason"] == "finished" and sent[0]["alerts"]["critical"] == 0
