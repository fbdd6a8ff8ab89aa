"""Nobody but the run's owner can list, attach to or feed it.

Permissions of the run directory, sockets, manifests and tokens; refusal of
anything owned by someone else or open to others; a real second Unix user
(created here) trying to get in; the TCP listener's token handshake; and
what a hostile peer can make the viewer do with what it sends (nothing).
"""

import json
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import probes
from probes.publish.handshake import handshake
from probes.protocol import wire
from tui import feed, synthetic

ROOT = Path(__file__).resolve().parent.parent
OTHER_UID = 4242  # an owner that is not us (root may chown to any uid)


def xray(*args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def train(model, opt, n):
    for _ in range(n):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def one_line_exit_2(out, message):
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and message in out.stderr and "Traceback" not in out.stderr


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner to another uid needs root")


# -- permissions and refusals -------------------------------------------------


def test_the_probe_creates_a_0700_directory_and_0600_socket_manifest_and_token(tmp_path, monkeypatch):
    d = tmp_path / "fresh" / "xray-tui"
    monkeypatch.setenv("XRAY_TUI_RUN_DIR", str(d))
    model, opt = small_model()
    with probes.attach(model, opt, every=1, name="private", tcp=True) as xr:
        pub = xr.publisher
        assert mode(d) == 0o700 and os.lstat(d).st_uid == os.getuid()
        assert stat.S_ISSOCK(os.lstat(pub.socket_path).st_mode) and mode(pub.socket_path) == 0o600
        assert mode(pub.manifest_path) == 0o600 and mode(pub.token_path) == 0o600
        assert pub.tcp_address.startswith("127.0.0.1:")  # loopback unless asked otherwise
        manifest = json.loads(pub.manifest_path.read_text())
        assert pub.token not in json.dumps(manifest)  # the token lives in its own 0600 file only


@pytest.mark.parametrize("problem", ["open to others", "someone else's", "a symlink"])
def test_a_run_directory_that_is_not_ours_alone_is_refused_by_probe_and_viewer(tmp_path, monkeypatch, caplog, problem):
    d = tmp_path / "xray-tui"
    d.mkdir(mode=0o700)
    if problem == "open to others":
        d.chmod(0o755)
        message = "open to other users: refused"
    elif problem == "someone else's":
        needs_root()
        os.chown(d, OTHER_UID, OTHER_UID)
        message = f"belongs to uid {OTHER_UID}"
    else:
        link = tmp_path / "link"
        link.symlink_to(d)
        d = link
        message = "is not a directory"
    monkeypatch.setenv("XRAY_TUI_RUN_DIR", str(d))
    model, opt = small_model()
    with caplog.at_level(logging.WARNING, "xray-tui"):
        with probes.attach(model, opt, every=1, name="refused") as xr:
            train(model, opt, 3)  # training goes on, unserved
            assert xr.publisher.socket_path is None
    assert "not serving viewers" in caplog.text and message in caplog.text
    assert not [p for p in Path(os.path.realpath(d)).iterdir()]  # nothing was written into it
    one_line_exit_2(xray("ls"), message)
    one_line_exit_2(xray("attach", "--headless"), message)


@pytest.mark.parametrize("problem", ["open to others", "someone else's"])
def test_a_socket_that_is_not_ours_alone_is_refused_before_connecting(tmp_path, problem):
    path = tmp_path / "probe.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    if problem == "open to others":
        path.chmod(0o666)
        message = "has mode 666, open to other users: refused"
    else:
        needs_root()
        path.chmod(0o600)
        os.chown(path, OTHER_UID, OTHER_UID)
        message = f"belongs to uid {OTHER_UID}"
    try:
        one_line_exit_2(xray("attach", "--socket", str(path), "--headless"), message)
        srv.settimeout(0.2)
        with pytest.raises(socket.timeout):
            srv.accept()  # the viewer never even connected
    finally:
        srv.close()


def without_root_override(*args):
    """``args`` as a command run by root without the capabilities that bypass file modes
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): permissions bind it as they bind any user."""
    needs_root()
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv (util-linux) to drop root's file-mode override")
    cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *args]
    if subprocess.run(cmd[:3] + ["true"], capture_output=True).returncode != 0:
        pytest.skip("setpriv cannot drop capabilities here")
    return cmd


@pytest.mark.parametrize("where", ["in a directory not open to you", "with a mode that shuts you out"])
def test_a_socket_you_may_not_open_is_permission_denied_not_missing(tmp_path, where):
    """It exists: "no such socket" sent the user looking for a run that was there."""
    if where == "in a directory not open to you":
        d = tmp_path / "theirs"
        d.mkdir(mode=0o700)
        path = d / "probe.sock"
        message = "permission denied: a directory on its path is not open to you"
    else:
        path = tmp_path / "probe.sock"
        message = "permission denied: the socket exists, but its mode (0) lets you not connect to it"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    if where == "in a directory not open to you":
        os.chown(path.parent, OTHER_UID, OTHER_UID)  # another user's run directory
    else:
        path.chmod(0o000)
    try:
        cmd = without_root_override(sys.executable, "-m", "tui.cli", "attach", "--socket", str(path), "--headless")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        one_line_exit_2(out, message)
        assert "no such socket" not in out.stderr
    finally:
        srv.close()


def test_manifests_of_someone_else_are_neither_listed_nor_removed(run_dir):
    needs_root()
    fake = run_dir / "intruder-1-r0.json"
    fake.write_text(json.dumps({"run": "intruder", "pid": os.getpid(), "rank": 0, "world_size": 1, "started": 0,
                                "socket": str(run_dir / "intruder.sock")}))
    os.chown(fake, OTHER_UID, OTHER_UID)
    out = xray("ls", "--json")
    assert out.returncode == 0 and out.stdout == "" and fake.exists()


def test_a_stale_manifest_removes_only_its_own_socket_and_token(run_dir, tmp_path):
    """A dead run's manifest names its socket; `ls` removes that socket and its token only where they
    are a socket and a token file of ours directly inside the run directory. A file elsewhere, a regular
    file, a directory or a link it names (with their .token siblings) survives; each manifest goes."""
    from probes.protocol import rundir

    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "precious.sock"  # what a crafted manifest could name: anyone's file
    precious.write_text("keep")
    (outside / "precious.token").write_text("keep")
    inside_file = run_dir / "notes.sock"
    inside_file.write_text("keep")
    (run_dir / "adir.sock").mkdir()
    link = run_dir / "link.sock"
    link.symlink_to(precious)
    real = run_dir / "dead-999999-r0.sock"  # a socket the dead probe left: removed, with its token
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(real))
    s.close()
    real.with_suffix(".token").write_text("0" * 32)
    targets = {"outside": precious, "dotdot": run_dir / ".." / "outside" / "precious.sock", "file": inside_file,
               "dir": run_dir / "adir.sock", "link": link, "dead": real, "plain": outside / "precious.txt"}
    for name, target in targets.items():
        (run_dir / f"{name}-999999-r0.json").write_text(json.dumps(
            {"run": name, "pid": 999999, "rank": 0, "world_size": 1, "started": 0, "socket": str(target)}))
    (outside / "precious.txt").write_text("keep")
    out = xray("ls", "--json")
    assert out.returncode == 0 and out.stdout == ""
    assert precious.read_text() == "keep" and (outside / "precious.token").read_text() == "keep"
    assert (outside / "precious.txt").read_text() == "keep"
    assert inside_file.read_text() == "keep" and (run_dir / "adir.sock").is_dir() and link.is_symlink()
    assert not real.exists() and not real.with_suffix(".token").exists()
    assert not list(run_dir.glob("*.json"))  # every dead manifest is gone
    assert rundir.live_manifests() == []


def test_a_token_file_open_to_others_is_refused(tmp_path):
    tok = tmp_path / "run.token"
    tok.write_text("0" * 32)
    tok.chmod(0o644)
    with pytest.raises(feed.FeedError, match="mode 600: refused"):
        feed.read_token(str(tok))


# -- a second Unix user -------------------------------------------------------

OTHER_USER_PROBE = r"""
import json, os, socket, sys
run_dir, sock_path, token_path, tcp_host, tcp_port = sys.argv[1:6]
tcp_port = int(tcp_port)
res = {}
def attempt(name, fn):
    try:
        res[name] = "allowed: " + repr(fn())[:80]
    except OSError as exc:
        res[name] = "denied: " + type(exc).__name__
attempt("list", lambda: os.listdir(run_dir))
def attach():
    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sock_path); return s.recv(8)
attempt("attach", attach)
attempt("write", lambda: open(os.path.join(run_dir, "evil.json"), "w").write("{}"))
attempt("read token", lambda: open(token_path).read())
def tcp_guess():
    s = socket.create_connection((tcp_host, tcp_port), timeout=5)
    s.sendall(b"XRAYTOK1 " + b"0" * 32 + b"\n")
    data = s.recv(8)
    if not data:
        raise ConnectionResetError("closed without a byte")
    return data
attempt("tcp with a guessed token", tcp_guess)
print(json.dumps(res))
"""


@pytest.fixture
def other_user():
    """A throwaway Unix user, removed afterwards; skipped where one cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("creating a second Unix user needs root")
    if not shutil.which("useradd") or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs useradd and a system /usr/bin/python3 the second user can run")
    name = f"xrt{os.getpid() % 100000}"
    made = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def run_as(user, code: str, *args) -> subprocess.CompletedProcess:
    """Run stdlib-only Python as ``user`` (our own interpreter lives under /root, closed to others)."""
    def drop():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return subprocess.run(["/usr/bin/python3", "-I", "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=60, preexec_fn=drop, cwd="/", env={"PATH": "/usr/bin:/bin"})


def test_a_second_unix_user_can_neither_list_attach_to_nor_write_into_the_run(monkeypatch, other_user):
    parent = Path(tempfile.mkdtemp(prefix="xray-sec-"))
    parent.chmod(0o755)  # others may reach the run directory itself, and meet its 0700
    d = parent / "xray-tui"
    monkeypatch.setenv("XRAY_TUI_RUN_DIR", str(d))
    model, opt = small_model()
    try:
        with probes.attach(model, opt, every=1, name="mine", tcp=True) as xr:
            train(model, opt, 3)
            pub = xr.publisher
            host, port = pub.tcp_address.rsplit(":", 1)
            out = run_as(other_user, OTHER_USER_PROBE, d, pub.socket_path, pub.token_path, host, port)
            assert out.returncode == 0, out.stderr
            res = json.loads(out.stdout)
            assert res == {"list": "denied: PermissionError", "attach": "denied: PermissionError",
                           "write": "denied: PermissionError", "read token": "denied: PermissionError",
                           "tcp with a guessed token": "denied: ConnectionResetError"}, res

            # even if someone opens the directory and the socket to all, the probe checks who is calling
            d.chmod(0o755)
            pub.socket_path.chmod(0o666)
            out = run_as(other_user, OTHER_USER_PROBE, d, pub.socket_path, pub.token_path, host, port)
            assert json.loads(out.stdout)["attach"] == "allowed: b''"  # connected, closed before a byte
            assert not any(p.name == "evil.json" for p in d.iterdir())
            d.chmod(0o700)
            pub.socket_path.chmod(0o600)
            # the owner still gets in
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(pub.socket_path))
            assert s.recv(8) == wire.MAGIC
            s.close()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


# -- TCP ------------------------------------------------------------------------


def tcp_probe(name="tcprun"):
    model, opt = small_model()
    xr = probes.attach(model, opt, every=1, name=name, tcp=True)
    train(model, opt, 3)
    host, port = xr.publisher.tcp_address.rsplit(":", 1)
    return xr, (host, int(port))


def closed_without_a_byte(sock, timeout=10.0) -> float:
    """Seconds until the peer closes ``sock``; fails if it sends anything or never closes."""
    sock.settimeout(timeout)
    t0 = time.monotonic()
    assert sock.recv(1) == b""
    return time.monotonic() - t0


def test_tcp_with_the_token_streams_the_run():
    xr, addr = tcp_probe()
    try:
        src = feed.SocketSource([f"tcp:{addr[0]}:{addr[1]}"], token=xr.publisher.token)
        got = []
        for batch in src.batches():
            got += batch
            if sum(isinstance(m, wire.Step) for m in got) == 3:
                break
        assert isinstance(got[0], wire.Hello) and got[0].run == "tcprun"
    finally:
        xr.close()


@pytest.mark.parametrize("sent", [b"", b"XRAYTOK1 " + b"0" * 32 + b"\n", b"GET / HTTP/1.1\r\n\r\n", b"XRAYTOK1 00"])
def test_tcp_connections_that_fail_the_handshake_are_closed(sent):
    xr, addr = tcp_probe()
    try:
        conns = []
        for _ in range(3):
            s = socket.create_connection(addr)
            if sent:
                s.sendall(sent)
            conns.append(s)
        for s in conns:
            closed_without_a_byte(s)  # the handshake deadline is 1 s; 10 s only guards against a hang
            s.close()
        # the probe holds nothing for them
        deadline = time.monotonic() + 5
        while xr.publisher.viewers.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not xr.publisher.viewers.pending and not xr.publisher.viewers.connected
    finally:
        xr.close()


def test_the_token_is_never_logged_nor_sent(caplog):
    with caplog.at_level(logging.DEBUG, "xray-tui"):
        xr, addr = tcp_probe("quiet")
    token = xr.publisher.token
    try:
        s = socket.create_connection(addr)
        s.sendall(handshake(token))
        s.settimeout(5)
        data = s.recv(1 << 20)
        s.close()
    finally:
        xr.close()
    assert data.startswith(wire.MAGIC) and token.encode() not in data
    assert "TCP viewers on 127.0.0.1:" in caplog.text and token not in caplog.text


def test_cli_attach_over_tcp_with_the_runs_token_and_with_a_wrong_one(tmp_path):
    xr, addr = tcp_probe("overtcp")
    try:
        wrong = xray("attach", "--tcp", f"{addr[0]}:{addr[1]}", "--headless",
                     env={**os.environ, "XRAY_TUI_TOKEN": "f" * 32})
        one_line_exit_2(wrong, "closed before saying hello (wrong token?)")
        none = xray("attach", "--tcp", f"{addr[0]}:{addr[1]}", "--headless",
                    env={k: v for k, v in os.environ.items() if k != "XRAY_TUI_TOKEN"})
        one_line_exit_2(none, "needs the run's token")
        viewer = subprocess.Popen([sys.executable, "-m", "tui.cli", "attach", "overtcp", "--tcp", "--headless",
                                   "--log", str(tmp_path / "tcp.xray")], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not xr.publisher.viewers.connected and viewer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        train(xr.model, xr.optimizer, 2)
    finally:
        xr.close()
    assert viewer.wait(60) == 0, viewer.stderr.read()
    msgs, _ = wire.read_file(str(tmp_path / "tcp.xray"))
    assert [m.step for m in msgs if isinstance(m, wire.Step)] == list(range(5)) and isinstance(msgs[-1], wire.End)


# -- what a peer sends is data, never code or a path --------------------------


def test_no_code_path_evaluates_or_unpickles_what_it_receives():
    files = list((ROOT / "tui").rglob("*.py")) + [f for room in ("protocol", "publish", "rules")
                                                  for f in (ROOT / "probes" / room).rglob("*.py")]
    pattern = re.compile(r"\b(pickle|cPickle|marshal|shelve|dill|yaml)\b|\beval\(|\bexec\(|__import__\(|import_module\(")
    offenders = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files
                 for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_a_hostile_peer_cannot_make_the_viewer_touch_a_path(tmp_path):
    """Names with ../ and absolute paths in every string field land nowhere but on screen."""
    evil = "../../../../tmp/xray-pwned"
    hello = wire.Hello(version=wire.PROTOCOL_VERSION, run=evil, argv=[evil], layers=[wire.LayerInfo(evil, evil)])
    msgs = [hello, *synthetic.steps(1, 2), wire.Note(0, 0, evil, {evil: evil}),
            wire.Alert(1, 0, "critical", evil, evil, "act", 1.0, 1.0, evil), wire.End(2, 0, evil)]
    path = tmp_path / "hostile.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o600)
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        conn.sendall(wire.MAGIC + b"".join(wire.encode(m) for m in msgs))
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    before = set(os.listdir("/tmp"))
    out = xray("attach", "--socket", str(path), "--headless", "--log", str(tmp_path / "v.xray"), cwd=tmp_path)
    srv.close()
    assert out.returncode == 1, out.stderr  # an End reason we do not know is no success
    assert out.stdout.splitlines()[-1].startswith("run ended at step 2: ../../../../tmp/xray-pwned;")
    assert set(os.listdir(tmp_path)) == {"hostile.sock", "v.xray"}
    assert not {n for n in set(os.listdir("/tmp")) - before if "pwned" in n}
