"""Spectral metrics: probes.spectral.analysis against weightwatcher.analyze(), side by side.

Builds a GPT-2 small-shaped model from a config (no download; random init,
or with --heavy every matrix replaced by a heavy-tailed one so that alpha is
in the trained range), then in interleaved rounds times

- ``weightwatcher.WeightWatcher(model).analyze()`` with its defaults,
- ``probes.spectral.analysis`` on the same 49 matrices weightwatcher analyses,
- ``probes.spectral.analysis`` on all 50 (adding the 50,257-row token embedding that
  weightwatcher skips because N > max_N = 50,000),

and reports medians, the ratio, and the largest per-layer differences of
alpha, alpha_weighted, log_norm, log_spectral_norm and stable_rank.

    python bench/spectral.py [--rounds 3] [--layers 12] [--heavy]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time

# run as a script, bench/ comes first on sys.path, where bench/tui.py would hide the tui package
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

from probes.spectral import analysis as spectral
from probes.spectral import matrices

METRICS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank")


def gpt2(layers: int, heavy: bool):
    """A GPT-2 small-shaped LM head model from a config (random weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers)).eval()
    if heavy:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.dim() == 2:
                    # Student-t(3) entries: a heavy-tailed ESD, alpha ~2-4 like trained layers
                    t = torch.distributions.StudentT(3.0).sample(p.shape)
                    p.copy_(0.02 * t)
    return model


def run_ww(model):
    import weightwatcher as ww

    return ww.WeightWatcher(model=model).analyze()


def run_ours(model, names: set[str] | None):
    tg, _ = matrices.targets(model)
    out = {}
    for t in tg:
        if names is None or t.name in names:
            out[t.name] = spectral.analyze_matrix(t.tensor(), t.name)
    return out


def ww_names(model, details) -> list[str]:
    """Parameter names of the layers weightwatcher analysed (by module name)."""
    return [f"{n}.weight" for n in details["longname"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12, help="transformer blocks (GPT-2 small: 12)")
    ap.add_argument("--heavy", action="store_true", help="heavy-tailed matrices instead of the random init")
    args = ap.parse_args()
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model = gpt2(args.layers, args.heavy)

    t_ww, t_ours, t_all = [], [], []
    details = ours = None
    for r in range(args.rounds):  # interleaved, so a busy neighbour hits all three alike
        t0 = time.perf_counter()
        details = run_ww(model)
        t_ww.append(time.perf_counter() - t0)
        names = set(ww_names(model, details))
        t0 = time.perf_counter()
        ours = run_ours(model, names)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_ours(model, None)
        t_all.append(time.perf_counter() - t0)
        print(f"round {r + 1}: weightwatcher {t_ww[-1]:.2f} s, ours (same layers) {t_ours[-1]:.2f} s, "
              f"ours (all) {t_all[-1]:.2f} s", flush=True)

    diffs = {k: 0.0 for k in METRICS}
    for _, row in details.iterrows():
        m = ours[f"{row['longname']}.weight"]
        for k in METRICS:
            a, b = float(row[k]), getattr(m, k)
            diffs[k] = max(diffs[k], abs(a - b) / max(abs(a), 1e-12))
    alphas = details["alpha"].to_numpy()
    med_ww, med_ours, med_all = (statistics.median(t) for t in (t_ww, t_ours, t_all))
    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"model: GPT-2 small shape, {args.layers} blocks, {'heavy-tailed' if args.heavy else 'random init'}; "
          f"weightwatcher analysed {len(details)} matrices (alpha median {np.median(alphas):.2f})")
    print(f"median of {args.rounds}: weightwatcher.analyze() {med_ww:.2f} s | probes.spectral.analysis same "
          f"{len(ours)} matrices {med_ours:.2f} s ({med_ww / med_ours:.1f}x faster) | "
          f"all {len(ours) + 1} incl. wte {med_all:.2f} s")
    print("largest relative difference per metric: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()
