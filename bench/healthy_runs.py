"""Healthy runs, recorded: the ground truth for false alarms and for the update-ratio band.

Trains healthy models with the probe attached and records every message
(``log=``) to ``OUT/NAME.xray``, so the rules can be judged again offline
(``xray-tui replay FILE --headless --rules FILE``, or :func:`judge` below)
without training again. Then prints, per run, the alerts the probe's own
rules published and the update ratios ||dW||/||W|| seen (quantiles over
every sampled weight and step, and per step the median over weights).

    python bench/healthy_runs.py --out /tmp/healthy demo nanogpt mlp-adam mlp-sgd zoo-sgd zoo-adamw
    python bench/healthy_runs.py --judge /tmp/healthy      # rules again over the recordings

Runs (all CPU, 1 thread, every=5, spectral pass every 500 steps):

- ``demo``: ``xray-tui demo``'s model (4 blocks, width 128, char-level, batch 16, AdamW 1e-3), 1,500 steps;
- ``nanogpt``: nanoGPT's shakespeare-char recipe scaled down: 4 layers, width 128, 4 heads, 64-token
  windows, batch 32, dropout 0.2, AdamW lr 1e-3 betas (0.9, 0.99) weight decay 0.1, grad clip 1.0,
  100 warm-up steps then cosine to 1e-4 at 3,000 steps;
- ``mlp-adam`` / ``mlp-sgd``: a 5-layer ReLU MLP (256 wide) classifying 65,536 random Gaussian
  points into the 10 classes of a random linear teacher, Adam 1e-3 / SGD 0.05 momentum 0.9, 3,000 steps;
- ``zoo-adamw`` / ``zoo-sgd``: tests/test_fault_zoo.py's 2-block 32-wide GPT-2, AdamW 1e-3 /
  SGD 0.3 momentum 0.9, 2,000 steps.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpt(vocab, layers, width, heads, block, dropout=0.0, activation="gelu_new"):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(vocab_size=vocab, n_positions=block, n_embd=width, n_layer=layers, n_head=heads,
                        activation_function=activation, resid_pdrop=dropout, embd_pdrop=dropout,
                        attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def setup(name: str):
    """(model, optimizer, steps, batch function, loss function, clip, lr schedule or None)."""
    import torch
    from torch import nn

    from probes.demo import training as demo

    torch.manual_seed(0)
    if name in ("demo", "nanogpt", "zoo-adamw", "zoo-sgd"):
        block = {"demo": 64, "nanogpt": 64}.get(name, 32)
        data = demo.CharData(demo.corpus(), block=block, seed=0)
        if name == "demo":
            model = demo.build_model(len(data.chars))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            steps, batch, clip, sched = 1500, 16, None, None
        elif name == "nanogpt":
            model = _gpt(len(data.chars), 4, 128, 4, 64, dropout=0.2, activation="gelu")
            decay = [p for p in model.parameters() if p.dim() >= 2]
            other = [p for p in model.parameters() if p.dim() < 2]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                    lr=1e-3, betas=(0.9, 0.99))
            steps, batch, clip = 3000, 32, 1.0

            def sched(it, lr=1e-3, warm=100, end=3000, low=1e-4):
                if it < warm:
                    return lr * (it + 1) / warm
                r = (it - warm) / (end - warm)
                return low + 0.5 * (1 + math.cos(math.pi * r)) * (lr - low)
        else:
            model = _gpt(len(data.chars), 2, 32, 2, 32)
            opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if name == "zoo-adamw"
                   else torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9))
            steps, batch, clip, sched = 2000, 8, None, None

        def loss_fn(m):
            x = data.batch(batch)
            return m(input_ids=x, labels=x).loss
        return model, opt, steps, loss_fn, clip, sched
    if name in ("mlp-adam", "mlp-sgd"):
        g = torch.Generator().manual_seed(0)
        X = torch.randn(65536, 64, generator=g)
        Y = (X @ torch.randn(64, 10, generator=g)).argmax(1)  # a random linear teacher: learnable
        layers = []
        for i in range(5):
            layers += [nn.Linear(64 if i == 0 else 256, 256), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(256, 10))
        opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if name == "mlp-adam"
               else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))

        def loss_fn(m):
            idx = torch.randint(65536, (64,), generator=g)
            return nn.functional.cross_entropy(m(X[idx]), Y[idx])
        return model, opt, 3000, loss_fn, None, None
    raise SystemExit(f"unknown run {name}")


def record(name: str, out: str, every: int = 5) -> str:
    """Train run ``name`` healthy; its recording's path."""
    import torch

    import probes

    torch.set_num_threads(1)
    model, opt, steps, loss_fn, clip, sched = setup(name)
    model.train()
    path = os.path.join(out, f"{name}.xray")
    if os.path.exists(path):
        os.remove(path)
    losses = []
    t = time.perf_counter()
    with probes.attach(model, opt, every=every, serve=False, log=path, name=name) as xr:
        for it in range(steps):
            if sched is not None:
                for group in opt.param_groups:
                    group["lr"] = sched(it)
            loss = loss_fn(model)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if xr.spectral is not None:
            xr.spectral.wait_pass(steps // 500, timeout=600)
    print(f"{name}: {steps} steps in {time.perf_counter() - t:.0f}s; loss {sum(losses[:20]) / 20:.2f} -> "
          f"{sum(losses[-50:]) / 50:.2f}", flush=True)
    return path


def summary(path: str, rules=None) -> dict:
    """Alerts (as published, or judged again with ``rules``) and update ratios of one recording."""
    import numpy as np

    from probes.protocol import wire
    from probes.rules.spectral import SpectralAlerts

    msgs, _ = wire.read_file(path)
    ratios, per_step = [], []
    alerts = []
    # the update-too-large band's and starved's population: weight matrices, not zero-initialised
    from probes.rules import RuleEngine

    kinds = RuleEngine()
    band, first, runs, run_now = [], [], {}, {}
    starved_gap = []  # per step and kind: median / min ratio
    for m in msgs:
        if isinstance(m, wire.Hello):
            kinds.set_hello(m)
        elif isinstance(m, wire.Step) and m.phase == "train":
            kinds.evaluate(m)  # (for its zero-init bookkeeping; alerts ignored here)
            by_kind: dict = {}
            for x in m.samples:
                if x.kind != "update" or x.ratio is None or not math.isfinite(x.ratio):
                    continue
                kind = kinds.param_kind(x.layer)
                if x.ratio > 0:
                    by_kind.setdefault(kind, []).append(x.ratio)
                if kind == "matrix" and not kinds.zero_init.get(x.layer, False):
                    (first if x.layer not in runs else band).append(x.ratio)
                    run_now[x.layer] = run_now.get(x.layer, 0) + 1 if x.ratio > 0.1 else 0
                    runs[x.layer] = max(runs.get(x.layer, 0), run_now[x.layer])
            v = by_kind.get("matrix", [])
            if len(v) >= 3:
                starved_gap.append(float(np.median(v)) / min(v))
    judge = SpectralAlerts(config=rules.config) if rules is not None else None
    for m in msgs:
        if isinstance(m, wire.Step) and m.phase == "train":
            r = [s.ratio for s in m.samples if s.kind == "update" and s.ratio is not None
                 and math.isfinite(s.ratio) and s.count > 1]
            ratios += r
            if r:
                per_step.append((m.step, float(np.median(r)), max(r)))
        if rules is None:
            if isinstance(m, wire.Alert) and m.severity != "info":
                alerts.append(m)
            continue
        if isinstance(m, wire.Hello):
            rules.set_hello(m) if hasattr(rules, "set_hello") else rules.set_layers(m.layers)
        elif isinstance(m, wire.Note) and hasattr(rules, "note"):
            rules.note(m)
        elif isinstance(m, wire.Scalars):
            alerts += [a for a in rules.evaluate_scalars(m) if a.severity != "info"]  # loss rules count too
        elif isinstance(m, wire.Step):
            alerts += [a for a in rules.evaluate(m) if a.severity != "info"]
        elif isinstance(m, wire.Spectral):
            a = judge.evaluate(m, m.step, m.rank)
            if a is not None and a.severity != "info":
                alerts.append(a)
    q = np.quantile(ratios, [0.01, 0.5, 0.99, 0.999]) if ratios else [math.nan] * 4
    bq = np.quantile(band, [0.5, 0.99, 0.999]) if band else [math.nan] * 3
    return {"ratios": q, "max": max(ratios, default=math.nan), "n": len(ratios), "per_step": per_step,
            "alerts": alerts, "band": bq, "band_max": max(band, default=math.nan),
            "first_max": max(first, default=math.nan), "longest_over": max(runs.values(), default=0),
            "starved_gap": max(starved_gap, default=math.nan)}


def report(path: str, rules=None) -> None:
    s = summary(path, rules)
    name = os.path.basename(path)
    early = [mx for st, _, mx in s["per_step"] if st < 50]
    print(f"{name}: {s['n']} update ratios: p1 {s['ratios'][0]:.2g} median {s['ratios'][1]:.2g} "
          f"p99 {s['ratios'][2]:.2g} p99.9 {s['ratios'][3]:.2g} max {s['max']:.2g}; "
          f"max over steps < 50: {max(early, default=math.nan):.2g}")
    print(f"  weight matrices (the band): median {s['band'][0]:.2g} p99 {s['band'][1]:.2g} "
          f"p99.9 {s['band'][2]:.2g} max {s['band_max']:.2g} after the first sample (first sample: max "
          f"{s['first_max']:.2g}); longest run of samples > 0.1: {s['longest_over']}; largest median/min "
          f"ratio among matrices at one step: {s['starved_gap']:.3g}")
    by_rule: dict = {}
    for a in s["alerts"]:
        by_rule.setdefault(a.rule, []).append(a)
    print(f"  alerts (warning/critical): {len(s['alerts'])}"
          + "".join(f"; {r} {len(v)}" for r, v in sorted(by_rule.items())))
    for a in s["alerts"][:12]:
        print(f"    step {a.step} {a.severity} {a.rule} {a.layer} [{a.kind}] {a.message[:140]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*")
    p.add_argument("--out", default="/tmp/healthy")
    p.add_argument("--judge", metavar="DIR", help="judge DIR's recordings again with the current rules")
    p.add_argument("--rules", help="a rules TOML file for --judge")
    args = p.parse_args(argv)
    if args.judge:
        from probes.rules import RuleEngine
        from probes.rules.config import load

        for path in sorted(glob.glob(os.path.join(args.judge, "*.xray"))):
            report(path, RuleEngine(load(args.rules) if args.rules else None))
        return 0
    os.makedirs(args.out, exist_ok=True)
    for name in args.runs:
        report(record(name, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
