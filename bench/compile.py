"""The probe on a torch.compile'd model: graphs, graph breaks, recompiles and step time.

Each configuration runs in its own process (dynamo's caches are per process):
  plain     the demo GPT-2 (HF transformers), compiled, no probe
  probe     the same, probes.attach(..., every=N) before torch.compile
and, for reference, the same two without torch.compile (``--eager``). The first
``2 * every`` steps (compilation of the sampled and unsampled variants) are
left out of the step times; graphs compiled after them are counted as late
recompiles. Rounds alternate the configurations; the table gives medians.

    python bench/compile.py                          # inductor, every=10
    python bench/compile.py --backend aot_eager --steps 40 --rounds 2 --eager
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(config: str, backend: str, every: int, steps: int, compiled: bool) -> dict:
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    import probes
    from probes.demo import training as demo

    torch.manual_seed(0)
    model = demo.build_model(vocab=256)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    xr = probes.attach(model, opt, every=every, serve=False, spectral_every=None) if config == "probe" else None
    fwd = torch.compile(model, backend=backend) if compiled else model
    data = torch.randint(0, 256, (steps, 8, 64), generator=torch.Generator().manual_seed(1))
    times, warm, graphs_warm = [], 2 * every, 0
    t_start = time.perf_counter()
    for i in range(steps):
        if i == warm:
            graphs_warm = counters["stats"]["unique_graphs"]
            warm_s = time.perf_counter() - t_start
        t0 = time.perf_counter()
        fwd(input_ids=data[i], labels=data[i]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    if xr is not None:
        xr.close()
    sampled = [t for i, t in enumerate(times[warm:], warm) if i % every == 0]
    plain = [t for i, t in enumerate(times[warm:], warm) if i % every]
    return {
        "config": config, "compiled": compiled, "warmup_s": warm_s,
        "unsampled_ms": 1e3 * statistics.median(plain), "sampled_ms": 1e3 * statistics.median(sampled),
        "graphs": counters["stats"]["unique_graphs"], "late_graphs": counters["stats"]["unique_graphs"] - graphs_warm,
        "breaks": sum(counters["graph_break"].values()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="also the same two configurations without torch.compile")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        config, compiled = args.one.split(":")
        print(json.dumps(run_one(config, args.backend, args.every, args.steps, compiled == "1")))
        return 0
    configs = [("plain", "1"), ("probe", "1")] + ([("plain", "0"), ("probe", "0")] if args.eager else [])
    results: dict[tuple, list] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in (configs if r % 2 == 0 else configs[::-1]):
            out = subprocess.run([sys.executable, __file__, "--one", ":".join(c), "--backend", args.backend,
                                  "--every", str(args.every), "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            results[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"backend {args.backend}, every={args.every}, {args.steps} steps, {args.rounds} rounds (medians)")
    print(f"{'config':<16}{'warm-up s':>10}{'unsampled ms':>14}{'sampled ms':>12}{'graphs':>8}{'late':>6}{'breaks':>8}")
    for (config, compiled), rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("warmup_s", "unsampled_ms", "sampled_ms")}
        name = f"{config}{' compiled' if compiled == '1' else ' eager'}"
        print(f"{name:<16}{med['warmup_s']:>10.1f}{med['unsampled_ms']:>14.1f}{med['sampled_ms']:>12.1f}"
              f"{rs[0]['graphs']:>8}{max(r['late_graphs'] for r in rs):>6}{rs[0]['breaks']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
