"""What the probe costs on a step it does not sample: the cheap tier, timed in a real loop.

Trains the demo GPT-2 with the probe at a cadence it never reaches, so every
step is unsampled, and times the probe's work on the training thread: the
root pre-hook (phase, input size, autocast), the root hook (the loss read
from the output), the optimizer hooks and the step's end (learning rates,
the scalars kept). Prints microseconds per step beside the step itself, and the probe's share
of the step:

    python bench/unsampled_step.py [--steps 200] [--no-signals]
    python bench/unsampled_step.py --gpt2-small --steps 12   # GPT-2 small's dims (12 x 768, 148 tensors)
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

# run as a script, bench/ comes first on sys.path, where bench/tui.py would hide the tui package
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import probes
from probes.demo import training as demo
from probes.capture import hooks

PARTS = {  # the probe's hook method (probes.capture.hooks.Hooks) -> what it does on an unsampled step
    "_begin_forward": "root pre-hook: phase, input size, autocast",
    "_end_forward": "root hook: the loss kept (on its device)",
    "before_update": "optimizer pre-hook (the tier's first half)",
    "after_update": "optimizer post-hook (the tier's second half)",
    "_end_step": "step end: lrs, scale, rates; scalars kept and shipped",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--no-signals", action="store_true", help="without the every-step tier (signals=False)")
    p.add_argument("--gpt2-small", action="store_true",
                   help="GPT-2 small's dimensions (12 layers x 768, 12 heads; 256-token windows, batch 4) "
                        "instead of the demo's 4 x 128")
    args = p.parse_args()
    torch.manual_seed(0)
    block, batch = (256, 4) if args.gpt2_small else (64, 16)
    data = demo.CharData(demo.corpus(), block=block, seed=0)
    model = (demo.build_model(len(data.chars), layers=12, width=768, heads=12, block=block) if args.gpt2_small
             else demo.build_model(len(data.chars), layers=4, width=128, heads=4, block=block))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per_step: dict[str, list[float]] = collections.defaultdict(list)
    current: dict[str, float] = collections.defaultdict(float)

    def timed(label, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                current[label] += time.perf_counter() - t0
        return wrapper

    # on the class, before attach: the hooks hold bound methods taken at attach
    for name, label in PARTS.items():
        setattr(hooks.Hooks, name, timed(label, getattr(hooks.Hooks, name)))
    xr = probes.attach(model, opt, every=10**9, start_step=1, serve=False, spectral_every=None,
                       signals=not args.no_signals)
    steps = []
    for i in range(args.steps):
        current.clear()
        t0 = time.perf_counter()
        x = data.batch(batch)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - t0)
        if i >= min(10, args.steps // 4):  # warm
            for label in PARTS.values():
                per_step[label].append(current[label])
    xr.close()
    total = [sum(v) for v in zip(*per_step.values())]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} unsampled steps, "
          f"median {statistics.median(steps) * 1e3:.1f} ms each\n")
    print("| part | median us per step |\n|---|---:|")
    for label, values in per_step.items():
        print(f"| {label} | {statistics.median(values) * 1e6:.1f} |")
    print(f"| **all of the probe** | **{statistics.median(total) * 1e6:.1f}** |")
    print(f"| share of the step | {statistics.median(total) / statistics.median(steps):.2%} |")


if __name__ == "__main__":
    main()
