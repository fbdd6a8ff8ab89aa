"""The demo's trainer: a small GPT-2 learning a bundled public-domain text.

The model is built from a ``GPT2Config`` (random init, nothing downloaded),
tokens are characters, and a fault can be injected at a chosen step to show
what the alerts catch. ``python -m probes.demo`` runs it as the training
process that ``xray-tui demo`` attaches to.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from importlib import resources

import torch

import probes

FAULTS = ("none", "exploding", "dead", "nan", "stalled")
BLOCK = 1  # the transformer block that the faults hit


def corpus() -> str:
    """The bundled text (public domain; see tui/data/SOURCES.md)."""
    return resources.files("tui").joinpath("data/corpus.txt").read_text(encoding="utf-8")


class CharData:
    """Character-level tokens of the corpus and random training windows."""

    def __init__(self, text: str, block: int = 64, seed: int = 0) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.tokens = torch.tensor([self.index[c] for c in text], dtype=torch.long)
        self.block = block
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, size: int) -> torch.Tensor:
        """``size`` random windows of ``block`` tokens."""
        starts = torch.randint(len(self.tokens) - self.block - 1, (size,), generator=self.gen)
        return torch.stack([self.tokens[s : s + self.block] for s in starts.tolist()])


def build_model(vocab: int, layers: int = 4, width: int = 128, heads: int = 4, block: int = 64):
    """A small GPT-2 from a config, randomly initialised."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config notes about GPT-2's token ids mean nothing for char tokens
    config = GPT2Config(vocab_size=vocab, n_positions=block, n_embd=width, n_layer=layers, n_head=heads,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def inject(fault: str, model, optimizer) -> tuple[str, str]:
    """Break the model as the named fault does; returns (layer, what was done)."""
    h = model.transformer.h[BLOCK]
    prefix = f"transformer.h.{BLOCK}"
    with torch.no_grad():
        if fault == "nan":
            h.attn.c_attn.weight[0, 0] = math.nan
            return f"{prefix}.attn.c_attn", "one weight set to NaN"
        if fault == "exploding":
            h.mlp.c_fc.weight.mul_(1000.0)
            return f"{prefix}.mlp.c_fc", "weights multiplied by 1000, as a bad update would"
        if fault == "dead":
            # Shift the activation's input rather than write -10 into c_fc's bias: that bias has an L2
            # norm near 0.1 after 50 steps, so the write was a 1600x jump in a weight, which `exploding`
            # rightly called critical before `dead` could say anything. Here no weight moves; the
            # units are as dead (GELU(x - 10) is 0 in float32, and so is its gradient).
            act = h.mlp.act
            gelu = act.forward
            act.forward = lambda x: gelu(x - 10.0)  # an instance attribute: the probe's hooks stay on act
            return f"{prefix}.mlp.act", "its input shifted by -10 (a broken activation): every GELU unit below zero"
        if fault == "stalled":
            target = h.attn.c_proj.weight
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p is not target]
            return f"{prefix}.attn.c_proj", "weight removed from the optimizer"
    raise ValueError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")


def train(*, steps: int, every: int = 5, fault: str = "none", fault_step: int = 50, name: str = "demo",
          log: str | None = None, serve: bool = True, listener=None, batch: int = 16,
          lr: float = 1e-3, seed: int = 0, rules=None, should_stop=None) -> int:
    """Train for ``steps`` steps (0: until interrupted, or until ``should_stop()`` says so,
    asked once a step); returns the steps done."""
    torch.manual_seed(seed)
    data = CharData(corpus(), seed=seed)
    model = build_model(len(data.chars))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    step = 0
    with probes.attach(model, optimizer, every=every, name=name, log=log, serve=serve, rules=rules) as xr:
        if listener is not None:
            xr.publisher.subscribe(listener)
        while (steps <= 0 or step < steps) and not (should_stop is not None and should_stop()):
            if fault != "none" and step == fault_step:
                layer, detail = inject(fault, model, optimizer)
                xr.note("fault", fault=fault, layer=layer, detail=detail)
            x = data.batch(batch)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    return step


def _exit_with(parent: int) -> None:
    """Interrupt this process once ``parent`` has gone: a viewer killed outright (SIGKILL, a
    closed terminal's SIGHUP) runs no cleanup, and its trainer would train on, unseen, forever."""
    import os
    import signal
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)  # the probe closes its socket and recording as on Ctrl-C

    threading.Thread(target=watch, name="xray-demo-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the demo trainer process."""
    p = argparse.ArgumentParser(prog="python -m probes.demo", description=__doc__)
    p.add_argument("--steps", type=int, default=0, help="steps to train (0: until interrupted)")
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--fault", choices=FAULTS, default="none")
    p.add_argument("--fault-step", type=int, default=50)
    p.add_argument("--name", default="demo")
    p.add_argument("--log", default=None)
    p.add_argument("--parent", type=int, default=None,
                   help="stop (as Ctrl-C would) when this process is gone: the viewer that started us")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.parent:
        _exit_with(args.parent)
    try:
        train(steps=args.steps, every=args.every, fault=args.fault, fault_step=args.fault_step,
              name=args.name, log=args.log)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
