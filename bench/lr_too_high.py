"""A learning rate too high from step 0 on the nanoGPT-shaped model of bench/healthy_runs.py:
its recipe (warm-up 100 steps, cosine) with the peak at 1 (no clipping) and at 10 (clipped to 1),
80 steps each; prints the first update-too-large alert and the loss.

    python bench/lr_too_high.py
"""
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
import torch, probes
from probes.protocol import wire
import healthy_runs as H
torch.set_num_threads(1)
for peak, clip in ((1.0, None), (10.0, 1.0)):
    model, opt, steps, loss_fn, _, sched = H.setup("nanogpt")
    msgs = []; losses = []
    with probes.attach(model, opt, every=5, serve=False, spectral_every=None) as xr:
        xr.publisher.subscribe(msgs.append)
        for it in range(80):
            for g in opt.param_groups:
                g["lr"] = sched(it) * peak / 1e-3
            loss = loss_fn(model); loss.backward()
            if clip: torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step(); opt.zero_grad(set_to_none=True); losses.append(loss.item())
    al = [m for m in msgs if isinstance(m, wire.Alert) and m.severity != "info"]
    utl = [a for a in al if a.rule == "update-too-large"]
    print(f"peak lr {peak} clip {clip}: loss {losses[0]:.2f} -> {sum(losses[-10:])/10:.2f}; first update-too-large:",
          utl and (utl[0].step, utl[0].layer, utl[0].message[:200]), "| first alerts:", [(a.step, a.rule) for a in al[:4]], flush=True)
