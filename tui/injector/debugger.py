"""Step 3 of an injection: queue the loader's stub in the target's main thread.

With ``sys.remote_exec`` when this Python is 3.14+ and the target's
version, else with gdb or lldb calling ``Py_AddPendingCall``; the
debugger's output says whether the call was queued, and if not, why.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from probes.inject.stub import stub
from probes.protocol import rundir
from tui.injector import InjectFailed
from tui.injector.checks import Target, ptrace_refusal

#: the longest a debugger may take to attach and queue the call (seconds)
DEBUGGER_TIMEOUT = 60.0


def find_debugger() -> str:
    """gdb, else lldb, or InjectFailed naming the package that provides one."""
    for name in ("gdb", "lldb"):
        if shutil.which(name):
            return name
    raise InjectFailed("no debugger found to load the probe with: install gdb (apt-get install gdb, "
                       "or dnf install gdb) or lldb (apt-get install lldb)")


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
    if "Couldn't write extended state status" in output:  # gdb's PTRACE_SETREGSET of the FPU state failed
        return (f"{debugger} attached to pid {pid} but cannot call a function in it: this kernel refuses its "
                "register writes (\"Couldn't write extended state status\", as some virtual machines do); "
                "attach the probe in the script instead (probes.attach)")
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
