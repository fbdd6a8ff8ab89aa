"""A small job for tests/test_multinode.py: run by torchrun on each simulated node.

Usage: torchrun --nnodes 2 --nproc_per_node 2 --node_rank N ... multinode_script.py OUTDIR STEPS
       [--ddp] [--diverge-rank R --diverge-at S] [--max-rank R] [--slow-rank R --slow-at S]
       [--kill-rank R --kill-at S] [--timeout T] [--wait-file F]

Each rank trains a tiny MLP (under DDP with ``--ddp``, else on its own, so that a
killed rank stalls nobody's training) with the probe, every=1, recording to
OUTDIR/rank{R}.xray. Before each optimizer step it saves its weights, gradients
and the first Linear's output (the ground truth of the whole-job samples) to
OUTDIR/truth{R}.pt at the end. ``--max-rank``: that rank's inputs hold 100.0, so
the first Linear's largest output is only on it. ``--diverge-rank``: from step S
that rank's gradients are scaled by 100 (after DDP's all-reduce). ``--slow-rank``:
from step S that rank sleeps 0.25 s before each forward (a data-loading stall).
``--kill-rank``: that rank SIGKILLs itself at step S (once the job merged a few steps with it).
``--no-serve-local``: ``serve_local=False``. ``--hang-rank``: that rank stops for
``--hang-s`` seconds at step ``--hang-at`` (hung, then back). ``--wait-file``: rank 0
waits up to 20 s for F to exist before closing (the test lists the live run).
"""

import argparse
import os
import signal
import time

import torch
import torch.distributed as dist
from torch import nn

import probes

p = argparse.ArgumentParser()
p.add_argument("outdir")
p.add_argument("steps", type=int)
p.add_argument("--ddp", action="store_true")
p.add_argument("--diverge-rank", type=int, default=-1)
p.add_argument("--diverge-at", type=int, default=0)
p.add_argument("--max-rank", type=int, default=-1)
p.add_argument("--slow-rank", type=int, default=-1)
p.add_argument("--slow-at", type=int, default=0)
p.add_argument("--kill-rank", type=int, default=-1)
p.add_argument("--kill-at", type=int, default=0)
p.add_argument("--timeout", type=float, default=60.0)
p.add_argument("--wait-file", default="")
p.add_argument("--no-serve-local", action="store_true")
p.add_argument("--hang-rank", type=int, default=-1)
p.add_argument("--hang-at", type=int, default=0)
p.add_argument("--hang-s", type=float, default=0.0)
args = p.parse_args()

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
if args.ddp:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(model)
opt = torch.optim.SGD(model.parameters(), lr=1e-4)
gen = torch.Generator().manual_seed(rank)
first = next(m for m in model.modules() if isinstance(m, nn.Linear))
acts: list = []
first.register_forward_hook(lambda m, i, o: acts.append(o.detach().clone()))
truth = []
with probes.attach(model, opt, every=1, name="multi", log=f"{args.outdir}/rank{rank}.xray",
                   spectral_every=None, job_timeout=args.timeout, serve_local=not args.no_serve_local) as xr:
    for step in range(args.steps):
        if rank == args.kill_rank and step == args.kill_at:
            # die once the job has merged some steps with this rank (its rounds run behind training)
            deadline = time.monotonic() + 20
            while xr._job.rounds < args.kill_at and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == args.hang_rank and step == args.hang_at:
            time.sleep(args.hang_s)  # hung: alive, but not training and not taking part
        time.sleep(0.25 if rank == args.slow_rank and step >= args.slow_at else 0.01)
        x = torch.randn(8, 4, generator=gen)
        if rank == args.max_rank:
            x[0, 0] = 100.0
        acts.clear()
        model(x).pow(2).mean().backward()
        if rank == args.diverge_rank and step >= args.diverge_at:
            for q in model.parameters():
                q.grad.mul_(100.0)
        truth.append({"weight": {n.removeprefix("module."): q.detach().clone() for n, q in model.named_parameters()},
                      "grad": {n.removeprefix("module."): q.grad.clone() for n, q in model.named_parameters()},
                      "act": acts[0]})
        opt.step()
        opt.zero_grad()
    if rank == 0 and args.wait_file:
        deadline = time.monotonic() + 20
        while not os.path.exists(args.wait_file) and time.monotonic() < deadline:
            time.sleep(0.05)
torch.save(truth, f"{args.outdir}/truth{rank}.pt")
if args.kill_rank < 0:  # with a rank gone, the default group cannot be torn down together
    dist.barrier()
    dist.destroy_process_group()
