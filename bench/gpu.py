"""The probe on a GPU, side by side in one run: GPT-2 small, bf16 autocast, batch 16 x 1024.

Configurations (each trains its own copy of the same model; blocks of steps
interleaved in a shuffled order per round, as in bench/overhead.py, whose
TensorBoard and wandb.watch-style monitors this reuses):

  baseline          no monitoring
  probe/N           xray-tui's probe, every=N (the engine XRAY_TUI_ENGINE picks: the device engine on CUDA)
  tensorboard/N     SummaryWriter.add_histogram of every parameter and gradient, every N steps
  histc/N           per tensor torch.histc(64) + min/max .item(), every N steps

Printed: the median step time and its ratio to the baseline, the peak
``torch.cuda.max_memory_allocated`` of each configuration's blocks, and the
device work one sampled step adds to an unsampled one: on CUDA the kernels
``torch.profiler`` sees, on the CPU the aten ops (a TorchDispatchMode, outside
the engine's launches) plus the engine's launches, and the host reads
(``aten::_local_scalar_dense``). The extra cost of one sampled step is given
for the probe (every=1) and TensorBoard (every=N, times N).

    python bench/gpu.py                                   # on a GPU box: the table of docs/benchmarks.md
    XRAY_TUI_ENGINE=device TRITON_INTERPRET=1 python bench/gpu.py --device cpu --tiny --rounds 1 --block 2
                                                          # a check on the CPU (Triton's interpreter)
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import random
import statistics
import sys
import threading
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import overhead  # noqa: E402  (puts the repository first on sys.path)

import torch  # noqa: E402

import probes  # noqa: E402
from probes import engines
from probes.protocol import wire  # noqa: E402

DEFAULT = "baseline,probe/50,probe/10,probe/1,tensorboard/10,histc/10"


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """aten ops dispatched on this thread, and host reads among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.reads = 0
        self.paused = False  # inside a launch: Triton's interpreter's own copies are not the probe's ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops += 1
            self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


SYNC_WARNING = "synchronizing CUDA operation"  # torch's warning per sync (not its "prototype feature" notice)


class SyncCounter:
    """Synchronizing CUDA calls made on this thread (``torch.cuda.set_sync_debug_mode``), and where.

    A host sync on the training thread drains the GPU's queue: the step loses its run-ahead and
    becomes as slow as its Python. The place is the innermost frame in probes/ (or "not the probe").
    """

    def __enter__(self):
        self.count, self.where = 0, collections.Counter()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")
        main = threading.current_thread()

        def show(message, category, filename, lineno, file=None, line=None):
            if threading.current_thread() is main and SYNC_WARNING in str(message):
                self.count += 1
                ours = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}probes{os.sep}" in f.filename]
                self.where[f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else "not the probe"] += 1

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode(1)
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)
        self._warnings.__exit__(*exc)


class StreamCheck:
    """What one probe published: steps, samples, impossible statistics, and engine fallbacks.

    A bench of a probe that quietly fell back to torch, or published nonsense, would measure
    the wrong thing: the table is printed with these counts beside it.
    """

    def __init__(self) -> None:
        self.steps = self.samples = self.bad = 0
        self.fallbacks: list[str] = []

    def __call__(self, msg) -> None:
        if isinstance(msg, wire.Note) and msg.event == "engine-fallback":
            self.fallbacks.append(str(msg.data.get("why")))
        if not isinstance(msg, wire.Step):
            return
        self.steps += 1
        for s in msg.samples:
            self.samples += 1
            finite = s.nan == 0 and s.posinf == 0 and s.neginf == 0
            ok = s.count > 0 and s.sumsq >= 0 and s.zeros <= s.near_zero <= s.count
            if finite:
                ok = ok and s.min <= s.max and s.abssum >= abs(s.sum) * (1 - 1e-6)
            self.bad += not ok


def build(args, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width, n_layer=args.layers,
                     n_head=args.heads)
    model = GPT2LMHeadModel(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.type == "cuda")
    return model, opt


def train(model, opt, args, steps: int) -> None:
    for _ in range(steps):
        x = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def timed_block(model, opt, args, xr) -> float:
    overhead.sync(args.device)
    t0 = time.perf_counter()
    train(model, opt, args, args.block)
    overhead.sync(args.device)
    if xr is not None:
        overhead.wait_for_publisher(xr)
    return (time.perf_counter() - t0) / args.block


def step_work(model, opt, args) -> tuple[int, int, int, collections.Counter]:
    """Device work (kernels on CUDA; ops + engine launches on the CPU), host reads and host syncs
    (CUDA only; where from) of one step."""
    if args.device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        cpu0 = time.thread_time()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            with SyncCounter() as syncs, OpCounter() as c:
                train(model, opt, args, 1)
            cpu = time.thread_time() - cpu0
            torch.cuda.synchronize()
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        if args.profile:
            try:  # the profiler's names moved between torch versions: a report, never a failed bench
                gpu_us = sum(e.device_time_total for e in prof.events()
                             if e.device_type == torch.autograd.DeviceType.CUDA)
                print(f"\n{'-' * 20} one step: {kernels} kernels, {gpu_us / 1e3:.1f} ms of kernel time, "
                      f"{cpu * 1e3:.1f} ms of the training thread's CPU (profiled)")
                print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.profile))
            except Exception as exc:  # noqa: BLE001
                print(f"profile: {type(exc).__name__}: {exc}; training thread CPU {cpu * 1e3:.1f} ms")
        return kernels, c.reads, syncs.count, syncs.where
    c = OpCounter()
    launches = 0
    try:
        from probes.engines import device as de
    except Exception:
        de = None
    if de is not None:
        real = de._launch

        def launch(*a, **k):
            nonlocal launches
            launches += 1
            c.paused = True
            try:
                real(*a, **k)
            finally:
                c.paused = False

        de._launch = launch
    try:
        with c:
            train(model, opt, args, 1)
    finally:
        if de is not None:
            de._launch = real
    return c.ops + launches, c.reads, 0, collections.Counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block", type=int, default=50, help="steps per block (a multiple of every N)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--tiny", action="store_true", help="2 layers x 64 wide, vocab 256, batch 2 x 32 (a quick check)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast")
    p.add_argument("--configs", default=DEFAULT)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print the N kernels taking most time in the unsampled and the sampled step (CUDA)")
    args = p.parse_args()
    if args.tiny:
        args.layers, args.width, args.heads, args.vocab, args.batch, args.seq = 2, 64, 2, 256, 2, 32
    try:
        args.device = torch.device(args.device)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as exc:
        p.error(f"--device {args.device}: {exc}")
    cuda = args.device.type == "cuda"
    names = args.configs.split(",")
    setups, closers, checks = {}, [], {}
    for name in names:
        model, opt = build(args)
        kind, _, n = name.partition("/")
        n = int(n or 0)
        xr = None
        if kind == "probe":
            xr = probes.attach(model, opt, every=n, name=f"bench-gpu-{n}", serve=False, spectral_every=None)
            checks[name] = StreamCheck()
            xr.publisher.subscribe(checks[name])
            closers.append(xr.close)
        elif kind == "tensorboard":
            closers.append(overhead.tensorboard(model, opt, n))
        elif kind == "histc":
            overhead.histc(model, opt, n)
        elif kind != "baseline":
            p.error(f"unknown configuration {name!r}")
        setups[name] = (model, opt, xr)
        train(model, opt, args, 2)  # warm-up: compiles the kernels, grows the workspace

    work = {}
    for name, (model, opt, xr) in setups.items():
        if xr is not None and xr.every == 1:  # a sampled step against an unsampled one of the same model
            xr.every = 2
            xr._hooks._advance()  # noqa: SLF001  (re-phase: the next step is unsampled)
            if xr._hooks._sampling:  # noqa: SLF001
                train(model, opt, args, 1)
            unsampled = step_work(model, opt, args)
            sampled = step_work(model, opt, args)
            xr.every = 1
            work[name] = (sampled[0] - unsampled[0], sampled[1] - unsampled[1], sampled[2] - unsampled[2])
            if sampled[3]:
                print(f"{name}: host syncs of a sampled step by place: {dict(sampled[3])} (unsampled: "
                      f"{dict(unsampled[3])})")

    times = {name: [] for name in names}
    peak = {name: 0 for name in names}
    for r in range(args.rounds):
        order = list(names)
        random.Random(r).shuffle(order)
        for name in order:
            model, opt, xr = setups[name]
            if cuda:
                torch.cuda.reset_peak_memory_stats(args.device)
            times[name].append(timed_block(model, opt, args, xr))
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(args.device))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    for close in closers:
        close()

    nparams = sum(q.numel() for q in setups[names[0]][0].parameters())
    where = torch.cuda.get_device_name(args.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    engine = engines.for_device(args.device)
    print(f"\nmachine: {platform.machine()}, {where}, torch {torch.__version__}"
          f"{', bf16 autocast' if args.bf16 else ''}; probe engine on {args.device.type}: {engine}")
    print(f"model: GPT-2 {args.layers} layers x {args.width} wide, vocab {args.vocab}, {nparams / 1e6:.1f} M "
          f"parameters, batch {args.batch} x {args.seq} tokens; {args.rounds} rounds of {args.block} steps\n")
    unit = "kernels" if cuda else "ops + launches"
    print(f"| configuration | median step (ms) | ratio to baseline | peak memory (MiB) | {unit} per sampled step "
          "beyond an unsampled one | host reads | host syncs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = times.get("baseline")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base)) if base else float("nan")
        mem = f"{peak[name] / 2**20:,.0f}" if cuda else "n/a"
        extra, reads, syncs = work.get(name, ("", "", ""))
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {ratio:.3f} | {mem} | {extra} | {reads} | "
              f"{syncs if cuda else 'n/a'} |")
    print()
    for name, c in checks.items():
        print(f"{name}: published {c.steps} steps, {c.samples} samples, {c.bad} with impossible statistics; "
              f"engine fallbacks: {c.fallbacks or 'none'}")
    if base:
        b = statistics.median(base)
        for name, ts in times.items():
            kind, _, n = name.partition("/")
            if kind in ("probe", "tensorboard", "histc") and n:
                cost = (statistics.median(ts) - b) * int(n)
                print(f"\n{name}: one sampled step costs {cost * 1e3:.2f} ms beyond a step without monitoring")


if __name__ == "__main__":
    main()
