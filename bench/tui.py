"""Viewer benchmarks: ingest rate, frame time, CPU share, first paint, memory.

Usage: ``python bench/tui.py [--quick]``. Prints a Markdown table of medians
for docs/benchmarks.md. Every feed is synthetic (:mod:`tui.synthetic`) and
goes through the real code: msgpack frames, :class:`probes.protocol.wire.FrameReader`,
:class:`tui.state.RunState`, the Textual app (headless), and for the live
figures :class:`tui.feed.SocketSource` reading a Unix socket that a child
process feeds with the frames a probe sends.

Targets (issue 5): 2,000 layers x 3 kinds at 5 samples/s per stream under
30% of one core; a frame built in < 50 ms; decode + ingest >= 50,000
samples/s; first paint of a 256 x 300-stream backlog < 1 s; memory bounded
over 1 million samples.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc

import msgspec

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from probes.protocol import wire  # noqa: E402
from tui import synthetic  # noqa: E402
from tui.state import RunState  # noqa: E402

KINDS3 = ("weight", "grad", "act")


def base_step(n_layers: int, elements: int = 4096, seed: int = 0) -> wire.Step:
    """One step of ``n_layers`` x 3 kinds with realistic histograms (~200 bins)."""
    (step,) = synthetic.steps(n_layers, 1, elements=elements, seed=seed)
    return msgspec.structs.replace(step, samples=[s for s in step.samples if s.kind in KINDS3])


def frames(n_layers: int, n_steps: int, t0: float = 1_700_000_000.0) -> bytes:
    """A stream (magic, hello, steps) as bytes; steps reuse two sample sets."""
    a, b = base_step(n_layers, seed=1), base_step(n_layers, seed=2)
    out = [wire.MAGIC, wire.encode(synthetic.hello(n_layers, run="bench"))]
    for i in range(n_steps):
        src = a if i % 2 else b
        out.append(wire.encode(msgspec.structs.replace(src, step=i, time=t0 + i * 0.2)))
    return b"".join(out)


# -- 1. decode + ingest ------------------------------------------------------

def bench_ingest(n_layers: int, n_steps: int, rounds: int) -> dict:
    data = frames(n_layers, n_steps)
    samples = n_layers * 3 * n_steps
    dec, both = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        msgs = wire.FrameReader().feed(data)
        dec.append(time.perf_counter() - t)
        state = RunState()
        t = time.perf_counter()
        msgs = wire.FrameReader().feed(data)
        for m in msgs:
            state.ingest(m)
        both.append(time.perf_counter() - t)
    return {"decode_per_s": samples / statistics.median(dec), "ingest_per_s": samples / statistics.median(both),
            "bytes_per_sample": len(data) / samples}


# -- 2. frame time -------------------------------------------------------------

async def _frame_times(n_layers: int, size, rounds: int) -> dict:
    from tui.app import XRayApp
    from tui.feed import ListSource

    msgs = wire.FrameReader().feed(frames(n_layers, 4))
    app = XRayApp(ListSource([msgs]))
    async with app.run_test(size=size) as pilot:
        for _ in range(500):
            await pilot.pause(0.01)
            if app.state.step >= 3:
                break
        table = app.table
        paint, lines, scroll = [], [], []
        for _ in range(rounds):
            t = time.perf_counter()
            app._paint()  # new data version: every visible row is rebuilt
            for y in range(table.size.height):
                table.render_line(y)
            lines.append(time.perf_counter() - t)
            t = time.perf_counter()
            table.action_page(1)  # a page of rows never drawn before
            for y in range(table.size.height):
                table.render_line(y)
            scroll.append(time.perf_counter() - t)
            await pilot.pause()
        # A full frame of the screen as Textual composes it (every widget).
        for _ in range(rounds):
            app._paint()
            t = time.perf_counter()
            app.screen._compositor.render_update(full=True)
            paint.append(time.perf_counter() - t)
    return {"table_ms": 1e3 * statistics.median(lines), "scroll_ms": 1e3 * statistics.median(scroll),
            "compose_ms": 1e3 * statistics.median(paint)}


# -- 3 & 4. live: CPU share and first paint, over a real socket ----------------

def _serve(n_layers: int, backlog_steps: int, hz: float, seconds: float, ready, run_dir: str) -> None:
    """A stand-in probe: a Unix socket in the run directory that sends the frames a
    probe would (hello, a backlog, then steps at ``hz``). The real Publisher also
    runs the rules on its side; that cost is the probe's and is left out here so
    the figures are the viewer's alone."""
    import socket

    from probes.protocol import rundir

    os.environ["XRAY_TUI_RUN_DIR"] = run_dir
    d = rundir.ensure_run_dir()
    path = str(d / f"bench-{os.getpid()}-r0.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o600)
    srv.listen(4)
    hello = msgspec.structs.replace(synthetic.hello(n_layers, run="bench"), pid=os.getpid(), started=time.time())
    rundir.Manifest(run="bench", pid=os.getpid(), rank=0, world_size=1, started=hello.started, argv=[],
                    socket=path, protocol=wire.PROTOCOL_VERSION).write(d / f"bench-{os.getpid()}-r0.json")
    a, b = base_step(n_layers, seed=1), base_step(n_layers, seed=2)

    def frame(i: int) -> bytes:
        return wire.encode(msgspec.structs.replace(a if i % 2 else b, step=i, time=1_700_000_000.0 + i / 5))

    backlog = b"".join(frame(i) for i in range(backlog_steps))
    ready.set()
    conn, _ = srv.accept()
    conn.sendall(wire.MAGIC + wire.encode(hello) + backlog)
    step, nxt = backlog_steps, time.monotonic()
    deadline = nxt + seconds
    while time.monotonic() < deadline:
        if hz > 0:
            conn.sendall(frame(step))
            step += 1
            nxt += 1 / hz
        else:
            nxt += 0.5
        time.sleep(max(0.0, nxt - time.monotonic()))
    conn.close()


def _child(n_layers, backlog, hz, seconds, run_dir):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_serve, args=(n_layers, backlog, hz, seconds, ready, run_dir), daemon=True)
    proc.start()
    if not ready.wait(120):
        raise RuntimeError("publisher did not start")
    return proc


async def _cpu_share(n_layers: int, hz: float, seconds: float, size) -> dict:
    from tui.app import XRayApp
    from tui.feed import SocketSource

    proc = _child(n_layers, 0, hz, seconds + 15, os.environ["XRAY_TUI_RUN_DIR"])
    try:
        app = XRayApp(SocketSource.for_run("bench"))
        async with app.run_test(size=size) as pilot:
            for _ in range(1000):
                await pilot.pause(0.01)
                if app.state.step >= 2:
                    break
            s0, c0 = app.state.samples_seen, time.process_time()
            w0 = time.perf_counter()
            await pilot.pause(seconds)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            got = app.state.samples_seen - s0
    finally:
        proc.terminate()
        proc.join(10)
    return {"cpu_share": cpu / wall, "samples_per_s": got / wall}


async def _first_paint(n_layers: int, backlog: int) -> dict:
    from tui.app import XRayApp
    from tui.feed import SocketSource

    proc = _child(n_layers, backlog, 0.0, 30, os.environ["XRAY_TUI_RUN_DIR"])
    try:
        t0 = time.perf_counter()
        app = XRayApp(SocketSource.for_run("bench"))
        async with app.run_test(size=(160, 50)) as pilot:
            while app.state.step < backlog - 1:
                await pilot.pause(0.005)
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError("backlog never arrived")
            version = app.table._version
            while app.table._version == version:  # the paint that shows the whole backlog
                await pilot.pause(0.005)
            elapsed = time.perf_counter() - t0
            kept = len(app.state.series("model.layers.0.fc.weight", "weight"))
    finally:
        proc.terminate()
        proc.join(10)
    return {"first_paint_s": elapsed, "kept": kept}


# -- 5. memory -------------------------------------------------------------------

def bench_memory(n_layers: int, total: int) -> list[tuple[int, float, int]]:
    """(samples ingested, MiB held by the state, ring depth) at checkpoints."""
    a, b = base_step(n_layers, seed=1), base_step(n_layers, seed=2)
    per = len(a.samples)
    state = RunState()
    state.ingest(synthetic.hello(n_layers, run="bench"))
    marks = sorted({total // 8, total // 4, total // 2, total})
    out, seen, step = [], 0, 0
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    while seen < total:
        # Decode each step from bytes, as the viewer does: fresh objects every time.
        frame = wire.encode(msgspec.structs.replace(a if step % 2 else b, step=step))
        state.ingest(wire.decode(frame[4:]))
        seen += per
        step += 1
        if marks and seen >= marks[0]:
            marks.pop(0)
            out.append((seen, (tracemalloc.get_traced_memory()[0] - base) / 2**20, state.stream_depth))
    tracemalloc.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and seconds (a smoke run)")
    args = p.parse_args()
    rounds = 3 if args.quick else 7
    os.environ["XRAY_TUI_RUN_DIR"] = tempfile.mkdtemp(prefix="xray-bench-")
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
          f"{platform.platform()}")

    ing = bench_ingest(2000, 10 if args.quick else 20, rounds)
    print(f"decode: {ing['decode_per_s']:,.0f} samples/s; decode+ingest: {ing['ingest_per_s']:,.0f} samples/s; "
          f"{ing['bytes_per_sample']:.0f} wire bytes/sample")
    for size in ((160, 50), (80, 24)):
        ft = asyncio.run(_frame_times(2000, size, rounds))
        print(f"frame {size[0]}x{size[1]}, 2000 layers: table rows {ft['table_ms']:.1f} ms, "
              f"scroll a page {ft['scroll_ms']:.1f} ms, compose screen {ft['compose_ms']:.1f} ms")
    secs = 8 if args.quick else 20
    cpu = asyncio.run(_cpu_share(2000, 5.0, secs, (160, 50)))
    print(f"live 2000 layers x 3 kinds at 5 steps/s ({secs}s): app CPU {100 * cpu['cpu_share']:.1f}% of one core, "
          f"ingested {cpu['samples_per_s']:,.0f} samples/s")
    # the probe's backlog holds 512 sampled steps (probes.publish.publisher backlog_steps): all of it arrives at once
    fps = [asyncio.run(_first_paint(100, 512)) for _ in range(1 if args.quick else 3)]
    runs = ", ".join(f"{f['first_paint_s']:.2f}" for f in fps)
    med = statistics.median(f["first_paint_s"] for f in fps)
    print(f"first paint, backlog 512 steps x 300 streams: median {med:.2f} s "
          f"(runs: {runs}; {fps[0]['kept']} samples kept per stream)")
    mem = bench_memory(2000, 250_000 if args.quick else 2_000_000)
    for seen, mib, depth in mem:
        print(f"memory after {seen:>9,} samples: {mib:7.1f} MiB (ring depth {depth})")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
