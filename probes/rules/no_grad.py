"""``no-grad``: a parameter that requires a gradient but gets none.

At a step where other parameters have a gradient, a trainable parameter
(from the Hello: not frozen, its gradient not skipped) without one is on a
detached branch or unused in forward. The parameters it finds are left out of
the update rules' judgement (:attr:`probes.rules.base.StepContext.missing`).
"""

from __future__ import annotations

from probes.protocol.wire import Alert
from probes.rules.base import Finding, StepContext, StepRule, StreamState, tracked


class NoGrad(StepRule):
    """``no-grad``, judged on each trainable parameter's gradient stream (alerts of kind grad)."""

    id = "no-grad"

    def evaluate(self, ctx: StepContext, out: list[Alert]) -> None:
        step, engine = ctx.step, self.engine
        grads = {s.layer for s in step.samples if s.kind == "grad"}
        trainable = engine.trainable
        if trainable is None or not grads:
            return  # without the model's layers, frozen parameters are not known
        for s in step.samples:
            if s.kind != "weight" or s.layer not in trainable:
                continue
            c = engine.cfg(s.layer)
            if not c.on("no-grad"):
                continue
            st = engine.streams.setdefault((s.layer, "grad", step.rank), StreamState())
            bad = s.layer not in grads
            if bad:
                ctx.missing.add(s.layer)
            n = st.bad.get("no-grad", 0) + 1

            def finding(n=n, s=s, c=c) -> Finding:
                return Finding(
                    "warning", n, c.nograd_k,
                    f"{s.layer} requires a gradient but got none in {n} sampled steps: is it on a "
                    "detached branch (.detach(), torch.no_grad()), or unused in forward?",
                )

            tracked(step, s, st, "no-grad", bad, c.nograd_k, c.recover_k, finding, out, kind="grad")
