"""Spectral false alarms on healthy runs: which matrices cross WeightWatcher's bands, and why.

Trains a healthy model with the probe attached (no viewer; the spectral
monitor every ``--spectral-every`` steps, 500 by default) and prints, for
every pass and matrix, the shape, eigenvalue count, alpha, the tail size
(eigenvalues >= xmin), alpha's standard error sigma = (alpha-1)/sqrt(tail),
what the band alone says (the rule before the trust gate) and whether the
probe trusted the fit. Then the counts: band-only warnings (distinct
layers, as the alert fires once per layer while it lasts) against the
``spectral`` warnings the probe actually published.

    python bench/spectral_alarms.py --model zoo --steps 2000    # tests/test_fault_zoo.py's model
    python bench/spectral_alarms.py --model demo --steps 1100   # `xray-tui demo`'s model
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# run as a script, bench/ comes first on sys.path, where bench/tui.py would hide the tui package
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import probes
from probes.demo import training as demo
from probes.rules import spectral as spectral_rule
from probes.protocol import wire


def zoo_model(vocab: int):
    """tests/test_fault_zoo.py's model: 2 blocks, width 32, 2 heads, 32-token windows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        activation_function="gelu_new", bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def run(model_kind: str, steps: int, spectral_every: int, threads: int, rules=None, save: str | None = None) -> list:
    """Train; return every message the probe published."""
    torch.manual_seed(0)
    if model_kind == "zoo":  # as tests/test_fault_zoo.py trains it
        data = demo.CharData(demo.corpus(), block=32, seed=0)
        model, batch, every = zoo_model(len(data.chars)), 8, 5
    else:  # as probes.demo.training.train does
        data = demo.CharData(demo.corpus(), seed=0)
        model, batch, every = demo.build_model(len(data.chars)), 16, 5
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.set_num_threads(threads)
    msgs: list = []
    with probes.attach(model, opt, every=every, serve=False, spectral_every=spectral_every, rules=rules) as xr:
        xr.publisher.subscribe(msgs.append)
        for i in range(steps):
            x = data.batch(batch)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if save and (i + 1) % spectral_every == 0:  # the weights a pass sees, for offline study
                torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                           os.path.join(save, f"{model_kind}-{i + 1}.pt"))
        xr.spectral.wait_pass(steps // spectral_every, timeout=600)  # the last pass, whole
    return msgs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("zoo", "demo"), default="zoo")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--spectral-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: OpenMP spin-waits hurt a shared box)")
    p.add_argument("--save", metavar="DIR", help="also save the weights at each pass's step to DIR")
    p.add_argument("--rules", help="a rules TOML file (its [spectral] table sets the bands and the gate)")
    args = p.parse_args(argv)
    rules = None
    if args.rules:
        from probes.rules import RuleEngine
        from probes.rules.config import load
        rules = RuleEngine(load(args.rules))
    t0 = time.perf_counter()
    msgs = run(args.model, args.steps, args.spectral_every, args.threads, rules, args.save)
    spec = [m for m in msgs if isinstance(m, wire.Spectral)]
    print(f"{'step':>5} {'layer':<34} {'shape':>10} {'evals':>5} {'alpha':>6} {'tail':>5} {'sigma':>6}  band           trusted?")
    active: set = set()  # the rule before the gate: fires once per layer while alpha is out of band
    band_fired = []
    for m in spec:
        what = spectral_rule.band(m.alpha)
        if what and m.layer not in active:
            active.add(m.layer)
            band_fired.append((m.step, m.layer, round(m.alpha, 2)))
        elif not what and m.alpha is not None:
            active.discard(m.layer)
        shape = "x".join(map(str, m.shape))
        alpha = f"{m.alpha:6.2f}" if m.alpha is not None else "     -"
        sigma = f"{m.sigma:6.2f}" if m.sigma is not None else "     -"
        print(f"{m.step:>5} {m.layer:<34} {shape:>10} {m.n_evals:>5} {alpha} {m.n_tail:>5} {sigma}  "
              f"{what or '-':<14} {'yes' if not m.untrusted else 'no: ' + m.untrusted}")
    fired = [m for m in msgs if isinstance(m, wire.Alert) and m.rule == "spectral" and m.severity != "info"]
    crit = [m for m in msgs if isinstance(m, wire.Alert) and m.severity == "critical"]
    warn = [m for m in msgs if isinstance(m, wire.Alert) and m.severity == "warning"]
    passes = sorted({m.step for m in spec})
    print(f"\nmodel {args.model}, {args.steps} steps, spectral passes at {passes}, "
          f"{len(spec)} fits, {time.perf_counter() - t0:.0f} s")
    print(f"band alone (alpha < 2 or > 6, the rule before the gate): {len(band_fired)} spectral warnings "
          f"{band_fired}")
    print(f"published by the probe: {len(fired)} spectral warnings "
          f"{sorted((a.step, a.layer, round(a.value, 2)) for a in fired)}")
    print(f"all alerts: {len(crit)} critical, {len(warn)} warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
