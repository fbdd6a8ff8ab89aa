"""The per-user run directory: where live probes put their sockets and manifests.

``$XDG_RUNTIME_DIR/xray-tui`` when that is set, else ``/tmp/xray-tui-$UID``.
The directory is mode 0700 and must belong to the user: one that is owned by
someone else or open to others is refused, so nobody can list, attach to or
feed another user's run. Each rank of a run writes ``<stem>.sock`` (0600)
and ``<stem>.json``, a manifest describing the run, and, with a TCP
listener, ``<stem>.token`` (0600), the token TCP viewers must present.
Manifests that are not plain files of ours are ignored, never followed.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path


class RunDirError(Exception):
    """The run directory or an entry in it cannot be trusted or used."""


def run_dir() -> Path:
    """The run directory's path (not created)."""
    override = os.environ.get("XRAY_TUI_RUN_DIR")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "xray-tui"
    return Path(f"/tmp/xray-tui-{os.getuid()}")


def check_private(path: Path, want_dir: bool) -> None:
    """Refuse a path that is not ours alone (owner, mode, and type)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except PermissionError:
        raise RunDirError(f"{path}: permission denied (a directory on its path is not open to you)") from None
    kind_ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISSOCK(st.st_mode)
    if not kind_ok:
        raise RunDirError(f"{path} is not a {'directory' if want_dir else 'socket'}")
    if st.st_uid != os.getuid():
        raise RunDirError(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}): refused")
    if st.st_mode & 0o077:
        raise RunDirError(f"{path} has mode {stat.S_IMODE(st.st_mode):o}, open to other users: refused")


def ensure_run_dir() -> Path:
    """Create the run directory (0700) if needed and check it is private."""
    d = run_dir()
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {d}: {exc.strerror}") from None
    check_private(d, want_dir=True)
    return d


def safe_name(name: str) -> str:
    """A run name reduced to characters that are safe in a file name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"
    return cleaned[:40]


@dataclass(frozen=True)
class Manifest:
    """What a live probe says about itself next to its socket."""

    run: str
    pid: int
    rank: int
    world_size: int
    started: float
    argv: list
    socket: str
    protocol: int
    tcp: str = ""  # "host:port" of the optional TCP listener
    log: str = ""  # the recording this rank writes ("" when none)
    nodes: int = 1  # hosts the job runs on (rank 0 knows them all: probes/distributed/job.py), 1 when unknown

    @property
    def token_file(self) -> Path:
        """Where the TCP token is (only with ``tcp``): next to the socket."""
        return Path(self.socket).with_suffix(".token")

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        """Read and validate a manifest file."""
        try:
            data = json.loads(path.read_text())
            return cls(
                run=str(data["run"]),
                pid=int(data["pid"]),
                rank=int(data["rank"]),
                world_size=int(data["world_size"]),
                started=float(data["started"]),
                argv=list(data.get("argv", [])),
                socket=str(data["socket"]),
                protocol=int(data.get("protocol", 0)),
                tcp=str(data.get("tcp", "")),
                log=str(data.get("log", "")),
                nodes=max(1, int(data.get("nodes", 1))),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunDirError(f"bad manifest {path}: {exc}") from None

    def write(self, path: Path) -> None:
        """Write atomically, readable by the owner only."""
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.__dict__, f)
        os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_manifests(clean: bool = True) -> list[Manifest]:
    """Manifests of live probes; entries of dead processes are removed."""
    d = run_dir()
    if not d.exists():
        return []
    check_private(d, want_dir=True)
    found = []
    for path in sorted(d.glob("*.json")):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            continue  # a link or someone else's file: never read, never removed
        try:
            m = Manifest.load(path)
        except RunDirError:
            continue
        if _alive(m.pid) and os.path.exists(m.socket):
            found.append(m)
        elif clean:
            remove_stale(d, path, m)
    return found


def _ours_in(d: Path, path: Path, is_kind) -> bool:
    """Whether ``path`` is an entry of ``d`` itself (not below, above or through a link), of
    the kind ``is_kind`` accepts (``stat.S_ISSOCK``...) and owned by the user."""
    try:
        inside = os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(d)
        st = os.lstat(path)  # the entry itself: a link is not followed, and is not of any kind here
    except (OSError, ValueError):
        return False
    return inside and path.name not in ("", ".", "..") and is_kind(st.st_mode) and st.st_uid == os.getuid()


def remove_stale(d: Path, manifest_path: Path, m: Manifest) -> None:
    """Remove a dead run's manifest, and the socket and token it names only where each is
    what the probe makes: a socket (a regular token file) directly inside the run directory
    and the user's. A manifest's ``socket`` is a path anyone's file could hold; whatever else
    it names (a file elsewhere, a link, a directory) is left alone."""
    sock = Path(m.socket)
    entries = [(manifest_path, stat.S_ISREG)]
    if sock.suffix == ".sock":
        entries += [(sock, stat.S_ISSOCK), (m.token_file, stat.S_ISREG)]
    for path, is_kind in entries:
        if _ours_in(d, path, is_kind):
            try:
                path.unlink()
            except OSError:
                pass


@dataclass(frozen=True)
class Run:
    """A live run: all of its ranks' manifests."""

    name: str
    ranks: list

    @property
    def pid(self) -> int:
        """The pid of rank 0 (or the lowest rank present)."""
        return self.ranks[0].pid

    def as_json(self) -> dict:
        """The `xray-tui ls --json` object."""
        return {
            "name": self.name,
            "pid": self.pid,
            "pids": [m.pid for m in self.ranks],
            "ranks": [m.rank for m in self.ranks],
            "world_size": self.ranks[0].world_size,
            "nodes": max(m.nodes for m in self.ranks),
            "sockets": [m.socket for m in self.ranks],
            "started": self.ranks[0].started,
            "recordings": [m.log for m in self.ranks],
        }


def live_runs() -> list[Run]:
    """Live runs grouped by name, oldest first."""
    groups: dict[tuple[str, float], list[Manifest]] = {}
    for m in live_manifests():
        groups.setdefault(m.run, []).append(m)
    runs = [Run(name, sorted(ms, key=lambda m: m.rank)) for name, ms in groups.items()]
    return sorted(runs, key=lambda r: r.ranks[0].started)
