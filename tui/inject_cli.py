"""The injector of `xray-tui attach --pid PID` and `xray-tui detach PID`.

It loads the probe into a Python process that never imported it, the way
memray's ``attach`` and py-spy reach a running process:

1. check the target: it exists, is ours, runs Python, and can be traced;
2. write a request (what to do, the attach options) into our run directory;
3. schedule a one-line stub in the target: with ``sys.remote_exec`` when this
   Python is 3.14+ and the target's version, else with the system debugger
   (gdb, or lldb) calling ``Py_AddPendingCall(PyRun_SimpleString, stub)``.
   The debugger only queues the call, it runs no Python itself: CPython runs
   pending calls in the main thread between bytecodes, where running Python
   code is safe (never in the middle of C code holding locks);
4. wait for the loader (:mod:`probes.inject.boot`) to write its status. A
   target busy in C code runs the call when it returns to Python; after
   ``--timeout`` the request is withdrawn, so the call does nothing when it
   finally runs.

Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from probes.protocol import rundir
from probes.inject.stub import stub

#: how long after scheduling we say that the target is busy in C (seconds)
BUSY_NOTICE = 2.0
#: the longest a debugger may take to attach and queue the call (seconds)
DEBUGGER_TIMEOUT = 60.0
_CAP_SYS_PTRACE = 19


class InjectFailed(Exception):
    """A one-line reason the probe could not be loaded or removed (the CLI exits 2)."""


@dataclass(frozen=True)
class Target:
    pid: int
    exe: str
    python: str  # "3.11"; "" for a Python whose version could not be told


# -- checks -----------------------------------------------------------------


def check_target(pid: int) -> Target:
    """The target process, or InjectFailed saying why it cannot be injected."""
    if not os.path.isdir("/proc/self"):
        raise InjectFailed("attach --pid works on Linux only (it reads /proc, which this system lacks)")
    if pid <= 0:
        raise InjectFailed(f"no such process: {pid}")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise InjectFailed(f"no such process: {pid}") from None
    except PermissionError:
        pass  # another user's: said below, by name
    proc = Path(f"/proc/{pid}")
    try:
        uid = proc.stat().st_uid
    except FileNotFoundError:
        raise InjectFailed(f"no such process: {pid}") from None
    if uid != os.getuid():
        raise InjectFailed(f"pid {pid} belongs to {_user(uid)}, not to you ({_user(os.getuid())}): "
                           f"run xray-tui as {_user(uid)} to attach to it")
    try:
        exe = os.readlink(proc / "exe")
        maps = (proc / "maps").read_text()
    except OSError as exc:
        raise InjectFailed(f"cannot read /proc/{pid}: {exc.strerror or exc}") from None
    python = _python_version(exe, maps)
    if python is None:
        kids = _python_children(pid)
        hint = f"; its Python child{'ren' if len(kids) > 1 else ''}: {', '.join(map(str, kids[:5]))}" if kids else ""
        raise InjectFailed(f"pid {pid} is not a Python process ({exe.removesuffix(' (deleted)')}){hint}")
    return Target(pid, exe.removesuffix(" (deleted)"), python)


def _python_children(pid: int) -> list[int]:
    """Python processes started by ``pid`` (a shell or launcher given instead of the trainer)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and re.match(r"python", os.path.basename(os.readlink(entry / "exe"))):
                kids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(kids)


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _python_version(exe: str, maps: str) -> str | None:
    """ "3.X" of a process running CPython, "" when it is Python of an unknown version, None when it is not."""
    m = re.search(r"libpython(\d+\.\d+)", maps)
    if m:
        return m.group(1)
    m = re.match(r"python(\d+\.\d+)", os.path.basename(exe))
    if m:
        return m.group(1)
    # a static python under another name (python3, an embedding binary): its own symbols say so
    try:
        with open(exe.removesuffix(" (deleted)"), "rb") as f:
            if b"Py_AddPendingCall" in f.read(256 << 20):
                return ""
    except OSError:
        pass
    return None


def _has_cap_sys_ptrace() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1)
    except (OSError, ValueError):
        pass
    return os.getuid() == 0


def _is_descendant(pid: int) -> bool:
    me = os.getpid()
    for _ in range(64):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == me:
            return True
        if pid <= 1:
            return False
    return False


def ptrace_refusal(pid: int, scope_file: str = "/proc/sys/kernel/yama/ptrace_scope") -> str | None:
    """Why the kernel will not let us trace ``pid`` (Yama's ptrace_scope), or None when it should."""
    try:
        scope = int(Path(scope_file).read_text().strip())
    except (OSError, ValueError):
        return None  # no Yama: ordinary same-user rules, already checked
    cap = _has_cap_sys_ptrace()
    if scope >= 3:
        why = "kernel.yama.ptrace_scope = 3 forbids tracing any process until reboot"
    elif scope == 2 and not cap:
        why = "kernel.yama.ptrace_scope = 2 lets only processes with CAP_SYS_PTRACE trace"
    elif scope == 1 and not cap and not _is_descendant(pid):
        why = "kernel.yama.ptrace_scope = 1 lets a process trace only its own children"
    else:
        return None
    return (f"ptrace of pid {pid} refused: {why}; allow it with `sudo sysctl kernel.yama.ptrace_scope=0`, "
            "or run xray-tui with CAP_SYS_PTRACE (e.g. sudo)")


def find_debugger() -> str:
    """gdb, else lldb, or InjectFailed naming the package that provides one."""
    for name in ("gdb", "lldb"):
        if shutil.which(name):
            return name
    raise InjectFailed("no debugger found to load the probe with: install gdb (apt-get install gdb, "
                       "or dnf install gdb) or lldb (apt-get install lldb)")


# -- scheduling the stub ----------------------------------------------------


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def debugger_command(debugger: str, pid: int, code: str) -> list[str]:
    """The debugger's command line that queues ``PyRun_SimpleString(code)`` as a pending call.

    Only libc's and libpython's symbols are loaded (not torch's hundreds of
    megabytes), as memray does. The string is strdup'ed into the target and
    stays there (a few hundred bytes), since the call runs after we left."""
    s = _c_string(code)
    # the function's address in a variable of its own first: lldb cannot take it inside the call's arguments
    func = "set $xr_f = (void *)&PyRun_SimpleString" if debugger == "gdb" else \
        "expr void *$xr_f = (void *)&PyRun_SimpleString"
    add = "((int (*)(void *, void *))Py_AddPendingCall)($xr_f, (void *)$xr_s)"
    done = 'p $xr_r == 0 ? "XRAY-TUI: SCHEDULED" : "XRAY-TUI: QUEUE-FULL"'
    if debugger == "gdb":
        return ["gdb", "-batch", "-nx", "-nw", "-p", str(pid), "-iex", "set auto-solib-add off",
                "-ex", "set unwindonsignal on", "-ex", "sharedlibrary libc", "-ex", "sharedlibrary libpython",
                "-ex", 'p "XRAY-TUI: ATTACHED"',
                "-ex", f"set $xr_s = ((char *(*)(const char *))strdup)({s})",
                "-ex", func, "-ex", f"set $xr_r = {add}", "-ex", done]
    return ["lldb", "--batch", "--no-lldbinit", "-p", str(pid),
            "-o", 'p "XRAY-TUI: ATTACHED"',
            "-o", f"expr void *$xr_s = ((char *(*)(const char *))strdup)({s})",
            "-o", func, "-o", f"expr int $xr_r = {add}", "-o", done]


def classify_debugger_output(pid: int, debugger: str, rc: int, output: str) -> str | None:
    """None when the call was queued, else the one-line reason it was not."""
    if "XRAY-TUI: SCHEDULED" in output:
        return None
    if "XRAY-TUI: QUEUE-FULL" in output:
        return f"pid {pid}: its queue of pending calls is full; try again in a moment"
    if "No such process" in output and "XRAY-TUI: ATTACHED" not in output:
        return f"no such process: {pid}"
    if ("Operation not permitted" in output or "ptrace_scope" in output or "attach failed" in output) \
            and "XRAY-TUI: ATTACHED" not in output:
        return (f"ptrace of pid {pid} refused: check kernel.yama.ptrace_scope (0 allows tracing your own "
                "processes) and that xray-tui has CAP_SYS_PTRACE (inside a container: --cap-add=SYS_PTRACE)")
    # the debuggers echo the commands, so only their own "unknown symbol" errors say that it is not CPython
    if re.search(r"No symbol \"Py\w+\" in current context|undeclared identifier '_*Py\w+'", output):
        return (f"pid {pid}: {debugger} found no CPython runtime to call (Py_AddPendingCall); "
                "not a CPython process, or its symbols are stripped")
    last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), f"exit status {rc}")
    return f"{debugger} could not queue the loader in pid {pid}: {last[:200]}"


def schedule(target: Target, code: Path | str, timeout: float = DEBUGGER_TIMEOUT) -> None:
    """Queue the stub in the target's main thread, or InjectFailed."""
    code_text = stub(Path(code)) if isinstance(code, Path) else code
    mine = "%d.%d" % sys.version_info[:2]
    why = ptrace_refusal(target.pid)  # sys.remote_exec writes into the target with the same right
    if why:
        raise InjectFailed(why)
    if sys.version_info >= (3, 14) and target.python == mine:
        script = Path(code).with_suffix(".py") if isinstance(code, Path) else \
            rundir.ensure_run_dir() / f"inject-{target.pid}-{secrets.token_hex(6)}.py"
        script.write_text(code_text)
        try:
            sys.remote_exec(target.pid, str(script))  # runs at the next safe point, as a pending call does
        except (OSError, RuntimeError) as exc:
            raise InjectFailed(f"sys.remote_exec into pid {target.pid} failed: {exc}") from None
        return  # the script is removed once the loader ran (before, the target may still open it)
    debugger = find_debugger()
    cmd = debugger_command(debugger, target.pid, code_text)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise InjectFailed(f"{debugger} did not finish attaching to pid {target.pid} in {timeout:g} s") from None
    if debugger == "lldb":
        # lldb has been seen to leave a process stopped after a batch session (memray's note)
        try:
            os.kill(target.pid, signal.SIGCONT)  # ignored by a process that is running
        except OSError:
            pass
    why = classify_debugger_output(target.pid, debugger, done.returncode, done.stdout + done.stderr)
    if why:
        raise InjectFailed(why)


# -- the request and its answer ---------------------------------------------


def _package_links(d: Path) -> dict[str, str]:
    """Folders holding only a link to this viewer's ``probes`` and ``msgspec``, for a target without them."""
    import msgspec

    import probes

    links = {}
    for name, mod in (("probes", probes), ("msgspec", msgspec)):
        src = Path(mod.__file__).resolve().parent
        folder = d / "inject-lib" / f"{name}-{hashlib.sha256(str(src).encode()).hexdigest()[:8]}"
        link = folder / name
        if not link.is_symlink() or os.readlink(link) != str(src):
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.tmp"
            if tmp.is_symlink():
                tmp.unlink()
            tmp.symlink_to(src)
            os.replace(tmp, link)
        links[name] = str(folder)
    return links


def request(pid: int, action: str, options: dict | None = None, timeout: float = 30.0,
            say=lambda line: print(f"xray-tui: {line}", file=sys.stderr, flush=True)) -> dict:
    """Do ``action`` (attach or detach) in ``pid``; returns the loader's status (``state`` ``done``).

    ``timeout``: how long the target may stay in C code before it runs the
    queued call; after it the request is withdrawn (the call then does nothing)."""
    target = check_target(pid)
    d = rundir.ensure_run_dir()
    token = secrets.token_hex(6)
    req_path = d / f"inject-{pid}-{token}.request"
    status_path = d / f"inject-{pid}-{token}.status"
    body = {"action": action, "status": str(status_path), "run_dir": str(d),
            "python": "%d.%d" % sys.version_info[:2], "paths": _package_links(d), **(options or {})}
    tmp = req_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f)
    os.replace(tmp, req_path)
    try:
        schedule(target, req_path)
        return _wait(pid, req_path, status_path, timeout, say)
    finally:
        ran = status_path.exists()
        for p in (req_path, status_path, status_path.with_suffix(".status.tmp")):
            try:
                p.unlink()
            except OSError:
                pass
        if ran:  # sys.remote_exec's script, read by now; a withdrawn one stays for the call still queued
            try:
                req_path.with_suffix(".py").unlink()
            except OSError:
                pass


def _read_status(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _wait(pid: int, req_path: Path, status_path: Path, timeout: float, say) -> dict:
    start = time.monotonic()
    deadline = start + timeout
    told = False
    working = False
    while True:
        status = _read_status(status_path)
        if status and status.get("state") == "done":
            return status
        if status and status.get("state") == "error":
            raise InjectFailed(f"pid {pid}: {status.get('error', 'the loader failed')}")
        failed = Path(f"{req_path}.failed")
        if failed.exists():  # the stub itself could not run the loader
            why = failed.read_text(errors="replace").strip()[:300]
            failed.unlink(missing_ok=True)
            raise InjectFailed(f"pid {pid}: the loader could not start there: {why}")
        if status and not working:  # the loader runs: from now on it is our own work we wait for
            working = True
            deadline = time.monotonic() + max(timeout, 30.0)
        now = time.monotonic()
        if not os.path.exists(f"/proc/{pid}"):
            raise InjectFailed(f"pid {pid} exited before the probe could {'load' if working else 'be loaded'}")
        if not working and not told and now - start > min(BUSY_NOTICE, timeout / 2):
            say(f"pid {pid} is busy in C code (a long op, I/O or a sleep); the probe loads when it returns "
                f"to Python (giving up after --timeout {timeout:g} s)")
            told = True
        if now > deadline:
            if working:
                raise InjectFailed(f"pid {pid}: the loader started but did not finish in {max(timeout, 30.0):g} s")
            try:
                req_path.unlink()  # withdraw: the queued call then finds nothing to do
            except FileNotFoundError:
                deadline = now + max(timeout, 30.0)  # the loader took it at this moment: wait for it
                working = True
                continue
            raise InjectFailed(f"pid {pid} stayed in C code for {timeout:g} s without reaching Python: gave up "
                               "(the queued call will do nothing when it runs); wait longer with --timeout SECONDS")
        time.sleep(0.05)


# -- the command line -------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


#: attach's options that only mean something with --pid (flag, dest)
PID_OPTIONS = (("--model", "model"), ("--optimizer", "optimizer"), ("--every", "every"), ("--name", "name"),
               ("--probe-log", "probe_log"), ("--load-only", "load_only"))


def add_attach_options(a: argparse.ArgumentParser) -> None:
    """``attach``'s options for loading the probe into a process started without it."""
    g = a.add_argument_group(
        "loading the probe into a running process (--pid)",
        "For a run started without probes.attach: the probe is loaded into it with gdb or lldb (sys.remote_exec "
        "on Python 3.14+), found model and optimizer are watched, then the run is shown as any other. Needs the "
        "same user, a debugger and ptrace allowed; steps before it attached are not seen.")
    g.add_argument("--pid", type=_positive, metavar="PID", help="load the probe into this Python process")
    g.add_argument("--model", metavar="EXPR", help="the model to watch, an expression evaluated in the target's "
                   "__main__ (default: the root module whose parameters the optimizer trains)")
    g.add_argument("--optimizer", metavar="EXPR", help="the optimizer, an expression evaluated in the target's "
                   "__main__ (default: the only live optimizer)")
    g.add_argument("--every", type=_positive, metavar="N", help="sample one step in N (the probe's default: 10)")
    g.add_argument("--name", metavar="NAME", help="the run's name (default: the target script's name)")
    g.add_argument("--probe-log", metavar="FILE", help="the target records its stream to FILE "
                   "(probes.attach(log=FILE)); --log records what this viewer receives")
    g.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="how long the target may stay in C code before it loads the probe (default 30)")
    g.add_argument("--load-only", action="store_true",
                   help="load the probe and return; watch later with `xray-tui attach NAME`")


def add_detach_parser(sub) -> None:
    """``xray-tui detach PID``."""
    d = sub.add_parser("detach", help="remove a probe that attach --pid loaded",
                       description="Remove the probe `xray-tui attach --pid` loaded into a process: its hooks "
                                   "and thread go, the training goes on as before.")
    d.add_argument("pid", type=_positive, help="the process")
    d.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="how long the target may stay in C code before it runs the request (default 30)")
    d.set_defaults(func=cmd_detach)


def _say(line: str) -> None:
    print(f"xray-tui: {line}", file=sys.stderr, flush=True)


def check_pid_options(args) -> None:
    """Without --pid, the options that load a probe are a mistake: say so."""
    given = [flag for flag, dest in PID_OPTIONS if getattr(args, dest, None)]
    if given:
        raise InjectFailed(f"{', '.join(given)} work{'s' if len(given) == 1 else ''} with --pid "
                           "(loading the probe into a process)")


def cmd_attach_pid(args, watch) -> int:
    """``attach --pid``: load the probe into the process, then watch the run with ``watch(args)``."""
    if args.run is not None:
        raise InjectFailed("give a run name or --pid, not both (--name names the run --pid starts)")
    if args.socket or args.tcp:
        raise InjectFailed("--pid watches the run it loads; --socket and --tcp do not go with it")
    log = None
    if args.probe_log:
        log = os.path.abspath(args.probe_log)
        if not os.path.isdir(os.path.dirname(log)):
            raise InjectFailed(f"--probe-log {args.probe_log}: no such directory {os.path.dirname(log)}")
    opts = {"every": args.every, "name": args.name, "log": log, "model": args.model, "optimizer": args.optimizer}
    status = request(args.pid, "attach", opts, args.timeout, say=_say)
    run = status["run"]
    if status.get("already"):
        _say(f"pid {args.pid} already has a probe ({status['already']}): run {run}")
    else:
        _say(f"loaded the probe into pid {args.pid}: run {run}, watching {status.get('model')} "
             f"trained by {status.get('optimizer')}")
    if args.load_only:
        _say(f"watch it with `xray-tui attach {run}`; remove it with `xray-tui detach {args.pid}`")
        return 0
    args.run, args.pid = run, None
    for _, dest in PID_OPTIONS:  # done with: the watch that follows is a plain `attach RUN`
        setattr(args, dest, None)
    return watch(args)


def cmd_detach(args) -> int:
    """``detach PID``: remove the probe ``attach --pid`` loaded."""
    status = request(args.pid, "detach", {}, args.timeout, say=_say)
    _say(f"removed the probe from pid {args.pid} (run {status.get('run')}): its hooks and thread are gone")
    return 0
