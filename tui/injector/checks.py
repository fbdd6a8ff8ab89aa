"""Step 1 of an injection: is the target a process we may load the probe into, and if not, why?

Reads ``/proc``: the process exists, belongs to this user, runs CPython
(and which version), and the kernel's Yama setting lets us trace it.
"""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

from tui.injector import InjectFailed

#: the bit of CAP_SYS_PTRACE in /proc/self/status's CapEff mask
_CAP_SYS_PTRACE = 19


@dataclass(frozen=True)
class Target:
    """A process that can be injected: its pid, executable and Python version."""

    pid: int
    exe: str
    python: str  # "3.11"; "" for a Python whose version could not be told


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
