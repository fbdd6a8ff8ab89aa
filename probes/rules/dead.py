"""``dead``: a layer whose output is (near) zero, or a gradient that never flowed.

On activations: an activation function's output near zero almost everywhere,
or most of its units never above the probe's eps; any other module's output
exactly zero. On gradients: exactly zero in every sampled step since the first
(``vanishing`` watches gradients that fall, which needs a non-zero past).
"""

from __future__ import annotations

from probes.protocol import stats
from probes.rules.base import Finding, SampleRule, Verdict


class DeadActivations(SampleRule):
    """``dead`` on activation streams."""

    id = "dead"
    kinds = frozenset({"act"})

    def judge(self, ctx, s, st, c) -> Verdict:
        engine = self.engine
        activation = s.layer in engine.activations
        if activation:
            near = stats.fraction(s.near_zero, s)
            # a unit is "dead" when it never exceeds eps; in a layer whose typical value (RMS) is
            # itself below eps that says nothing (a healthy MLP's last ReLU, RMS 0.044, read 61-69%
            # "dead" at eps 0.05). A truly dead layer is all near zero and fires on ``near``.
            live_scale = stats.rms(s) >= engine.eps if s.count else False
            units = s.dead_units if s.dead_units is not None and live_scale else 0.0
            # and dead units stay dead: a share that keeps falling is units waking up as the
            # layer's scale grows (that MLP: 69% -> 36% over its first 60 steps), not dying
            prev = st.series("dead_units")
            waking = bool(prev) and units < prev[-1] - 0.02
            prev.append(units)
            bad = near >= c.dead_near_zero or (units >= c.dead_units and not waking)
        else:
            near = stats.fraction(s.zeros, s)
            units = 0.0
            bad = near >= c.dead_zeros

        def finding() -> Finding:
            lora = engine.lora(f"{s.layer}.weight")
            if lora and lora[0] == "B":
                why = {"frozen": "its weight is frozen", "unoptimized": "its weight is in no optimizer param group"}
                module = engine.modules[s.layer]
                state = ("frozen" if "weight" in module.frozen else
                         "unoptimized" if "weight" in module.unoptimized else "")
                return Finding(
                    "warning", near, c.dead_zeros,
                    f"{near:.1%} of {s.layer}'s outputs are zero: a LoRA B starts at zero and "
                    + (f"{why[state]}, so the adapter can never change the model; train it" if state else
                       "has not moved since: is its lr 0, or its gradient zero (is lora_A's input all zero)?"),
                )
            if units >= c.dead_units:
                return Finding(
                    "warning", units, c.dead_units,
                    f"{units:.0%} of units in {s.layer} never exceed |x| >= eps: dead units; "
                    "check the bias init, the learning rate and the activation function",
                )
            return Finding(
                "warning", near, c.dead_near_zero,
                f"{near:.1%} of {s.layer}'s outputs are {'near ' if activation else ''}"
                "zero: the layer is dead; "
                "check the bias init, the learning rate and the activation function",
            )

        return bad, c.dead_k, finding


class DeadGradients(SampleRule):
    """``dead`` on gradient streams: a gradient exactly zero in every sampled step since the
    first, so nothing ever flowed back."""

    id = "dead"
    kinds = frozenset({"grad"})

    def judge(self, ctx, s, st, c) -> Verdict | None:
        zero = s.count > 0 and s.sumsq == 0 and s.abssum == 0
        if not zero:
            st.seen_nonzero = True
        elif st.seen_nonzero and "dead" not in st.active:
            return None  # zero after being non-zero: vanishing's

        def finding() -> Finding:
            lora = self.engine.lora(s.layer)
            if lora and lora[0] == "A":
                hint = ({"frozen": "its B is frozen", "unoptimized": "its B is in no optimizer param group"}[lora[1]]
                        + ", so B stays zero and A gets no gradient: the adapter never learns; train B too"
                        if lora[1] else "B is zero at init and has not moved: is B's lr 0?")
            else:
                hint = ("no gradient ever flows back: the units after it are all inactive (a ReLU layer dead "
                        "from init, e.g. a large negative bias), its output is multiplied by zero, or the loss "
                        "does not use it (DDP fills an unused parameter's gradient with zeros)")
            return Finding(
                "warning", 1.0, c.dead_zeros,
                f"{s.layer}'s gradient is exactly zero in all {st.bad.get('dead', 0)} sampled steps since "
                f"the start: {hint}",
            )

        return zero, c.dead_k, finding
