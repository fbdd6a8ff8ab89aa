"""Training speed while a viewer is attached, stopped (SIGSTOP) and killed (SIGKILL).

The demo model trains in this process with the probe at every=1 (the
heaviest stream); a real `xray-tui attach --headless` viewer runs in a child
process. Blocks of steps are timed in each phase and the medians compared.

    python bench/viewer_faults.py [--blocks 5] [--block 40]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

# run as a script, bench/ comes first on sys.path, where bench/tui.py would hide the tui package
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import probes
from probes.demo import training as demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--block", type=int, default=40)
    args = p.parse_args()
    torch.manual_seed(0)
    data = demo.CharData(demo.corpus())
    model = demo.build_model(len(data.chars))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    xr = probes.attach(model, opt, every=1, name="bench-viewer")

    def block() -> float:
        t0 = time.perf_counter()
        for _ in range(args.block):
            x = data.batch(16)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / args.block

    results = {}

    def phase(name):
        results[name] = [block() for _ in range(args.blocks)]
        print(f"{name}: median {statistics.median(results[name]) * 1e3:.1f} ms/step", flush=True)

    block()  # warm-up
    phase("no viewer")
    viewer = subprocess.Popen([sys.executable, "-m", "tui.cli", "attach", xr.run, "--headless"],
                              stdout=subprocess.DEVNULL)
    time.sleep(2)
    phase("viewer attached")
    viewer.send_signal(signal.SIGSTOP)
    phase("viewer stopped (SIGSTOP)")
    viewer.send_signal(signal.SIGKILL)
    viewer.wait()
    phase("viewer killed (SIGKILL)")
    xr.close()
    base = statistics.median(results["no viewer"])
    print("\n| phase | median step (ms) | ratio to no viewer |\n|---|---:|---:|")
    for name, ts in results.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {statistics.median(ts) / base:.3f} |")
    print(f"\nprobe queue drops: {xr.publisher.dropped}")


if __name__ == "__main__":
    main()
