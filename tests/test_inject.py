"""`xray-tui attach --pid` and `detach`: the probe loaded into a run started without it.

The targets are real processes (tests/plain_train_script.py and one-liners);
the injection goes through gdb as a user's would. Skipped where gdb is
missing or the kernel refuses ptrace here.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tui.injector import checks, debugger, exchange

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "tests" / "plain_train_script.py")


def env(**extra):
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    e.update(extra)
    return e


def xray(*args, timeout=60, **kw):
    kw.setdefault("env", env())
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kw)


def one_line_error(done, *words, notices=0):
    """Exit 2 and one error line on stderr (after ``notices`` progress lines) that says each of ``words``."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()[notices:]
    assert len(lines) == 1 and lines[0].startswith("xray-tui: error: "), done.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


class Proc:
    """A target process, killed at the end; ``wait_for(text)`` reads its stdout up to a line."""

    def __init__(self, cmd, env=None, cwd_tmp=None):
        # SIGINT at its default: a test runner started in the background (`cmd &`) has it ignored, and a
        # Python started with SIGINT ignored never raises KeyboardInterrupt, which these tests send
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env or globals()["env"](), cwd=cwd_tmp or REPO,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines = []

    def wait_for(self, text, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if text in line:
                return
        raise AssertionError(f"{text!r} not seen: {self.lines[-5:]} {self.p.stderr.read() if self.p.poll() else ''}")

    def finish(self, timeout=30):
        out, err = self.p.communicate(timeout=timeout)
        self.lines += out.splitlines()
        return err

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.communicate()


@pytest.fixture(scope="session")
def traceable():
    """gdb can attach here to a sibling process (as the CLI will to the tests' targets), or skip."""
    if shutil.which("gdb") is None:
        pytest.skip("gdb is not installed (apt-get install gdb): attach --pid cannot be tried")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        out = subprocess.run(["gdb", "-batch", "-nx", "-p", str(sleeper.pid), "-iex", "set auto-solib-add off",
                              "-ex", 'p "TRACED"', "-ex", "sharedlibrary libc", "-ex", "p (int)getpid()"],
                             capture_output=True, text=True, timeout=30)
    finally:
        sleeper.kill()
        sleeper.wait()
    said = out.stdout + out.stderr
    if "TRACED" not in said:
        pytest.skip(f"ptrace is not allowed here: {said.strip().splitlines()[-1:]}")
    if f"= {sleeper.pid}" not in said:  # attach --pid must call a function in the target
        why = debugger.classify_debugger_output(sleeper.pid, "gdb", out.returncode, said)
        pytest.skip(f"gdb cannot call a function in another process here: {why}")


def losses(lines):
    return [float(ln.split()[2]) for ln in lines if ln.startswith("loss ")]


def test_inject_streams_then_detach_leaves_the_run_as_it_was(traceable, tmp_path):
    from probes.protocol import wire
    from tui import feed

    stop = tmp_path / "stop"
    target = Proc([sys.executable, SCRIPT, "--until", str(stop), "--sleep", "0.02"])
    plain = Proc([sys.executable, SCRIPT, "--steps", "3000"])  # the same seed, never injected
    try:
        target.wait_for("ready")
        pid = str(target.p.pid)
        done = xray("attach", "--pid", pid, "--load-only", "--every", "1", "--name", "injected", "--timeout", "20")
        assert done.returncode == 0, done.stderr
        assert "loaded the probe into pid" in done.stderr and "opt (AdamW)" in done.stderr
        runs = [json.loads(line) for line in xray("ls", "--json").stdout.splitlines()]
        assert [(r["name"], r["pid"]) for r in runs] == [("injected", target.p.pid)]

        gen = feed.SocketSource.for_run("injected").batches()
        msgs = []
        while sum(isinstance(m, wire.Step) for m in msgs) < 3:
            msgs += next(gen)
        assert isinstance(msgs[0], wire.Hello) and msgs[0].pid == target.p.pid
        gen.close()

        again = xray("attach", "--pid", pid, "--load-only", "--timeout", "20")  # one probe, not two
        assert again.returncode == 0 and "already has a probe" in again.stderr, again.stderr
        assert len(xray("ls", "--json").stdout.splitlines()) == 1

        gone = xray("detach", pid, "--timeout", "20")
        assert gone.returncode == 0 and "removed the probe" in gone.stderr, gone.stderr
        assert xray("ls", "--json").stdout == ""
        one_line_error(xray("detach", pid, "--timeout", "20"), "no probe injected")
        time.sleep(0.2)  # a few steps without the probe
        stop.touch()
        target.finish()
        plain.finish()
    finally:
        target.kill()
        plain.kill()
    report = json.loads(next(ln for ln in target.lines if ln.startswith("report "))[7:])
    assert report["threads"] == ["MainThread"]  # the publisher thread joined
    assert report["hooks"] == 0
    assert report["excepthook_default"] and report["sigterm_default"]
    assert report["injected_paths"] == []
    assert report["main_names"] == json.loads(next(ln for ln in plain.lines if ln.startswith("report "))[7:])[
        "main_names"]  # nothing left in the target's __main__
    injected, clean = losses(target.lines), losses(plain.lines)
    assert len(injected) > 20
    assert injected == clean[:len(injected)]  # bit for bit: the probe changed no number of the training


def test_no_such_pid():
    gone = subprocess.Popen(["true"])
    gone.wait()
    one_line_error(xray("attach", "--pid", str(gone.pid)), "no such process", str(gone.pid))
    one_line_error(xray("detach", str(gone.pid)), "no such process")


def test_not_a_python_process():
    sleeper = subprocess.Popen(["sleep", "30"])
    shell = subprocess.Popen(["sh", "-c", f"'{sys.executable}' -c 'import time; time.sleep(30)'; true"])
    try:
        one_line_error(xray("attach", "--pid", str(sleeper.pid)), "not a Python process", "sleep")
        deadline = time.monotonic() + 10
        while not checks._python_children(shell.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = checks._python_children(shell.pid)[0]
        one_line_error(xray("attach", "--pid", str(shell.pid)), "not a Python process", f"Python child: {child}")
    finally:
        for kid in checks._python_children(shell.pid):  # before the shell goes, while still its children
            os.kill(kid, signal.SIGKILL)
        for p in (sleeper, shell):
            p.kill()
            p.wait()


@pytest.mark.skipif(os.getuid() != 0, reason="starting another user's process needs root")
def test_another_users_process():
    sleeper = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: os.setuid(65534))
    try:
        one_line_error(xray("attach", "--pid", str(sleeper.pid)), "belongs to", "uid 65534", "not to you")
    finally:
        sleeper.kill()
        sleeper.wait()


SLEEPER = "import time\nprint('ready', flush=True)\nfor _ in range(600): time.sleep(0.05)\n"


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="3.14+ loads with sys.remote_exec, no debugger")
def test_no_debugger_names_the_package(tmp_path):
    target = Proc([sys.executable, "-c", SLEEPER])
    try:
        target.wait_for("ready")
        done = xray("attach", "--pid", str(target.p.pid), env=env(PATH=str(tmp_path)))
        one_line_error(done, "no debugger", "apt-get install gdb")
    finally:
        target.kill()


def test_nothing_to_watch_lists_what_was_found(traceable):
    code = "import torch\nlayer = torch.nn.Linear(2, 2)\n" + SLEEPER
    target = Proc([sys.executable, "-c", code])
    try:
        target.wait_for("ready")
        done = xray("attach", "--pid", str(target.p.pid), "--timeout", "20")
        one_line_error(done, "no optimizer", "layer (Linear, 6 parameters)", "--model EXPR --optimizer EXPR")
        bad = xray("attach", "--pid", str(target.p.pid), "--model", "nothing_here", "--timeout", "20")
        one_line_error(bad, "--model 'nothing_here'", "NameError")
        named = xray("attach", "--pid", str(target.p.pid), "--model", "layer", "--timeout", "20")
        one_line_error(named, "no optimizer training --model's parameters")
    finally:
        target.kill()


def test_a_process_without_torch_is_refused(traceable):
    target = Proc([sys.executable, "-c", SLEEPER])
    try:
        target.wait_for("ready")
        one_line_error(xray("attach", "--pid", str(target.p.pid), "--timeout", "20"), "has not imported torch")
        target.p.send_signal(signal.SIGINT)
        err = target.finish()
        assert "KeyboardInterrupt" in err and "xray" not in err  # its own interrupt; nothing of ours printed
    finally:
        target.kill()


def test_blocked_in_c_gives_up_after_the_timeout(traceable):
    target = Proc([sys.executable, "-c", "import time\nprint('ready', flush=True)\ntime.sleep(30)\n"])
    try:
        target.wait_for("ready")
        t0 = time.monotonic()
        done = xray("attach", "--pid", str(target.p.pid), "--timeout", "1.5")
        assert time.monotonic() - t0 < 15
        one_line_error(done, "stayed in C code", "--timeout", notices=1)
        assert "busy in C code" in done.stderr.splitlines()[0]  # said while it waited
        target.p.send_signal(signal.SIGINT)  # the sleep ends: the withdrawn call runs and does nothing
        target.p.wait(10)
    finally:
        target.kill()


def test_pid_options_need_pid_and_pid_takes_no_run_name():
    one_line_error(xray("attach", "--every", "3"), "--every works with --pid")
    one_line_error(xray("attach", "somerun", "--pid", "1"), "run name or --pid")


def test_ptrace_refused_names_the_setting_and_the_capability(tmp_path, monkeypatch):
    scope = tmp_path / "ptrace_scope"
    scope.write_text("3\n")
    why = checks.ptrace_refusal(os.getpid(), str(scope))
    assert "kernel.yama.ptrace_scope" in why and "CAP_SYS_PTRACE" in why
    scope.write_text("1\n")
    monkeypatch.setattr(checks, "_has_cap_sys_ptrace", lambda: False)
    assert "kernel.yama.ptrace_scope = 1" in checks.ptrace_refusal(1, str(scope))
    monkeypatch.setattr(checks, "_has_cap_sys_ptrace", lambda: True)
    assert checks.ptrace_refusal(1, str(scope)) is None
    gdb_said = ("Could not attach to process.  If your uid matches the uid of the target\nprocess, check the "
                "setting of /proc/sys/kernel/yama/ptrace_scope, or try\nagain as the root user.\n"
                "ptrace: Operation not permitted.\n")
    why = debugger.classify_debugger_output(123, "gdb", 1, gdb_said)
    assert "kernel.yama.ptrace_scope" in why and "CAP_SYS_PTRACE" in why
    assert debugger.classify_debugger_output(123, "gdb", 0, '$2 = "XRAY-TUI: SCHEDULED"') is None
    # a VM whose kernel refuses gdb's register writes (seen on this project's Intel machines): said as such,
    # not as the cryptic last line ("Invalid type combination in equality test")
    vm_said = ('$1 = "XRAY-TUI: ATTACHED"\nCouldn\'t write extended state status: Bad address.\n'
               'No symbol "PyRun_SimpleString" in current context.\nInvalid type combination in equality test.\n')
    why = debugger.classify_debugger_output(123, "gdb", 1, vm_said)
    assert "cannot call a function in it" in why and "probes.attach" in why


def test_headless_attach_with_the_viewers_own_package(traceable, tmp_path):
    """A target whose environment lacks xray-tui gets this viewer's package directories (same Python);
    `attach --pid --headless` then watches the run to its end as `attach --headless` does."""
    stop = tmp_path / "stop"
    target = Proc([sys.executable, SCRIPT, "--until", str(stop), "--sleep", "0.02", "--hide-xray"],
                  env={k: v for k, v in env().items() if k != "PYTHONPATH"}, cwd_tmp=tmp_path)
    watcher = None
    try:
        target.wait_for("ready")
        watcher = subprocess.Popen([sys.executable, "-m", "tui.cli", "attach", "--pid", str(target.p.pid),
                                    "--headless", "--quiet", "--every", "2", "--timeout", "20"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
        deadline = time.monotonic() + 30
        while not xray("ls", "--json").stdout and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.3)
        stop.touch()
        out, err = watcher.communicate(timeout=30)
        target.finish()
    finally:
        target.kill()
        if watcher and watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    assert "loaded the probe into pid" in err and "finished" in out, (out, err)
    report = json.loads(next(ln for ln in target.lines if ln.startswith("report "))[7:])
    assert report["injected_paths"], report  # the viewer's package, lent while the probe is attached


def test_choosing_what_to_watch(monkeypatch):
    """The optimizer's root module (the largest when several hold its parameters); several optimizers
    or none are one-line errors that list what was found."""
    import torch
    from torch import nn

    from probes.inject import loader as inject

    small = nn.Linear(2, 2)
    big = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    shared = nn.Sequential(big[0])  # another root holding part of the same parameters
    other = nn.Linear(3, 3)
    opt = torch.optim.SGD(big.parameters(), lr=0.1)
    live = {nn.Module: [small, big, big[0], big[1], shared, other], torch.optim.Optimizer: [opt]}
    monkeypatch.setattr(inject, "_live", lambda kind: live[kind])
    assert inject._choose(None, None) == (big, opt)
    live[torch.optim.Optimizer].append(torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(inject.InjectError, match="2 optimizers found .* --optimizer EXPR"):
        inject._choose(None, None)
    live[torch.optim.Optimizer].clear()
    with pytest.raises(inject.InjectError, match=r"no optimizer .*found: 0 optimizer\(s\); a Linear"):
        inject._choose(None, None)


@pytest.mark.slow  # lldb reads every library's symbols (torch's too): 8-15 s to attach here, against gdb's 0.5
@pytest.mark.skipif(shutil.which("lldb") is None, reason="lldb is not installed (apt-get install lldb)")
def test_lldb_loads_the_probe_where_it_is_the_debugger(traceable, monkeypatch, tmp_path):
    """The lldb commands queue the same pending call (here with gdb present too, lldb is forced)."""
    stop = tmp_path / "stop"
    target = Proc([sys.executable, SCRIPT, "--until", str(stop), "--sleep", "0.02"])
    try:
        target.wait_for("ready")
        monkeypatch.setattr(debugger, "find_debugger", lambda: "lldb")
        status = exchange.request(target.p.pid, "attach", {"name": "by-lldb"}, timeout=20, say=lambda _: None)
        assert status["state"] == "done" and status["run"] == "by-lldb"
        assert exchange.request(target.p.pid, "detach", {}, timeout=20, say=lambda _: None)["detached"]
        stop.touch()
        target.finish()
    finally:
        target.kill()
    report = json.loads(next(ln for ln in target.lines if ln.startswith("report "))[7:])
    assert report["threads"] == ["MainThread"] and report["hooks"] == 0
