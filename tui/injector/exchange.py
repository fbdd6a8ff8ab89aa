"""Steps 2 and 4 of an injection: the request file the loader reads, and the status it answers with.

The request lies in our run directory (mode 600) under a random name; the
loader in the target writes its progress to a status file beside it. A
target that stays in C code past ``timeout`` has its request withdrawn, so
the call still queued there does nothing when it finally runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
from pathlib import Path

from probes.protocol import rundir
from tui.injector import InjectFailed
from tui.injector.checks import check_target
from tui.injector.debugger import schedule

#: how long after scheduling we say that the target is busy in C (seconds)
BUSY_NOTICE = 2.0


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
    """Poll the status file until the loader is done, fails, or the target keeps us waiting too long."""
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
