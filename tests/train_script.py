"""A user's plain training script with the probe attached (used by the tests).

Usage: python train_script.py NAME STEPS [--nan-at S] [--log FILE] [--every N] [--sleep SECONDS]
Prints "ready" after the first step and "done" at the end.
"""

import argparse
import math
import time

import torch
from torch import nn

import probes

p = argparse.ArgumentParser()
p.add_argument("name")
p.add_argument("steps", type=int)
p.add_argument("--nan-at", type=int, default=-1)
p.add_argument("--log", default=None)
p.add_argument("--every", type=int, default=1)
p.add_argument("--sleep", type=float, default=0.0)
args = p.parse_args()

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
with probes.attach(model, opt, every=args.every, name=args.name, log=args.log) as xr:
    for step in range(args.steps):
        if step == args.nan_at:
            with torch.no_grad():
                model[2].weight[0, 0] = math.nan
            xr.note("fault", fault="nan", layer="2")
        x = torch.randn(32, 16)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            print("ready", flush=True)
        if args.sleep:
            time.sleep(args.sleep)
print("done", flush=True)
