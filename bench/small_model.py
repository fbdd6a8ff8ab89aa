"""The whole probe's cost on a small model, where fixed costs show: nanoGPT's shape, every=10.

A GPT-2 of nanoGPT's small shape (4 layers x 64, 4 heads, 64-token windows,
batch 8; built from a config, char-level on the bundled text), AdamW, one
thread. Runs without the probe and with it (every=10, the every-step tier
on, recording to a file as a long run would) alternate, ``--rounds`` times
each, ``--iters`` iterations a run; each iteration is timed as nanoGPT times
its own (forward, backward, step, zero_grad). Prints the medians of the
unsampled and the sampled iterations against the baseline's, the whole
run's time against the baseline's, and the publisher thread's CPU time per
iteration (its Python holds the GIL the training thread needs: on a model
this small, most of it is training time lost):

    python bench/small_model.py [--rounds 5 --iters 600] [--no-signals]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import probes
from probes.demo import training as demo
from probes.publish import publisher

_publisher_cpu = [0.0]  # seconds of CPU the publisher thread spent building, judging and recording


def _timed_drain(drain):
    def timed(self):
        t = time.thread_time()
        try:
            drain(self)
        finally:
            _publisher_cpu[0] += time.thread_time() - t

    return timed


publisher.Publisher._drain = _timed_drain(publisher.Publisher._drain)


def run(probe: bool, iters: int, signals: bool, every: int) -> tuple[list[float], list[bool]]:
    """Per-iteration seconds, and whether each was sampled."""
    torch.manual_seed(0)
    data = demo.CharData(demo.corpus(), block=64, seed=0)
    model = demo.build_model(len(data.chars), layers=4, width=64, heads=4, block=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    xr = None
    log = tempfile.mktemp(suffix=".xray")
    if probe:
        extra = {} if signals else {"signals": False}  # (unnamed: the bench runs on older checkouts too)
        xr = probes.attach(model, opt, every=every, serve=False, log=log, spectral_every=None, name="small-model",
                           **extra)
    times, sampled = [], []
    try:
        for i in range(iters):
            t0 = time.perf_counter()
            x = data.batch(8)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            sampled.append(probe and i % every == 0)
    finally:
        if xr is not None:
            xr.close()
            os.remove(xr.publisher.recorder.path if xr.publisher.recorder else log)
    return times[20:], sampled[20:]  # warm-up (the C kernel's build, allocator growth) left out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--no-signals", action="store_true", help="the probe without the every-step tier")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base, unsampled, sampled, ratio, cpu = [], [], [], [], []
    for _ in range(args.rounds):
        b, _ = run(False, args.iters, True, args.every)
        _publisher_cpu[0] = 0.0
        p, s = run(True, args.iters, not args.no_signals, args.every)
        cpu.append(_publisher_cpu[0] / args.iters)
        base += b
        unsampled += [t for t, hit in zip(p, s) if not hit]
        sampled += [t for t, hit in zip(p, s) if hit]
        ratio.append(sum(p) / sum(b))
    mb = statistics.median(base)
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} x {args.iters} iterations each, every={args.every}, "
          f"tier {'off' if args.no_signals else 'on'}")
    print("| iterations | median (ms) | beyond the baseline |\n|---|---:|---:|")
    print(f"| baseline (no probe) | {mb * 1e3:.2f} | |")
    mu, ms = statistics.median(unsampled), statistics.median(sampled)
    print(f"| unsampled, probe | {mu * 1e3:.2f} | {(mu - mb) * 1e3:+.2f} ms ({mu / mb - 1:+.1%}) |")
    print(f"| sampled, probe | {ms * 1e3:.2f} | {(ms - mb) * 1e3:+.2f} ms |")
    print(f"| **whole run, probe / baseline** (median of {args.rounds} pairs) | | "
          f"**{statistics.median(ratio) - 1:+.1%}** (pairs: {', '.join(f'{r - 1:+.1%}' for r in ratio)}) |")
    print(f"| publisher thread CPU per iteration (median of {args.rounds}) | {statistics.median(cpu) * 1e6:.0f} us | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
