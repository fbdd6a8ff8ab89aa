"""Probe overhead on the demo model, measured side by side in one process.

Each configuration trains its own copy of the model; blocks of steps of all
configurations are interleaved (in a shuffled order per round) so that
machine noise hits them alike. A block's mean step time includes its
sampled steps; we report the median over rounds and the ratio to the
baseline of the same rounds.

    python bench/overhead.py [--rounds 7] [--block 50] [--width 128 --layers 4]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

import probes
from probes import demo, wire


def make(args, seed=0):
    torch.manual_seed(seed)
    data = demo.CharData(demo.corpus(), block=args.block_len, seed=seed)
    model = demo.build_model(len(data.chars), layers=args.layers, width=args.width, heads=args.heads,
                             block=args.block_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return data, model, opt


def run_block(data, model, opt, steps, batch):
    t0 = time.perf_counter()
    for _ in range(steps):
        x = data.batch(batch)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block", type=int, default=50, help="steps per block (a multiple of 50)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block-len", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    args = p.parse_args()

    configs = {"baseline": None, "probe every=50": 50, "probe every=10": 10, "probe every=1": 1}
    setups, frame_bytes = {}, []
    for name, every in configs.items():
        data, model, opt = make(args)
        xr = None
        if every is not None:
            xr = probes.attach(model, opt, every=every, name=f"bench-{every}")
            if every == 1:
                xr.publisher.subscribe(lambda m: frame_bytes.append(len(wire.encode(m))) if isinstance(m, wire.Step) else None)
        setups[name] = (data, model, opt, xr)
        run_block(data, model, opt, 5, args.batch)  # warm-up

    times = {name: [] for name in configs}
    for r in range(args.rounds):
        order = list(configs)
        random.Random(r).shuffle(order)
        for name in order:
            data, model, opt, _ = setups[name]
            times[name].append(run_block(data, model, opt, args.block, args.batch))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    for *_, xr in setups.values():
        if xr is not None:
            xr.close()

    nparams = sum(p.numel() for p in setups["baseline"][1].parameters())
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: GPT-2 {args.layers} layers x {args.width} wide, {nparams / 1e6:.2f} M parameters, "
          f"batch {args.batch} x {args.block_len} tokens; {args.rounds} rounds of {args.block} steps\n")
    print("| configuration | median step (ms) | ratio to baseline (median of per-round ratios) |")
    print("|---|---:|---:|")
    base = times["baseline"]
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {statistics.median(ratios):.3f} |")
    if frame_bytes:
        print(f"\nStep frame (all streams of one sampled step): median {statistics.median(frame_bytes) / 1024:.1f} KiB, "
              f"{len(setups['probe every=1'][3].publisher.hello.layers)} layers")


if __name__ == "__main__":
    main()
