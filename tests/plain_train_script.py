"""A plain training script that never imports the probe (the tests of `xray-tui attach --pid`).

Usage: python plain_train_script.py [--steps N] [--until FILE] [--sleep SECONDS] [--hide-xray]
Seeded and single-threaded, so two runs print the same losses. Prints
"ready" after the first step, "loss STEP VALUE" (repr) after each, and at
the end "report {json}": what a probe could have left behind (thread names,
hooks on the model and optimizer, sys.excepthook, the SIGTERM handler,
sys.path entries of the injector). ``--until FILE`` trains until FILE exists
(``--steps`` caps it). ``--hide-xray`` makes xray-tui unimportable here (as in
an environment it is not installed in), so the injector must lend its own.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time

import torch
from torch import nn

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--until", default=None)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--hide-xray", action="store_true")
args = p.parse_args()
if args.hide_xray:
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]  # an editable install's finder
    sys.path[:] = [d for d in sys.path if not os.path.isdir(os.path.join(d or ".", "probes"))]

torch.set_num_threads(1)
torch.manual_seed(0)
# nanoGPT's train.py keeps its flags as globals of __main__, where the injected stub runs: a
# ``compile = True`` there once broke the stub, which called ``compile(...)``
compile = exec = open_ = True  # noqa: A001
model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(args.steps):
    x = torch.randn(32, 16)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"loss {step} {loss.item()!r}", flush=True)
    if step == 0:
        print("ready", flush=True)
    if args.until and os.path.exists(args.until):
        break
    if args.sleep:
        time.sleep(args.sleep)

hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())
hooks += len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)
report = {
    "threads": sorted(t.name for t in threading.enumerate()),
    "hooks": hooks,
    "excepthook_default": sys.excepthook is sys.__excepthook__,
    "sigterm_default": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
    "injected_paths": [p for p in sys.path if "inject-lib" in p],
    "main_names": sorted(k for k in globals() if not k.startswith("__")),
}
print("report " + json.dumps(report), flush=True)
