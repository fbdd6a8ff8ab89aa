"""Lead time of the warnings before a loss spike, and false warnings on a healthy run.

Builds reproducible instabilities on the CPU, on a small GPT-2 from a config
(2 blocks, width 64, 4 heads, 64-token windows of the bundled text, batch 16,
AdamW, one thread), records each with the probe attached (every=10), then
judges the recordings with the rules (``RuleEngine``, the defaults):

- ``healthy``: AdamW 1e-3 with 100 warm-up steps, 2,000 steps (the control);
- ``lr-high``: the same model at lr 2e-2 from step 0, no warm-up;
- ``lr-jump``: healthy until step 300, then the lr x20 (a schedule bug, a resumed run's lost state);
- ``lr-ramp``: healthy until step 200, then the lr grows 3% a step (a schedule bug);
- ``lost-state``: healthy, and at step 300 the optimizer's state cleared (a run resumed without it:
  Adam's first steps move every weight by about the lr);
- ``bad-batch``: healthy, and at step 300 one batch of random tokens (a corrupted shard);
- ``early-bad-batch``: the bad batch at step 40, while the loss still falls fast;
- ``lr-jump-clipped``: the lr jump with clip_grad_norm_(1.0), as most recipes clip.

For each: the step the loss spikes (the first step whose loss is > 1.5x the
median of the 16 steps before it), the first warning of any rule and of the
every-step tier's ``instability`` rule, and the lead time (spike step minus
warning step; negative: after the spike). The control counts every warning.

    python bench/lead_time.py --out /tmp/lead            # record (about 3 minutes) and judge
    python bench/lead_time.py --out /tmp/lead --judge    # judge the recordings again
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCENARIOS = ("healthy", "lr-high", "lr-jump", "lr-ramp", "lost-state", "bad-batch", "early-bad-batch",
             "lr-jump-clipped")
#: a spike: the loss above this many times the median of the WINDOW steps before it
SPIKE, WINDOW = 1.5, 16


def setup(seed: int = 0):
    """The model, its optimizer and the data."""
    import torch

    from probes.demo import training as demo

    torch.manual_seed(seed)
    data = demo.CharData(demo.corpus(), block=64, seed=seed)
    model = demo.build_model(len(data.chars), layers=2, width=64, heads=4, block=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, data


def plan(name: str):
    """(steps, lr at step i, whether step i's batch is corrupted, clip)."""
    if name == "healthy":
        return 2000, lambda i: 1e-3 * min(1.0, (i + 1) / 100), lambda i: False, None
    if name == "lr-high":
        return 400, lambda i: 2e-2, lambda i: False, None
    if name in ("lr-jump", "lr-jump-clipped"):
        return 400, lambda i: 1e-3 * min(1.0, (i + 1) / 100) * (20 if i >= 300 else 1), lambda i: False, \
            (1.0 if name == "lr-jump-clipped" else None)
    if name == "lr-ramp":
        return 400, lambda i: 1e-3 * min(1.0, (i + 1) / 100) * 1.03 ** max(0, i - 200), lambda i: False, None
    if name == "lost-state":
        return 400, lambda i: 1e-3 * min(1.0, (i + 1) / 100), lambda i: False, None
    if name in ("bad-batch", "early-bad-batch"):
        at = 300 if name == "bad-batch" else 40
        return 400 if name == "bad-batch" else 120, lambda i: 1e-3 * min(1.0, (i + 1) / 100), lambda i: i == at, None
    raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


def record(name: str, out: str, every: int = 10) -> str:
    """Train scenario ``name`` with the probe recording to ``OUT/NAME.xray``; its path."""
    import torch

    import probes

    torch.set_num_threads(1)
    model, opt, data = setup()
    steps, lr, corrupt, clip = plan(name)
    path = os.path.join(out, f"{name}.xray")
    for stale in (path, path + ".losses.json"):
        if os.path.exists(stale):
            os.remove(stale)
    losses = []
    t = time.perf_counter()
    with probes.attach(model, opt, every=every, serve=False, log=path, name=name, spectral_every=None):
        for i in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr(i)
            if name == "lost-state" and i == 300:
                opt.state.clear()
            x = data.batch(16)
            if corrupt(i):
                x = torch.randint(len(data.chars), x.shape, generator=torch.Generator().manual_seed(i))
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    with open(path + ".losses.json", "w") as f:
        json.dump(losses, f)
    print(f"{name}: {steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def spike_step(losses: list[float]) -> int | None:
    """The first step whose loss is > SPIKE x the median of the WINDOW steps before it."""
    for i in range(WINDOW, len(losses)):
        if not math.isfinite(losses[i]) or losses[i] > SPIKE * statistics.median(losses[i - WINDOW:i]):
            return i
    return None


def judge(path: str) -> dict:
    """The rules again over a recording: warnings, the first of each rule, the spike and the lead."""
    from probes.protocol import wire
    from probes.rules import RuleEngine

    msgs, _ = wire.read_file(path)
    rules = RuleEngine()
    alerts = []
    for m in msgs:
        if isinstance(m, wire.Hello):
            rules.set_hello(m)
        elif isinstance(m, wire.Note):
            rules.note(m)
        elif isinstance(m, wire.Step):
            alerts += rules.evaluate(m)
        elif isinstance(m, wire.Scalars):
            alerts += rules.evaluate_scalars(m)
    warned = [a for a in alerts if a.severity != "info"]
    with open(path + ".losses.json") as f:
        losses = json.load(f)
    spike = spike_step(losses)
    first = min((a.step for a in warned), default=None)
    tier = min((a.step for a in warned if a.rule == "instability"), default=None)
    return {"spike": spike, "first": first, "first_rule": next((a.rule for a in warned if a.step == first), None),
            "tier": tier, "lead": None if spike is None or first is None else spike - first,
            "warnings": len(warned), "alerts": warned}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/lead-time", help="folder for the recordings")
    ap.add_argument("--judge", action="store_true", help="judge the recordings again, without training")
    ap.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print("| scenario | loss spike at | first warning (rule) | instability at | lead (steps) | warnings |")
    print("|---|---|---|---|---|---|")
    for name in args.scenarios:
        path = os.path.join(args.out, f"{name}.xray")
        if not args.judge:
            record(name, args.out)
        r = judge(path)
        print(f"| {name} | {r['spike']} | {r['first']} ({r['first_rule']}) | {r['tier']} | {r['lead']} | "
              f"{r['warnings']} |", flush=True)
        for a in r["alerts"][:4]:
            print(f"|   | {a.step} {a.rule} {a.layer}: {a.message[:160]} |||||", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
