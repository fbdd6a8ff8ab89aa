"""Two-rank DDP training with the probe on every rank (run with torchrun).

Usage: python -m torch.distributed.run --nproc_per_node 2 dist_script.py OUTDIR STEPS [--corrupt-at S]
Each rank records its stream to OUTDIR/rank{R}.xray. With --corrupt-at, rank 1
scales its gradients by 100 after DDP's all-reduce, from that step on.
"""

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import probes

p = argparse.ArgumentParser()
p.add_argument("outdir")
p.add_argument("steps", type=int)
p.add_argument("--corrupt-at", type=int, default=-1)
args = p.parse_args()

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
gen = torch.Generator().manual_seed(rank)
with probes.attach(model, opt, every=1, name="ddp", log=f"{args.outdir}/rank{rank}.xray"):
    for step in range(args.steps):
        x = torch.randn(16, 8, generator=gen)
        model(x).pow(2).mean().backward()
        if rank == 1 and 0 <= args.corrupt_at <= step:
            for q in model.parameters():
                q.grad.mul_(100.0)
        opt.step()
        opt.zero_grad()
dist.destroy_process_group()
