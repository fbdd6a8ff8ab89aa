"""Two simulated nodes of two ranks each (gloo on 127.0.0.1): the whole job seen from node 0.

Each node is its own ``torchrun --nnodes 2 --node_rank N`` launch with its own run directory
(``XRAY_TUI_RUN_DIR``, and ``XDG_RUNTIME_DIR``), so node 0's directory holds ranks 0 and 1 only.
Everything asserted is read from node 0: its ``ls``, and its ranks' recordings (what a viewer
attached on node 0 receives). The ground truth is what every rank saved of its own tensors.
"""

import io
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import json
import numpy as np
import pytest
import torch

from probes.protocol import histogram, wire

SCRIPT = str(Path(__file__).parent / "multinode_script.py")
STEPS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, steps, *extra):
    """Start both nodes; returns (procs, run dirs). Each node has its own private run directory."""
    port = free_port()
    procs, dirs = [], []
    for node in (0, 1):
        run = tmp_path / f"node{node}" / "run"
        xdg = tmp_path / f"node{node}" / "xdg"
        for d in (run, xdg):
            d.mkdir(parents=True, mode=0o700)
        env = dict(os.environ, XRAY_TUI_RUN_DIR=str(run), XDG_RUNTIME_DIR=str(xdg), XRAY_TUI_QUIET="1",
                   OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               SCRIPT, str(tmp_path), str(steps), *extra]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
        dirs.append(run)
    return procs, dirs


def stop(procs):
    """End the launches we started (their own process groups), whatever state they are in."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(10)


def ls(run_dir, *args) -> str:
    """``xray-tui ls`` as a person on that node runs it."""
    from tui import cli

    old = os.environ.get("XRAY_TUI_RUN_DIR")
    os.environ["XRAY_TUI_RUN_DIR"] = str(run_dir)
    try:
        out = io.StringIO()
        with redirect_stdout(out):
            cli.main(["ls", *args])
    finally:
        os.environ["XRAY_TUI_RUN_DIR"] = old or ""
    return out.getvalue()


def ls_json(run_dir) -> list[dict]:
    return [json.loads(line) for line in ls(run_dir, "--json").splitlines() if line.strip()]


def read(path):
    try:
        return wire.read_file(str(path))[0]
    except wire.WireError:
        return []


def job_steps(msgs):
    return [m for m in msgs if isinstance(m, wire.Step) and m.rank == wire.JOB_RANK]


def check_hist(s, values: np.ndarray):
    want = np.bincount(histogram.bin_index(values.astype(np.float32)), minlength=histogram.NUM_BINS + 1)
    got = np.zeros(histogram.NUM_BINS + 1, dtype=np.int64)
    got[s.hist_lo: s.hist_lo + len(s.hist)] = s.hist
    assert s.hist_n == values.size and (got == want).all()


def test_two_nodes_whole_job_on_rank_0(tmp_path):
    flag = tmp_path / "listed"
    procs, dirs = launch(tmp_path, STEPS, "--ddp", "--max-rank", "3", "--diverge-rank", "3", "--diverge-at", "5",
                         "--slow-rank", "2", "--slow-at", "2", "--wait-file", str(flag), "--timeout", "20")
    try:
        deadline = time.monotonic() + 90
        runs = []
        while time.monotonic() < deadline and not (runs and runs[0]["ranks"] == [0, 1]):
            runs = ls_json(dirs[0])
            time.sleep(0.2)
        table = ls(dirs[0])
        flag.touch()
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        flag.touch()
        stop(procs)
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-4000:] for o in outs)
    # from node 0: the run, its 2 local ranks of a job of 4 on 2 nodes
    (run,) = runs
    assert (run["name"], run["ranks"], run["world_size"], run["nodes"]) == ("multi", [0, 1], 4, 2)
    head, line = table.splitlines()[:2]
    assert head.split()[:4] == ["NAME", "PID", "RANKS", "NODES"] and line.split()[2:4] == ["2/4", "2"]

    r0 = read(tmp_path / "rank0.xray")
    truth = [torch.load(tmp_path / f"truth{r}.pt") for r in range(4)]
    assert r0[0].world_size == 4 and len(set(r0[0].hosts)) == 2
    jobs = job_steps(r0)
    assert [s.step for s in jobs] == list(range(STEPS))
    for st in jobs:
        got = {(s.layer, s.kind): s for s in st.samples}
        want = [t[st.step] for t in truth]
        for name in ("0.weight", "0.bias", "2.weight"):
            for kind in ("weight", "grad"):
                vals = np.concatenate([w[kind][name].double().numpy().reshape(-1) for w in want])
                s = got[(name, kind)]
                # DDP's weights are replicated: the whole job counts each once per rank
                assert s.count == vals.size == 4 * want[0][kind][name].numel()
                assert s.sum == pytest.approx(vals.sum(), rel=1e-6, abs=1e-9)
                assert s.sumsq == pytest.approx(np.square(vals).sum(), rel=1e-6)
                assert (s.min, s.max) == (pytest.approx(vals.min()), pytest.approx(vals.max()))
                check_hist(s, vals)
        acts = [w["act"].double().numpy().reshape(-1) for w in want]
        a = got[("0", "act")]
        assert a.count == sum(x.size for x in acts)
        assert (a.min, a.max) == (pytest.approx(min(x.min() for x in acts)), pytest.approx(max(x.max() for x in acts)))
        if st.step == 0:  # the largest |activation| is only on rank 3 (node 1), and the whole job's sample has it
            top = max(abs(a.min), abs(a.max))
            assert top == pytest.approx(np.abs(acts[3]).max()) and top > 10 * max(np.abs(x).max() for x in acts[:3])
        check_hist(a, np.concatenate(acts))
        assert len(st.ranks.step_time) == 4 and len(st.ranks.grad_norm) == 4
    alerts = [m for m in r0 if isinstance(m, wire.Alert) and m.severity != "info"]
    # rank 3's gradients (node 1) leave the others' from step 5: rank 0's probe names it
    div = [a for a in alerts if a.rule == "rank-divergence"]
    assert div and {a.rank for a in div} == {3} and 5 <= div[0].step <= 7
    # rank 2 (node 1) sleeps before each forward from step 2: named with its host
    slow = [a for a in alerts if a.rule == "straggler"]
    assert slow and {a.rank for a in slow} == {2}, [a.message for a in slow]
    assert r0[0].hosts[2] in slow[0].message and 4 <= slow[0].step <= 6


def test_a_killed_rank_is_named_and_nothing_hangs(tmp_path):
    steps = 40
    procs, dirs = launch(tmp_path, steps, "--kill-rank", "3", "--kill-at", "6", "--timeout", "3", "--no-serve-local")
    t0 = time.monotonic()
    serving = set()
    try:
        done = []
        while time.monotonic() - t0 < 90:
            serving |= {r for run in ls_json(dirs[0]) for r in run["ranks"]}
            done = [read(tmp_path / f"rank{r}.xray") for r in (0, 1)]
            if all(m and isinstance(m[-1], wire.End) for m in done):
                break
            time.sleep(0.2)
    finally:
        stop(procs)  # node 0's torchrun would wait for node 1 at its exit barrier
    r0, r1 = done
    assert serving == {0}  # serve_local=False: rank 1 records but opens no socket
    for msgs in (r0, r1):  # node 0's ranks trained to the end and closed normally
        assert isinstance(msgs[-1], wire.End) and msgs[-1].reason == "finished"
        assert max(m.step for m in msgs if isinstance(m, wire.Step) and m.rank >= 0) == steps - 1
    missing = [m for m in r0 if isinstance(m, wire.Alert) and m.rule == "rank-missing"]
    assert 3 in {a.rank for a in missing}, [a.message for a in missing]
    assert any(isinstance(m, wire.Note) and m.event == "job-off" for m in r0)
    # the job's samples: the steps merged with rank 3, then none
    merged = [s.step for s in job_steps(r0)]
    assert merged == list(range(len(merged))) and 5 <= len(merged) <= 7


def test_a_hung_rank_is_named_and_holds_nobody_up(tmp_path):
    """One node of two ranks: rank 1 hangs 5 s at step 3; rank 0 trains on (no DDP here), its
    probe's round times out after 1.5 s and names rank 1, and both close normally."""
    env = dict(os.environ, XRAY_TUI_QUIET="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          SCRIPT, str(tmp_path), "20", "--hang-rank", "1", "--hang-at", "3", "--hang-s", "5",
                          "--timeout", "1.5"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    r0, r1 = (read(tmp_path / f"rank{r}.xray") for r in (0, 1))
    missing = [m for m in r0 if isinstance(m, wire.Alert) and m.rule == "rank-missing"]
    assert [a.rank for a in missing] == [1] and "hung past 1.5 s" in missing[0].message
    own = [m for m in r0 if isinstance(m, wire.Step) and m.rank == 0]
    assert len(own) == 20 and own[-1].time - own[0].time < 4  # rank 0 never waited for the hung rank
    assert isinstance(r0[-1], wire.End) and r0[-1].reason == "finished"
    assert isinstance(r1[-1], wire.End) and r1[-1].reason == "finished"
    assert len([m for m in r1 if isinstance(m, wire.Step) and m.rank == 1]) == 20  # its own stream went on


def test_a_healthy_job_raises_no_alert(tmp_path):
    """False alarms count as much as detections: four healthy DDP ranks on two nodes, sharing this
    machine's cores (so their step times jitter), give rank 0 no warning from any rule."""
    steps = 40
    procs, dirs = launch(tmp_path, steps, "--ddp", "--timeout", "20")
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        stop(procs)
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-4000:] for o in outs)
    r0 = read(tmp_path / "rank0.xray")
    assert [s.step for s in job_steps(r0)] == list(range(steps))
    alerts = [f"{a.rule} r{a.rank} {a.layer}: {a.message}" for a in r0
              if isinstance(a, wire.Alert) and a.severity != "info"]
    assert alerts == []
