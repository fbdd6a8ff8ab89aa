"""A user's plain training script with the probe attached (used by the tests).

Usage: python train_script.py NAME STEPS [--nan-at S] [--log FILE] [--every N] [--sleep SECONDS]
       [--raise-at S] [--plain] [--stop] [--log-loss]
Prints "ready" after the first step and "done" at the end. ``--raise-at S``
raises ValueError("boom at step S") in the loop; ``--plain`` attaches without
a ``with`` block (the probe is closed by atexit, as in most scripts);
``--stop`` passes ``on_alert="stop"`` and leaves the loop when ``xr.should_stop``;
``--log-loss`` gives the probe the loss with ``xr.log(loss=...)``.
"""

import argparse
import contextlib
import math
import time

import torch
from torch import nn

import probes

p = argparse.ArgumentParser()
p.add_argument("name")
p.add_argument("steps", type=int)
p.add_argument("--nan-at", type=int, default=-1)
p.add_argument("--raise-at", type=int, default=-1)
p.add_argument("--log", default=None)
p.add_argument("--every", type=int, default=1)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--plain", action="store_true")
p.add_argument("--stop", action="store_true")
p.add_argument("--log-loss", action="store_true")
args = p.parse_args()

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
xr = probes.attach(model, opt, every=args.every, name=args.name, log=args.log,
                   on_alert="stop" if args.stop else None)
with contextlib.nullcontext() if args.plain else xr:
    for step in range(args.steps):
        if step == args.nan_at:
            with torch.no_grad():
                model[2].weight[0, 0] = math.nan
            xr.note("fault", fault="nan", layer="2")
        if step == args.raise_at:
            raise ValueError(f"boom at step {step}")
        x = torch.randn(32, 16)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        if args.log_loss:
            xr.log(loss=loss)
        opt.step()
        opt.zero_grad()
        if step == 0:
            print("ready", flush=True)
        if args.sleep:
            time.sleep(args.sleep)
        if xr.should_stop:
            break
print("done", flush=True)
