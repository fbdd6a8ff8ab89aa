"""Probe overhead against the baseline and the usual alternatives, side by side.

Configurations (each trains its own copy of the same model):
  baseline              no monitoring
  probe/N               xray-tui's probe, every=N
  probe-torch/N         the same with the CPU kernel off (XRAY_TUI_CPU_KERNEL=0): torch's ops only
  tensorboard/N         SummaryWriter.add_histogram of every parameter and gradient, every N steps
  histc/N               wandb.watch-style: per tensor torch.histc(64) + min/max .item(), every N steps
  fastai/N              fastai-style forward hooks copying each activation to the CPU, every N steps

Blocks of steps of all configurations are interleaved (shuffled order per
round), so machine noise hits them alike. A block's mean step time includes
its sampled steps; the table gives the median over rounds and the median of
the per-round ratios to the baseline.

    python bench/overhead.py                      # the demo model
    python bench/overhead.py --gpt2-small --rounds 3 --block 20 --configs baseline,probe/10,tensorboard/10,histc/10
    python bench/overhead.py --gpt2-small --device cuda --bf16 --batch 16 --configs baseline,probe/10,probe/1
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time

# run as a script, bench/ comes first on sys.path, where bench/tui.py would hide the tui package
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import probes
from probes.engines import cpu_kernel
from probes.demo import training as demo
from probes.protocol import wire
from probes.capture.selection import select_modules

DEFAULT = "baseline,probe/50,probe/10,probe/1,tensorboard/10,histc/10,fastai/10"


class Every:
    """Calls ``fn(step)`` after every N-th optimizer step."""

    def __init__(self, opt, n: int, fn) -> None:
        self.n, self.fn, self.step = n, fn, 0
        opt.register_step_post_hook(self._hook)

    def _hook(self, *_):
        if self.step % self.n == 0:
            self.fn(self.step)
        self.step += 1


def tensorboard(model, opt, n):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tempfile.mkdtemp(prefix="xray-bench-tb-"))

    def log(step):
        for name, p in model.named_parameters():
            writer.add_histogram(name, p, step)
            if p.grad is not None:
                writer.add_histogram(name + ".grad", p.grad, step)

    Every(opt, n, log)
    return writer.close


def histc(model, opt, n):
    def log(step):
        for p in model.parameters():
            for t in (p, p.grad):
                if t is not None:
                    t = t.detach()
                    torch.histc(t, bins=64, min=t.min().item(), max=t.max().item()).cpu()

    Every(opt, n, log)


def fastai(model, opt, n):
    state = {"on": True}
    stats = []

    def hook(module, inputs, output):
        if state["on"] and isinstance(output, torch.Tensor):
            o = output.detach().cpu()
            stats.append((o.mean().item(), o.std().item(), torch.histc(o.float(), 40, -7, 7)))

    for _, m in select_modules(model):
        m.register_forward_hook(hook)

    def toggle(step):
        state["on"] = (step + 1) % n == 0  # the next step is sampled

    Every(opt, 1, toggle)
    state["on"] = True


def make(args, seed=0):
    torch.manual_seed(seed)
    data = demo.CharData(demo.corpus(), block=args.block_len, seed=seed)
    model = demo.build_model(len(data.chars), layers=args.layers, width=args.width, heads=args.heads,
                             block=args.block_len).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return data, model, opt


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a block's time is the work's (GPUs run ahead)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wait_for_publisher(xr) -> None:
    """Block until the probe's publisher thread has handled every step queued so far.

    The publisher builds, judges, encodes and records steps after the
    training thread has moved on; on a CPU-only run that work competes with
    training for the same cores, so a block's time includes it (otherwise
    the next configuration's block would pay for it).
    """
    done = threading.Event()

    def marker():
        done.set()
        return wire.Note(xr.step_index, xr.rank, "bench-sync", {})

    xr.publisher.submit(marker)
    done.wait(60)


def run_block(data, model, opt, steps, batch, xr=None, kernel=True, bf16=False):
    ready = cpu_kernel.ready
    if not kernel:
        cpu_kernel.ready = lambda: None  # this block's reductions take the torch path
    device = next(model.parameters()).device
    try:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            x = data.batch(batch).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        if xr is not None:
            wait_for_publisher(xr)
        return (time.perf_counter() - t0) / steps
    finally:
        cpu_kernel.ready = ready


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block", type=int, default=50, help="steps per block (a multiple of every N)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block-len", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--gpt2-small", action="store_true", help="12 layers x 768 wide, 12 heads, batch 4 x 128")
    p.add_argument("--configs", default=DEFAULT)
    p.add_argument("--device", default="cpu", help="where the model trains (cuda: the probe's torch path)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    p.add_argument("--spectral-every", type=int, default=0, metavar="N",
                   help="also run the spectral monitor every N steps (default: off, so that the table is the "
                        "statistics' cost; the monitor's own cost is in bench/spectral.py)")
    args = p.parse_args()
    try:
        args.device = torch.device(args.device)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as exc:
        p.error(f"--device {args.device}: {exc}")
    if args.gpt2_small:
        args.layers, args.width, args.heads, args.batch, args.block_len = 12, 768, 12, 4, 128

    names = args.configs.split(",")
    setups, frame_bytes, closers, probes_of = {}, [], [], {}
    spectral = args.spectral_every or None
    for name in names:
        data, model, opt = make(args)
        kind, _, n = name.partition("/")
        n = int(n or 0)
        xr = None
        if kind in ("probe", "probe-torch"):
            xr = probes.attach(model, opt, every=n, name=f"bench-{kind}-{n}", spectral_every=spectral)
            closers.append(xr.close)
            xr.publisher.subscribe(
                lambda m: frame_bytes.append((len(wire.encode(m)), len(m.samples)))
                if isinstance(m, wire.Step) and m.phase == "train" else None)
        elif kind == "tensorboard":
            closers.append(tensorboard(model, opt, n))
        elif kind == "histc":
            histc(model, opt, n)
        elif kind == "fastai":
            fastai(model, opt, n)
        elif kind != "baseline":
            p.error(f"unknown configuration {name!r}")
        setups[name] = (data, model, opt)
        probes_of[name] = xr
        run_block(data, model, opt, 2, args.batch, xr, kind != "probe-torch", args.bf16)  # warm-up

    times = {name: [] for name in names}
    for r in range(args.rounds):
        order = list(names)
        random.Random(r).shuffle(order)
        for name in order:
            times[name].append(run_block(*setups[name], args.block, args.batch, probes_of[name],
                                         not name.startswith("probe-torch/"), args.bf16))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    memory = {name: xr.memory() for name, xr in probes_of.items() if xr is not None}
    for close in closers:
        close()

    nparams = sum(q.numel() for q in setups[names[0]][1].parameters())
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\nmachine: {platform.machine()}, {where}, torch {torch.__version__}"
          f"{', bf16 autocast' if args.bf16 else ''}")
    print(f"model: GPT-2 {args.layers} layers x {args.width} wide, {nparams / 1e6:.2f} M parameters, "
          f"batch {args.batch} x {args.block_len} tokens; {args.rounds} rounds of {args.block} steps\n")
    print("| configuration | median step (ms) | ratio to baseline |")
    print("|---|---:|---:|")
    base = times.get("baseline")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base)) if base else float("nan")
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {ratio:.3f} |")
    param_bytes = sum(q.numel() * q.element_size() for q in setups[names[0]][1].parameters())
    for name, mem in memory.items():
        total = mem["buffers"] + mem["backlog"]
        print(f"\n{name}: probe memory {total / 2**20:.1f} MiB = buffers {mem['buffers'] / 2**20:.2f} MiB "
              f"({mem['buffers'] / param_bytes:.2%} of the {param_bytes / 2**20:.1f} MiB of parameters) "
              f"+ backlog {mem['backlog'] / 2**20:.1f} MiB")
    if frame_bytes:
        size = statistics.median(b for b, _ in frame_bytes)
        per = statistics.median(b / n for b, n in frame_bytes)
        print(f"\nStep frame (every stream of one sampled training step): median {size / 1024:.1f} KiB, "
              f"{statistics.median(n for _, n in frame_bytes)} samples, {per:.0f} bytes per sample")


if __name__ == "__main__":
    main()
