"""Reliability figures: training speed under viewer faults, and a long soak.

``faults``: the demo model trains in this process with the probe at
every=1 (the heaviest stream). Blocks of steps are timed under five
conditions, interleaved in a shuffled order per round: no viewer; a real
`xray-tui attach --headless` viewer SIGKILLed in the middle of the block; a
real viewer SIGSTOPped for the whole block; a viewer that reads one byte a
second; ten viewers attaching and detaching in a loop. Medians and ratios
to "no viewer" are printed, with the probe's drop counters.

``soak``: a tiny model trains for 100,000 steps (every=10) with a recording,
a viewer that keeps the app's ring buffers (tui.state.RunState) and a viewer
SIGSTOPped for the whole run; the resident memory of the trainer and of the
viewer and the recording's size are printed every 10,000 steps.

    python bench/soak.py faults [--rounds 5] [--block 20]
    python bench/soak.py soak [--steps 100000] [--every 10] [--viewer-buffer MIB]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

# run as a script, bench/ would come first on sys.path, where a bench/tui.py would hide the tui package
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: a raw-socket viewer in plain Python: MODE "slow" reads 1 byte/s; "loop" runs 10 threads that
#: connect, read a random amount and hang up, over and over.
HELPER = r"""
import socket, sys, threading, time, random
path, mode = sys.argv[1], sys.argv[2]
if mode == "slow":
    s = socket.socket(socket.AF_UNIX); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096); s.connect(path)
    while s.recv(1): time.sleep(1.0)
else:
    def churn(i):
        rng = random.Random(i)
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path); s.recv(rng.randint(1, 200_000))
            except OSError:
                pass
            s.close()
    for i in range(10): threading.Thread(target=churn, args=(i,), daemon=True).start()
    while True: time.sleep(1)
"""

#: a viewer that keeps what the app keeps (RunState ring buffers) and reports its memory.
STATE_VIEWER = r"""
import sys, time
from tui import feed
from tui.state import RunState
state, last = RunState(), 0.0
for batch in feed.SocketSource.for_run(sys.argv[1]).batches():
    for m in batch:
        state.ingest(m)
    if time.monotonic() - last > 2:
        last = time.monotonic()
        rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
        print(state.step, rss, flush=True)
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
print(state.step, rss, flush=True)
"""


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size in KiB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def wait_attached(pub, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(pub.viewers.connected) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def faults(args) -> None:
    import torch

    import probes
    from probes.demo import training as demo

    torch.manual_seed(0)
    data = demo.CharData(demo.corpus())
    model = demo.build_model(len(data.chars))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    xr = probes.attach(model, opt, every=1, name="bench-faults")
    pub, path = xr.publisher, str(xr.publisher.socket_path)

    def steps(n):
        for _ in range(n):
            x = data.batch(16)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def viewer():
        return subprocess.Popen([sys.executable, "-m", "tui.cli", "attach", xr.run, "--headless"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def helper(mode):
        return subprocess.Popen([sys.executable, "-c", HELPER, path, mode])

    def timed(n):
        t0 = time.perf_counter()
        steps(n)
        return (time.perf_counter() - t0) / n

    def run(phase) -> float:
        procs = []
        try:
            if phase == "no viewer":
                return timed(args.block)
            if phase == "viewer SIGKILLed mid-block":
                procs.append(viewer())
                wait_attached(pub, 1)
                t0 = time.perf_counter()
                steps(args.block // 2)
                procs[0].kill()
                steps(args.block - args.block // 2)
                return (time.perf_counter() - t0) / args.block
            if phase == "viewer SIGSTOPped":
                procs.append(viewer())
                wait_attached(pub, 1)
                procs[0].send_signal(signal.SIGSTOP)
                return timed(args.block)
            if phase == "viewer reading 1 byte/s":
                procs.append(helper("slow"))
                wait_attached(pub, 1)
                return timed(args.block)
            procs.append(helper("loop"))
            time.sleep(1.0)
            return timed(args.block)
        finally:
            for p in procs:
                p.kill()
                p.wait()
            deadline = time.monotonic() + 10
            while pub.viewers.connected and time.monotonic() < deadline:
                time.sleep(0.05)

    phases = ["no viewer", "viewer SIGKILLed mid-block", "viewer SIGSTOPped", "viewer reading 1 byte/s",
              "10 viewers attaching/detaching in a loop"]
    steps(10)  # warm-up
    results = {p: [] for p in phases}
    rng = random.Random(0)
    for r in range(args.rounds):
        order = phases[:]
        rng.shuffle(order)
        for phase in order:
            results[phase].append(run(phase))
        print(f"round {r + 1}/{args.rounds} done; trainer RSS {rss_kib() / 1024:.0f} MiB", flush=True)
    xr.close()
    base = statistics.median(results["no viewer"])
    print(f"\nblocks of {args.block} steps, {args.rounds} rounds, probe every=1\n")
    print("| condition | median step (ms) | ratio to no viewer |\n|---|---:|---:|")
    for phase, ts in results.items():
        m = statistics.median(ts)
        print(f"| {phase} | {m * 1e3:.1f} | {m / base:.3f} |")
    print(f"\nprobe queue drops: {pub.dropped}; frames dropped for slow viewers: {pub.viewer_drops}")


def soak(args) -> None:
    import torch
    from torch import nn

    import probes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    log = os.path.join(tempfile.mkdtemp(prefix="xray-soak-"), "soak.xray")
    xr = probes.attach(model, opt, every=args.every, name="soak", log=log)
    if args.viewer_buffer:
        xr.publisher.viewers.buffer = args.viewer_buffer << 20  # a bench-only knob: reach the cap sooner
    x, y = torch.randn(64, 32), torch.randn(64, 1)

    def step():
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(20):
        step()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    state_viewer = subprocess.Popen([sys.executable, "-c", STATE_VIEWER, xr.run], stdout=subprocess.PIPE,
                                    text=True, env=env)
    stopped = subprocess.Popen([sys.executable, "-m", "tui.cli", "attach", xr.run, "--headless"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_attached(xr.publisher, 2)
    stopped.send_signal(signal.SIGSTOP)
    print("| step | trainer RSS (MiB) | state viewer RSS (MiB) | recording (MiB) | buffered for stopped viewer (MiB) |")
    print("|---:|---:|---:|---:|---:|")
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        step()
        if i % (args.steps // 10) == 0:
            viewers = list(xr.publisher.viewers.connected.values())
            held = max((v.bytes for v in viewers), default=0)
            print(f"| {i} | {rss_kib() / 1024:.1f} | {rss_kib(state_viewer.pid) / 1024:.1f} | "
                  f"{os.path.getsize(log) / 2**20:.1f} | {held / 2**20:.1f} |", flush=True)
    wall = time.perf_counter() - t0
    xr.close()
    stopped.kill()
    stopped.wait()
    out, _ = state_viewer.communicate(timeout=120)
    last = out.split()[-2:]
    print(f"\n{args.steps} steps in {wall:.0f} s; state viewer saw step {last[0]}, final RSS {int(last[1]) / 1024:.1f} MiB;"
          f" recording {os.path.getsize(log) / 2**20:.1f} MiB = {os.path.getsize(log) / (args.steps // args.every):.0f}"
          f" bytes per sampled step; probe queue drops {xr.publisher.dropped}; frames dropped for the stopped viewer"
          f" {xr.publisher.viewer_drops}")
    os.unlink(log)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    f = sub.add_parser("faults")
    f.add_argument("--rounds", type=int, default=5)
    f.add_argument("--block", type=int, default=20)
    s = sub.add_parser("soak")
    s.add_argument("--steps", type=int, default=100_000)
    s.add_argument("--every", type=int, default=10)
    s.add_argument("--viewer-buffer", type=int, default=0, metavar="MIB",
                   help="per-viewer buffer cap in MiB (default: the probe's, 64)")
    args = p.parse_args()
    faults(args) if args.mode == "faults" else soak(args)


if __name__ == "__main__":
    main()
