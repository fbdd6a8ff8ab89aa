"""Where a sampled step's time goes: the probe's parts, timed in a real training loop.

Trains the demo GPT-2 with the probe at every=1 (no socket) and wraps the
probe's methods with timers, on the training thread (hooks, reductions, the
host copy) and on the publisher thread (build, rules, encode). Run it twice
to compare the CPU kernel with torch's ops:

    python bench/sampled_step.py
    XRAY_TUI_CPU_KERNEL=0 python bench/sampled_step.py
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

# run as a script, bench/ comes first on sys.path, where bench/tui.py would hide the tui package
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import probes
from probes.engines import cpu_kernel
from probes.demo import training as demo
from probes.capture import handoff
from probes.protocol import wire

PARTS = {  # the probe's collaborator (_hooks, _acts, _reads) and its method -> what it does, on the training thread
    "_acts.hold": "hooks: hold each activation",
    "_acts.reduce": "activations' rows, histograms and dead units",
    "_reads.read_params": "weights' and gradients' rows and histograms",
    "_reads.read_updates": "update subsets copied after the step, their deltas held",
    "_hooks._flush": "updates' rows, the host copy, hand-off to the publisher",
}


def timed(totals: dict, label: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - t0

    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    data = demo.CharData(demo.corpus(), block=64, seed=0)
    model = demo.build_model(len(data.chars), layers=4, width=128, heads=4, block=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    xr = probes.attach(model, opt, every=1, serve=False, spectral_every=None)
    totals: dict[str, float] = collections.defaultdict(float)
    for path, label in PARTS.items():
        owner, _, name = path.rpartition(".")
        obj = getattr(xr, owner) if owner else xr
        setattr(obj, name, timed(totals, label, getattr(obj, name)))
    # the publisher thread's parts
    handoff.build_step = timed(totals, "publisher: build the Step", handoff.build_step)
    xr.publisher.rules.evaluate = timed(totals, "publisher: rules", xr.publisher.rules.evaluate)
    wire.encode = timed(totals, "publisher: encode", wire.encode)

    def step():
        x = data.batch(16)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    time.sleep(1)
    totals.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = (time.perf_counter() - t0) / args.steps
    xr.close()
    print(f"CPU kernel: {'on' if cpu_kernel.load() is not None else 'off'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.steps} sampled steps, {elapsed * 1e3:.1f} ms each\n")
    print("| part | ms per sampled step |\n|---|---:|")
    for label, total in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {total / args.steps * 1e3:.2f} |")


if __name__ == "__main__":
    main()
