"""What the whole-job view costs: bytes per collective and time added to a sampled step.

Spawns WORLD ranks on 127.0.0.1 (gloo), each training the demo GPT-2 under DDP
with the probe at every=1 (every step sampled, no socket), and times each step on
the training thread in interleaved blocks of three configurations:

- ``baseline``: no probe;
- ``probe``: the probe without the whole-job view (``job=False``; with several
  ranks it all-gathers the gradient norms on the training thread, as before);
- ``probe+job``: the probe with the whole-job view (probes/distributed/job.py).

It also reports the job thread's round (packing, the four collectives,
waiting for the other ranks): its wall time and the CPU time it takes, which
on a shared CPU competes with training; the training thread's own part of a
sampled step (handing the step to the job thread); and the bytes each
collective moves per rank. On a loaded machine the step-time ratios move by
more than the job costs: the CPU times are the steadier figures.

    python bench/collectives.py --world 2
    python bench/collectives.py --world 4
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/tui.py would hide tui

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIGS = ("baseline", "probe", "probe+job")


def timed(into: list, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    return wrapper


def rank_main(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), XRAY_TUI_QUIET="1")
    torch.set_num_threads(1)  # world ranks share this machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import probes
    from probes.demo import training as demo
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    data = demo.CharData(demo.corpus(), block=64, seed=rank)
    model = DDP(demo.build_model(len(data.chars), layers=args.layers, width=args.width, heads=4, block=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        x = data.batch(args.batch)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    times = {c: [] for c in CONFIGS}
    cpu_step = {c: [] for c in CONFIGS}  # the process's CPU seconds per step (all its threads: gloo's too)
    rounds, cpu, handoff, nbytes, slots = [], [], [], None, 0
    order = random.Random(0)  # the same shuffled order on every rank: attach is collective
    for _ in range(args.rounds):
        configs = list(CONFIGS)
        order.shuffle(configs)
        for cfg in configs:
            xr = None
            if cfg != "baseline":
                xr = probes.attach(model, opt, every=1, serve=False, spectral_every=None, job=cfg == "probe+job")
                if xr._job is not None:  # the training thread's hand-off of a sampled step, timed
                    xr._job.submit = timed(handoff, xr._job.submit)
            step()  # the first sampled step of a block warms its buffers
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                times[cfg].append(time.perf_counter() - t0)
            if xr is not None and xr._job is not None:
                xr._job.close()  # its last rounds, so their CPU counts in this block
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu_step[cfg].append((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / args.steps)
            if xr is not None:
                if xr._job is not None:
                    rounds += list(xr._job.round_times)
                    cpu += list(xr._job.round_cpu)
                    nbytes, slots = xr._job.bytes, len(xr._job.keys)
                xr.close()
            dist.barrier()
    if rank == 0:
        out.put((times, cpu_step, rounds, cpu, handoff, nbytes, slots))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(rank_main, args=(args.world, port, args, out), nprocs=args.world, start_method="spawn")
    times, cpu_step, rounds, cpu, handoff, nbytes, slots = out.get()
    base = statistics.median(times["baseline"])
    probe = statistics.median(times["probe"])
    print(f"world {args.world} (gloo, 127.0.0.1), torch {torch.__version__}, demo GPT-2 {args.layers}x{args.width} "
          f"under DDP, every=1, {args.rounds} rounds x {args.steps} steps per configuration\n")
    print("| configuration | median step (ms) | vs baseline | vs probe | CPU ms per step, rank 0 (median block) |\n"
          "|---|---:|---:|---:|---:|")
    for cfg in CONFIGS:
        m = statistics.median(times[cfg])
        print(f"| {cfg} | {m * 1e3:.1f} | {m / base:.3f} | {m / probe:.3f} | "
              f"{statistics.median(cpu_step[cfg]) * 1e3:.1f} |")
    gather, total, hist, mx = nbytes
    print(f"\nslots {slots}; bytes per rank per sampled step: all_gather {gather:,}, all_reduce SUM "
          f"(statistics, float64) {total:,}, all_reduce SUM (histograms, int32) {hist:,}, all_reduce MAX {mx:,}")
    if rounds:
        q = statistics.quantiles(rounds, n=10)
        print(f"job thread, one round (pack + 4 collectives + waits): wall median {statistics.median(rounds) * 1e3:.2f} ms, "
              f"p90 {q[-1] * 1e3:.2f} ms; CPU median {statistics.median(cpu) * 1e3:.2f} ms; over {len(rounds)} rounds "
              f"(rank 0)")
    if handoff:
        print(f"training thread, hand-off of a sampled step to the job thread: median "
              f"{statistics.median(handoff) * 1e6:.0f} us (rank 0)")


if __name__ == "__main__":
    main()
