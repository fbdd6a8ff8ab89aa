"""``stalled``: a parameter whose update ratio ``||dW||/||W||`` stays (near) zero.

Its hint says why, from what the Hello told: a parameter in no optimizer
param group, a LoRA A whose B never trains, a param group at lr 0 or at a learning
rate far too low (``stall_lr``, 1e-6: lr 1e-8 moves no norm weight at all).
"""

from __future__ import annotations

import math

from probes.rules.base import Finding, UpdateRule, Verdict


class Stalled(UpdateRule):
    """``stalled`` on update streams."""

    id = "stalled"

    def judge(self, ctx, s, st, c) -> Verdict | None:
        if s.ratio is None:
            if not (s.count and s.sumsq == 0):
                return None  # a zero weight (a LoRA B at init) that moved: no ratio to judge
            ratio = 0.0  # a zero weight that did not move at all
        elif not math.isfinite(s.ratio):
            return None
        else:
            ratio = s.ratio

        def finding() -> Finding:
            return Finding(
                "warning", ratio, c.stall_ratio,
                f"update ratio {ratio:.2g} < {c.stall_ratio:g} for {c.stall_k} samples: " + self._hint(s.layer),
            )

        return ratio < c.stall_ratio, c.stall_k, finding

    def _hint(self, param: str) -> str:
        """Why ``param`` does not move, as far as the run's facts tell."""
        engine = self.engine
        lora = engine.lora(param)
        lr, group = engine.lr(param)
        if engine.unoptimized(param):
            hint = f"{param} requires a gradient but is in none of the optimizer's param groups: add it"
            if lora:
                hint += " (a LoRA adapter: build the optimizer after wrapping the model, e.g. peft's get_peft_model)"
            return hint
        if lora and lora[0] == "A" and lora[1]:
            return (f"this LoRA A's B is {'frozen' if lora[1] == 'frozen' else 'in no optimizer param group'}: "
                    "B stays zero, so A gets no gradient and the adapter never learns; train B too")
        if lr == 0:
            return f"its param group {group}'s learning rate is 0 (a schedule at its end, or warm-up from 0?)"
        if lr is not None and lr <= engine.cfg(param).stall_lr:
            return (f"the learning rate is far too low: param group {group} is at lr {lr:.3g}, where fine-tuning "
                    "runs at 1e-5 to 1e-3 and the step is below float32's resolution of this weight; raise it "
                    "(or, in a warm-up from 0, wait for it)")
        if engine.param_groups:  # the probe knows the optimizer's groups: it is in one
            return (f"it is in param group {group}" + (f" at lr {lr:.3g}" if lr is not None else "")
                    + ": is its gradient zero, or does the optimizer skip it (weight decay only, a scheduler at 0)?")
        return "is the parameter in the optimizer (a LoRA adapter's too), frozen, or at lr=0?"
