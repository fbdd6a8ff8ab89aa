"""The fault zoo: real fault-injected trainings of a small GPT-2, each
asserting the expected rule on the expected layer within a bounded number
of steps, and no critical alert in the healthy control.

Each case trains a 2-block, 32-wide GPT-2 (built from a config, char-level
on the bundled text) with the probe attached at ``every=5``; the whole file
runs in about a minute or two on 2 CPU cores. ``python tests/test_fault_zoo.py``
prints the table of docs/alerts.md (steps from injection to alert, and the
alerts of a 2,000-step healthy run).
"""

from __future__ import annotations

import math
import sys
import time

import pytest
import torch
from torch import nn

import probes
from probes import demo, wire
from probes.rules import RuleEngine

pytestmark = pytest.mark.slow

EVERY = 5
BLOCK = 1  # the block the faults hit
P = f"transformer.h.{BLOCK}"


class LoRA(nn.Module):
    """A minimal LoRA adapter around a GPT-2 ``Conv1D`` (peft's names: ``base_layer``, ``lora_A``, ``lora_B``)."""

    def __init__(self, base: nn.Module, r: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base_layer = base
        n_in, n_out = base.weight.shape  # Conv1D stores (in, out)
        self.lora_A = nn.Linear(n_in, r, bias=False)
        self.lora_B = nn.Linear(r, n_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the adapter starts as the identity change
        self.scale = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scale


def _detach_output(module, inputs, output):
    return output.detach()  # the bug: a branch cut from the graph


class Case:
    """One training: ``setup`` builds the fault into the model/optimizer at
    the start, ``inject`` at ``at``; ``rule``/``layer`` are what must fire."""

    def __init__(self, name, rule, layer, *, at=0, activation="gelu_new", lr=1e-3, detail=""):
        self.name, self.rule, self.layer, self.at = name, rule, layer, at
        self.activation, self.lr, self.detail = activation, lr, detail

    def setup(self, model) -> list:
        """Parameter groups for the optimizer (faults that exist from the start)."""
        return [p for p in model.parameters() if p.requires_grad]

    def inject(self, model, optimizer) -> None:
        """Break the run at step ``at``."""

    def forward(self, model, x, step):
        return model(input_ids=x, labels=x).loss


class LrTimes1000(Case):
    def inject(self, model, optimizer):
        for g in optimizer.param_groups:
            g["lr"] *= 1000


class NanWeight(Case):
    def inject(self, model, optimizer):
        with torch.no_grad():
            model.transformer.h[BLOCK].attn.c_attn.weight[0, 0] = math.nan


class DeadRelu(Case):
    def inject(self, model, optimizer):
        with torch.no_grad():
            model.transformer.h[BLOCK].mlp.c_fc.bias.fill_(-10.0)


class LeftOut(Case):
    def setup(self, model):
        target = model.transformer.h[BLOCK].attn.c_proj.weight
        return [p for p in model.parameters() if p is not target]


class Detached(Case):
    def setup(self, model):
        model.transformer.h[BLOCK].mlp.register_forward_hook(_detach_output)
        return super().setup(model)


class LoraForgotten(Case):
    def setup(self, model):
        for p in model.parameters():
            p.requires_grad_(False)
        adapters = []
        for h in model.transformer.h:
            h.attn.c_attn = LoRA(h.attn.c_attn)
            adapters.append(h.attn.c_attn)
        # the optimizer was built from block 0's adapter only
        return list(adapters[0].lora_A.parameters()) + list(adapters[0].lora_B.parameters())


class Fp16NoScaler(Case):
    """fp16 autocast from step ``at`` on, without a GradScaler. From step 0
    the loss is scaled as a mean over 1,024x more tokens (262k per batch, a
    usual LLM batch) would scale it, or as gradient accumulation over 1,024
    micro-batches divides it; in fp32 that trains normally, in fp16 a share
    of the gradients falls below fp16's smallest subnormal (6e-8) and
    flushes to zero. (CPU autocast supports float16 in torch 2.13.)"""

    scale = 1 / 1024

    def forward(self, model, x, step):
        if step < self.at:
            return super().forward(model, x, step) * self.scale
        with torch.autocast("cpu", dtype=torch.float16):
            return model(input_ids=x, labels=x).loss * self.scale


CASES = [
    LrTimes1000("lr x1000", "update-too-large", None, at=60, detail="every group's lr multiplied by 1000"),
    NanWeight("NaN weight", "nonfinite", f"{P}.attn.c_attn", at=60, detail="one weight of c_attn set to NaN"),
    DeadRelu("dead ReLU", "dead", f"{P}.mlp.act", at=60, activation="relu",
             detail="ReLU MLP; c_fc bias set to -10"),
    LeftOut("left out of optimizer", "stalled", f"{P}.attn.c_proj.weight",
            detail="c_proj.weight not given to AdamW"),
    Detached("detached branch", "no-grad", f"{P}.mlp.c_fc.weight", detail="the MLP's output .detach()ed"),
    LoraForgotten("LoRA not in optimizer", "stalled", f"{P}.attn.c_attn.lora_A.weight",
                  detail="base frozen; optimizer has block 0's adapter only"),
    Fp16NoScaler("fp16 without GradScaler", "vanishing", f"{P}.attn.c_attn.weight", at=60,
                 detail="fp32 until then, then autocast fp16 without GradScaler (loss scaled 1/1024 throughout)"),
]


def train(case: Case | None, steps: int, *, every: int = EVERY, seed: int = 0) -> list:
    """Train the small GPT-2 with ``case``'s fault; every message the probe published."""
    torch.manual_seed(seed)
    data = demo.CharData(demo.corpus(), block=32, seed=seed)
    activation = case.activation if case else "gelu_new"
    model = build(len(data.chars), activation)
    model.train()
    params = case.setup(model) if case else list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=case.lr if case else 1e-3)
    msgs: list = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine OpenMP's spin-waits cost 30-60x
    try:
        _loop(case, model, optimizer, data, steps, every, msgs)
    finally:
        torch.set_num_threads(threads)
    return msgs


def _loop(case, model, optimizer, data, steps, every, msgs) -> None:
    with probes.attach(model, optimizer, every=every, name="zoo", serve=False, rules=RuleEngine()) as xr:
        xr.publisher.subscribe(msgs.append)
        for step in range(steps):
            if case is not None and step == case.at:
                case.inject(model, optimizer)
                xr.note("fault", fault=case.name, layer=case.layer or "")
            x = data.batch(8)
            loss = case.forward(model, x, step) if case else model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def build(vocab: int, activation: str):
    """2 blocks, width 32, 2 heads, 32-token windows."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        activation_function=activation, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def alerts(msgs, severities=("warning", "critical")):
    """The RuleEngine's alerts; ``spectral`` comes from probes.spectral's own monitor and is not judged here."""
    return [m for m in msgs if isinstance(m, wire.Alert) and m.severity in severities and m.rule != "spectral"]


def first_hit(case: Case, msgs):
    """The first alert of the case's rule on its layer (any layer when ``layer`` is None)."""
    for a in alerts(msgs):
        if a.rule == case.rule and (case.layer is None or a.layer == case.layer):
            return a
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault_fires_its_rule_on_its_layer(case):
    msgs = train(case, steps=case.at + 40)
    hit = first_hit(case, msgs)
    got = [(a.step, a.rule, a.layer) for a in alerts(msgs)][:8]
    assert hit is not None, f"no {case.rule} alert on {case.layer}; got {got}"
    # k samples of hysteresis at every=5, plus the sample the fault needs to show
    assert hit.step - case.at <= 4 * EVERY, got
    # nothing but info before the fault (faults present from step 0 have no "before")
    assert [a for a in alerts(msgs) if a.step < case.at] == []


def test_healthy_control_has_no_critical_alert():
    msgs = train(None, steps=400)
    assert [a for a in alerts(msgs) if a.severity == "critical"] == []
    assert len(alerts(msgs)) <= 2
    assert sum(isinstance(m, wire.Step) for m in msgs) == 400 // EVERY


def main() -> None:
    """Print the table of docs/alerts.md."""
    print("| fault | injected | expected rule on layer | first alert (step) | steps to alert | other alerts |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        t = time.perf_counter()
        msgs = train(case, steps=case.at + 40)
        hit = first_hit(case, msgs)
        others = sorted({f"{a.rule} {a.layer}" for a in alerts(msgs) if a is not hit})
        print(f"| {case.name} | {case.detail} | `{case.rule}` {case.layer or '(any)'} | "
              f"{hit.step if hit else 'none'} | {hit.step - case.at if hit else '-'} | "
              f"{'; '.join(others) or '-'} | <!-- {time.perf_counter() - t:.0f}s -->")
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    msgs = train(None, steps=steps)
    found = alerts(msgs)
    print(f"\nhealthy, {steps} steps at every={EVERY}: {sum(a.severity == 'critical' for a in found)} critical, "
          f"{sum(a.severity == 'warning' for a in found)} warning")
    for a in found:
        print(f"  step {a.step} {a.severity} {a.rule} {a.layer} [{a.kind}] {a.message}")
    spectral = alerts(msgs, ("warning", "critical")) and [m for m in msgs if isinstance(m, wire.Alert)
                                                          and m.rule == "spectral" and m.severity != "info"]
    print(f"(and {len(spectral or [])} spectral warnings from probes.spectral's monitor)")


if __name__ == "__main__":
    main()
