"""``frozen``: most of a model that is not a PEFT model frozen (``requires_grad=False``).

A base frozen by mistake (every parameter but a new classifier head) trains nothing but the head,
and every other rule stays quiet: the frozen parameters have no gradient to judge. Judged once,
at a rank's first training step: the share of the watched elements that require a gradient
(from the Hello's frozen lists and the step's weight sizes) below ``frozen_share`` warns, naming
how many train and the frozen module subtrees. A model with LoRA adapters (the Hello's ``lora``
role) is meant to be mostly frozen and is left alone; a linear probe is too, by switching the
rule off.
"""

from __future__ import annotations

from probes.protocol.wire import Alert
from probes.rules.base import Finding, StepContext, StepRule, Where, alert
from probes.rules.subtree import describe, subtrees
from probes.rules.thresholds import ALL_LAYERS


class Frozen(StepRule):
    """``frozen``, once per rank at its first training step with weights."""

    id = "frozen"

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.judged: set[int] = set()  # ranks already judged

    def evaluate(self, ctx: StepContext, out: list[Alert]) -> None:
        step, engine = ctx.step, self.engine
        trainable = engine.trainable
        if step.rank in self.judged or trainable is None:
            return
        sizes = {s.layer: s.count for s in step.samples if s.kind == "weight" and s.layer in engine.params}
        if not sizes:
            return
        self.judged.add(step.rank)
        c = engine.cfg(ALL_LAYERS)
        if not c.on("frozen") or any(info.role == "lora" for info, _ in engine.params.values()):
            return  # PEFT: a frozen base is the point
        total = sum(sizes.values())
        train = sum(n for p, n in sizes.items() if p in trainable)
        share = train / total if total else 1.0
        if share >= c.frozen_share:
            return
        order = list(engine.params)
        frozen = subtrees([p for p in order if p not in trainable and p in sizes], order)
        trains = subtrees([p for p in order if p in trainable and p in sizes], order)
        message = (f"only {train:,} of {total:,} parameters ({share:.2%}) require a gradient"
                   + (f" ({describe(trains)})" if trains else "")
                   + f"; frozen (requires_grad=False): {describe(frozen)}. No PEFT adapter is attached, so "
                   "the frozen part never learns: if you meant to fine-tune the whole model, set "
                   "requires_grad=True on it (a from_pretrained model trains in full by default); if this "
                   "is a deliberate linear probe, switch the rule off ([frozen] enabled = false)")
        out.append(alert(step, Where(ALL_LAYERS, "weight"), self.id,
                         Finding("warning", share, c.frozen_share, message)))
